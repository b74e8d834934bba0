"""The one-command GPU script runs end to end on CPU (--dry-run: Triton interpreter, tiny shapes) and writes
one JSON with every section ok; a failing section is recorded without losing the others."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _run(tmp_path, *extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT), TRITON_INTERPRET="1")
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path), *extra],
        capture_output=True, text=True, timeout=120, env=env, cwd=str(ROOT),
    )


def test_dry_run_writes_all_sections(tmp_path):
    proc = _run(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (path,) = tmp_path.glob("*.json")  # cpu_dry_run.json, or gpu_<card>_dry_run.json on a CUDA machine
    data = json.loads(path.read_text())
    sections = data["sections"]
    assert set(sections) == {
        "environment",
        "matmul_rate",
        "patch_sentence_correctness",
        "patch_sentence_benchmark",
        "patch_sentence_fwd_config_sweep",
        "patch_sentence_bwd_config_sweep",
        "integrity_mask",
        "model_vs_measurement",
        "loss_local",
        "compiled_kernels",
        "train_step",
    }
    assert all(s["ok"] for s in sections.values()), {k: s.get("error") for k, s in sections.items()}
    correctness = sections["patch_sentence_correctness"]["result"]
    assert correctness["checks"] > 20 and not correctness["failures"]
    assert correctness["determinism"]["bitwise_equal"]
    rows = sections["patch_sentence_benchmark"]["result"]["rows"]
    assert {r["provider"] for r in rows} >= {"naive", "chunked", "triton", "grid_matmul"}
    assert all("error" not in r for r in rows)
    assert data["environment"]["torch"] and data["table"]


def test_a_failing_section_keeps_the_others(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))

    def section_broken(ctx):
        raise RuntimeError("boom")

    monkeypatch.setattr(gpu_check, "SECTIONS", [gpu_check.section_environment, section_broken])
    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "0"))  # main() may set it
    rc = gpu_check.main(["--dry-run", "--out", str(tmp_path)])
    (path,) = tmp_path.glob("*.json")
    data = json.loads(path.read_text())
    assert rc == 1
    assert data["sections"]["environment"]["ok"]
    assert not data["sections"]["broken"]["ok"] and "boom" in data["sections"]["broken"]["error"]


def test_runs_without_the_packages_gpu_machines_lack():
    """The GPU machines have torch, triton and transformers but no deepspeed, webdataset or simplejpeg: the
    script and the training step it measures must import and run without them."""
    code = (
        "import sys\n"
        "for name in ('deepspeed', 'webdataset', 'simplejpeg'):\n"
        "    sys.modules[name] = None\n"
        "sys.path[:0] = ['benchmarks']\n"
        "import gpu_check, bench_train_step\n"
        "loss = bench_train_step.make_train_step('chunked', batch=4)()\n"
        "assert loss == loss, 'non-finite loss'\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT), TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stdout + proc.stderr
