"""What the CPU kernels written in C share: their build on first use with the system's C compiler, the cache of
built libraries, loading through ctypes once per process, and the thread pool that splits their work.

Build: ``$CC`` (else ``cc`` / ``gcc``) with -O3 -ffp-contract=off (and -march=native -mprefer-vector-width=512 on
x86, tried first: a compiler that refuses them still builds the portable kernel, with the same numbers; and, for a
kernel that asks and when torch's OpenMP runtime libgomp is loaded, -fopenmp: the library then links the same
``libgomp.so.1`` and its parallel loops run on torch's own worker threads instead of a second pool that would
compete with them for the cores) into
``$MLIP_FAST_CACHE`` (else ``$XDG_CACHE_HOME/mlip_fast``, else ``~/.cache/mlip_fast``) ``/native/<key>/``, where
the key hashes the source (and the shared header ``_vecmath.h``), the compiler's version, the flags and the CPU's
model and feature flags (a build for one CPU is never loaded on another); written to a temporary name and renamed,
so concurrent ranks are safe.
``MLIP_FAST_CPU_KERNELS=0`` turns every C kernel off (their ops then run their PyTorch code).

API::

    enabled() -> bool;  compiler() -> path or None
    build(source, flags, native_flags, openmp=False) -> Path of the built library (RuntimeError when none builds)
    openmp_shared() -> whether a -fopenmp build shares torch's OpenMP runtime in this process
    load(state, build_fn, declare, message) -> CDLL or None, decided once per ``state`` dict (one warning on failure)
    pool(threads) -> a shared ThreadPoolExecutor of ``threads`` workers (the caller runs part 0 itself)
    split(lib, name, cuts, args) -> the return codes of ``name`` over the parts [cuts[i], cuts[i + 1])

Every kernel library exports ``mlip_openmp()`` (1 when built with -fopenmp, from ``_vecmath.h``) and, for each
function ``name(start, stop, ...)`` it splits, ``name_parts(parts, cuts, ...)`` running the parts in an OpenMP loop.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional, Sequence

__all__ = ["FLAGS", "NATIVE_FLAGS", "OPENMP_FLAGS", "enabled", "compiler", "openmp_shared", "build", "load", "pool",
           "split"]

FLAGS = ("-O3", "-ffp-contract=off", "-shared", "-fPIC")  # every build; -ffp-contract=off: no fused multiply-add
NATIVE_FLAGS = ("-march=native", "-mprefer-vector-width=512") if platform.machine() in ("x86_64", "AMD64") else ()
OPENMP_FLAGS = ("-fopenmp",)
HEADERS = (Path(__file__).with_name("_vecmath.h"),)  # included by the kernels' sources: part of every build key
_lock = threading.Lock()
_pool: dict = {}  # "pool": (threads, executor)


def enabled() -> bool:
    """False when ``MLIP_FAST_CPU_KERNELS=0`` turns the C kernels off (read at every call)."""
    return os.environ.get("MLIP_FAST_CPU_KERNELS", "1") != "0"


def _cpu_identity() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    keep = [line for line in info.splitlines() if line.split(":")[0].strip() in ("model name", "flags", "Features")]
    return "\n".join(sorted(set(keep)))


def compiler() -> Optional[str]:
    """The C compiler the builds use: ``$CC`` when set, else ``cc`` or ``gcc`` on PATH (None: none found)."""
    cc = os.environ.get("CC")
    return shutil.which(cc) if cc else (shutil.which("cc") or shutil.which("gcc"))


def openmp_shared() -> bool:
    """Whether GNU OpenMP (``libgomp.so.1``, torch's parallel runtime on Linux wheels) is loaded in this process: a
    library built with -fopenmp then binds to that same runtime and thread pool."""
    try:
        return any("libgomp" in line for line in Path("/proc/self/maps").read_text().splitlines())
    except OSError:
        return False


def _cache_root() -> Path:
    if os.environ.get("MLIP_FAST_CACHE"):
        return Path(os.environ["MLIP_FAST_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mlip_fast"


def build(source: Path, flags: Sequence[str], native_flags: Sequence[str], openmp: bool = False) -> Path:
    """The shared library of ``source`` built with ``flags`` (+ ``native_flags`` where the compiler takes them, +
    -fopenmp when ``openmp`` and :func:`openmp_shared`), from the cache when that build exists."""
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler found ($CC, cc or gcc)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    errors = []
    extras = [tuple(native_flags), ()] if native_flags else [()]
    if openmp and openmp_shared():
        extras = [(*extra, *OPENMP_FLAGS) for extra in extras] + extras
    for extra in extras:
        flags_now = (*flags, *extra)
        texts = [source.read_text()] + [h.read_text() for h in HEADERS]
        key = hashlib.sha256("\0".join([*texts, cc, version, " ".join(flags_now), platform.machine(),
                                        _cpu_identity()]).encode()).hexdigest()[:20]
        target = _cache_root() / "native" / key / f"{source.stem}.so"
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            done = subprocess.run([cc, *flags_now, "-o", tmp, str(source)], capture_output=True, text=True,
                                  timeout=300)
            if done.returncode == 0:
                os.replace(tmp, target)
                return target
            errors.append(f"{cc} {' '.join(flags_now)} failed ({done.returncode}): {done.stderr.strip()[-1000:]}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError("; ".join(errors))


def load(state: dict, build_fn: Callable[[], Path], declare: Callable[[ctypes.CDLL], None], message: str
         ) -> Optional[ctypes.CDLL]:
    """The kernel library of ``state`` (a module's dict: "lib", and "why" when it is None), built and loaded on the
    first call, ``declare`` setting its functions' ctypes signatures. None when the kernels are off or the build
    failed (then one RuntimeWarning, ``message`` with ``{why}`` filled in; ``state["why"]`` keeps the reason)."""
    if not enabled():
        return None
    if "lib" not in state:
        with _lock:
            if "lib" not in state:
                try:
                    lib = ctypes.CDLL(str(build_fn()))
                    lib.mlip_openmp.restype, lib.mlip_openmp.argtypes = ctypes.c_int64, []
                    declare(lib)
                    state["why"] = None
                except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as exc:
                    lib = None
                    state["why"] = f"{type(exc).__name__}: {exc}"
                    warnings.warn("mlip_fast: " + message.format(why=state["why"]), RuntimeWarning, stacklevel=3)
                state["lib"] = lib
    return state["lib"]


def pool(threads: int) -> ThreadPoolExecutor:
    """A process-wide pool of ``threads`` workers for the kernels' parts (recreated when the count changes)."""
    made = _pool.get("pool")
    if made is None or made[0] != threads:
        if made is not None:
            made[1].shutdown(wait=False)
        made = _pool["pool"] = (threads, ThreadPoolExecutor(max(1, threads), thread_name_prefix="mlip_native"))
    return made[1]


def split(lib: ctypes.CDLL, name: str, cuts: Sequence[int], args: tuple) -> list:
    """``name`` of ``lib`` over the parts [cuts[i], cuts[i + 1]): one call of ``name``_parts on the OpenMP threads
    when the build has them (torch's own workers), else part 0 on the calling thread and the rest on :func:`pool`
    (ctypes releases the GIL). Returns the return codes: one (the parts' combination) or one per part."""
    parts = len(cuts) - 1
    if lib.mlip_openmp():
        cut_tensor = (ctypes.c_int64 * len(cuts))(*cuts)
        return [getattr(lib, f"{name}_parts")(parts, ctypes.cast(cut_tensor, ctypes.c_void_p), *args)]
    fn = getattr(lib, name)
    others = [pool(parts - 1).submit(fn, cuts[i], cuts[i + 1], *args) for i in range(1, parts)]
    return [fn(cuts[0], cuts[1], *args)] + [job.result() for job in others]
