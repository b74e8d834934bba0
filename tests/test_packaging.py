"""Guards for the kernels/ layout: no top-level ``kernels`` package, transformers' BERT imports from the
repo root, and the built wheel ships only ``mlip_fast`` (with the kernels inside it)."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_folder_is_not_a_package():
    assert not (ROOT / "kernels" / "__init__.py").exists(), "kernels/__init__.py shadows Hugging Face's kernels package"


def test_transformers_bert_imports_from_repo_root():
    code = "import mlip_fast.kernels, sys; from transformers import BertModel; print(BertModel.__name__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "BertModel"


def test_source_shim_points_at_kernels_folder():
    import mlip_fast.kernels

    assert [Path(p).resolve() for p in mlip_fast.kernels.__path__] == [ROOT / "kernels"]


@pytest.mark.slow
def test_wheel_contains_only_mlip_fast(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    wheel = next(tmp_path.glob("mlip_fast-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"mlip_fast"}
    kernel_files = {n[len("mlip_fast/kernels/"):] for n in names if n.startswith("mlip_fast/kernels/")}
    assert kernel_files == {p.relative_to(ROOT / "kernels").as_posix() for p in (ROOT / "kernels").rglob("*.py")} | {
        p.relative_to(ROOT / "kernels").as_posix() for p in (ROOT / "kernels").rglob("*.[ch]")}  # C built at use
    assert "mlip_fast/kernels/__init__.py" not in names  # the source-tree shim is not shipped
    data_files = {n for n in names if n.endswith((".json", ".txt")) and n.startswith("mlip_fast/")}
    for folder in ("models/model_configs", "preprocess/vocab", "eval/prompts", "eval/splits"):
        expected = {f"mlip_fast/{folder}/{p.name}" for p in (ROOT / "mlip_fast" / folder).iterdir() if p.is_file()}
        assert expected and expected <= data_files, f"{folder} files missing from the wheel"
