"""The one-command GPU check (``python -m tools.gpu_check``; ``python benchmarks/gpu_check.py`` under its older
name) runs end to end on CPU (--dry-run: Triton interpreter, tiny shapes) and writes one JSON with every section ok;
a failing section is recorded without losing the others."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tools.gpu_check import cli as gpu_check
from tools.gpu_check import env as gpu_env
from tools.gpu_check import sections
from tools.gpu_check import summary

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"  # the entry script under the name users know


def _run(tmp_path, *extra):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the entry script finds the repository itself
    env["TRITON_INTERPRET"] = "1"
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
        "l2_bandwidth",
        "patch_sentence_correctness",
        "forward_v3",
        "host_overhead",
        "peers",
        "train_step",
        "d_sweep",
        "direction_sweep",
        "bwd_split_sweep",
        "loss_local",
        "patch_sentence_fwd_config_sweep",
        "patch_sentence_bwd_config_sweep",
        "patch_sentence_benchmark",
        "integrity_mask",
        "patch_sentence_ot",
        "model_vs_measurement",
        "compiled_kernels",
        "train_step_max_batch",
    }
    assert all("seconds" in s and "skipped" not in s for s in sections.values())
    assert all(s["ok"] for s in sections.values()), {k: s.get("error") for k, s in sections.items()}
    correctness = sections["patch_sentence_correctness"]["result"]
    assert correctness["checks"] > 20 and not correctness["failures"]
    assert correctness["determinism"]["bitwise_equal"]
    ot = sections["patch_sentence_ot"]["result"]
    assert ot["correctness"]["checks"] >= 2 and not ot["correctness"]["failures"]
    assert {r["impl"] for r in ot["rows"] if "full_ms" in r} == {"reference", "chunked", "triton"} and ot["loss"]["ot_ms"] > 0
    rows = sections["patch_sentence_benchmark"]["result"]["rows"]
    assert {r["provider"] for r in rows} >= {"naive", "chunked", "triton", "grid_matmul"}
    assert all("error" not in r for r in rows)
    assert data["environment"]["torch"] and data["table"]
    peer_rows = sections["peers"]["result"]["rows"]
    timed = {r["provider"] for r in peer_rows if "ms" in r}
    assert {"triton_train", "triton", "chunked", "dense_dsim", "compiled"} <= timed, peer_rows
    assert all(r["kernel_ms"] is not None for r in peer_rows if "ms" in r)
    assert all("error" not in r for r in peer_rows), peer_rows
    assert {"naive_bf16", "lik", "flash_maxsim"} <= set(sections["peers"]["result"]["skipped"])  # CUDA only
    assert {"triton_train_v2", "triton_v2"} <= timed  # the forward v3 replaced, forced, beside the dispatch's
    v3 = sections["forward_v3"]["result"]
    assert all(r["same_pattern_as_grid"] for r in v3["non_finite"]) and v3["v3_vs_v2"]
    assert all(r["i2t_first_index"] and r["t2i_first_index"] for r in v3["ties"])
    (share,) = [r for r in sections["train_step"]["result"]["rows"] if r["impl"] == "chunked"]
    assert share["op_calls"] and 0 < share["op_share_at_G"] < 1
    assert share["step_python_top"] and share["step_launches"] is None  # launches are counted on CUDA only
    host = sections["host_overhead"]["result"]["rows"]
    assert [r["mode"] for r in host] == ["fwd", "fwd+bwd"] and all(0 < r["host_ms"] <= r["wall_ms"] for r in host)
    assert host[1]["python_top"] and all(r["own_us_per_call"] >= 0 for r in host[1]["python_top"])
    for name in ("d_sweep", "direction_sweep", "bwd_split_sweep"):
        assert sections[name]["result"]["rows"] and all("error" not in r for r in sections[name]["result"]["rows"])
    assert sections["l2_bandwidth"]["result"]["l2"][0]["sum_rel_err"] < 1e-4
    text = summary.table_markdown(data, path.name)  # the README's view of the same JSON
    assert f"**{path.name}**" in text and f"patch-sentence op {correctness['checks']} checks, 0 failures" in text
    assert "| 4x6 K5 S3 D32 | fwd+bwd |" in text and "not run" in text  # the eager bf16 grid is CUDA only
    assert "One training step" in text and "optimal-transport" in text and "| chunked |" in text
    assert "Host side of one call" in text


def test_summary_ratios_and_missing_sections():
    """The README summary divides the fastest peer's time by ours (call and kernel time separately, each with
    its own fastest peer) and leaves out the sections a run skipped."""
    def row(provider, mode, ms, kernel_ms):
        return dict(B=8, G=16, K=4, S=2, D=32, dtype="bfloat16", provider=provider, mode=mode, ms=ms, kernel_ms=kernel_ms)

    data = {"environment": {"device": "Card X", "torch": "t", "triton": "tr", "date": "2026-01-02T03:04:05"},
            "sections": {"peers": {"ok": True, "result": {"rows": [
                row("triton_train", "full", 2.0, 0.5), row("compiled", "full", 1.0, 0.8), row("naive_bf16", "full", 4.0, 0.4),
                {"B": 8, "G": 16, "K": 4, "S": 2, "D": 32, "dtype": "bfloat16", "provider": "dense_dsim", "skipped": "budget"}]}},
                         "integrity_mask": {"ok": True, "skipped": "time budget spent"}}}
    text = summary.table_markdown(data, "gpu_card-x.json")
    assert "**gpu_card-x.json**: Card X, torch t, triton tr, 2026-01-02" in text
    line = next(x for x in text.splitlines() if x.startswith("| 8x16 K4 S2 D32 | fwd+bwd |"))
    assert line.endswith("| 2 (0.5) | 4 (0.4) | 1 (0.8) | not run | 0.50 (torch.compile grid) | 0.80 (eager bf16 grid) |")
    assert "Integrity-scored" not in text and "Correctness" not in text and "training step" not in text


def test_a_failing_section_keeps_the_others(tmp_path, monkeypatch):
    def section_broken(ctx):
        raise RuntimeError("boom")

    monkeypatch.setattr(gpu_check, "SECTIONS", [sections.section_environment, section_broken])
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
        "import tools.gpu_check.cli\n"
        "from benchmarks import bench_train_step\n"
        "loss = bench_train_step.make_train_step('chunked', batch=4)()\n"
        "assert loss == loss, 'non-finite loss'\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT), TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_spent_budget_skips_sections_but_not_the_free_ones(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "0"))
    rc = gpu_check.main(["--dry-run", "--out", str(tmp_path), "--budget-s", "0",
                         "--sections", "environment", "matmul_rate", "model_vs_measurement"])
    (path,) = tmp_path.glob("*.json")
    sections = json.loads(path.read_text())["sections"]
    assert rc == 0
    assert "time budget" in sections["matmul_rate"]["skipped"]
    assert "result" in sections["environment"] and "result" in sections["model_vs_measurement"]


@pytest.mark.parametrize("name,sms,power,expected", [
    ("NVIDIA H100 80GB HBM3", 132, 700.0, "H100 SXM"),
    ("NVIDIA H100 PCIe", 114, 350.0, "H100 PCIe"),
    ("NVIDIA H100 NVL", 132, 400.0, "H100 NVL"),
    ("NVIDIA H200", 132, 700.0, "H200 SXM"),
    ("NVIDIA H200 NVL", 132, 600.0, "H200 NVL"),
    ("NVIDIA A100-SXM4-80GB", 108, 400.0, "A100 SXM"),
])
def test_card_variant(name, sms, power, expected):
    assert gpu_env.variant(name, sms, power) == expected


def test_clock_samples_are_parsed_and_summarised():
    lines = ["2026/12/05 10:53:08.123, 1755, 2619, 412.50, 61", "2026/12/05 10:53:08.373, 1980, 2619, 690.10, 70",
             "2026/12/05 10:53:08.623, [N/A], [N/A], [N/A], [N/A]", "garbage"]
    samples = [s for s in map(gpu_env.parse_sample, lines) if s is not None]
    assert len(samples) == 2 and abs(samples[1][0] - samples[0][0] - 0.25) < 1e-6
    summary = gpu_env.summarise(samples)
    assert summary["sm_mhz"] == {"min": 1755.0, "median": 1867.5, "max": 1980.0}
    assert summary["power_w"]["max"] == 690.1 and summary["max_temperature_c"] == 70.0


def test_model_vs_measurement_pairs_rows_with_the_committed_model():
    """Every provider the GPU check times at PERF.md's shapes finds its record in results/perf_model.json."""
    model = json.loads((ROOT / "benchmarks" / "results" / "perf_model.json").read_text())["records"]
    measured = [dict(B=128, G=G, K=98, S=16, D=512, dtype="bfloat16", provider=p, mode=m, ms=0.2, kernel_ms=0.15)
                for G in (128, 1024) for p in sections.MODELLED for m in ("fwd", "bwd", "full")]
    rows = sections.compare(model, measured, "H100")
    paired = {(r["provider"], r["mode"], r["G"]) for r in rows}
    assert len(paired) == len(rows) == len(measured)
    assert all(set(r["predicted_us"]) == {"pessimistic", "middle", "optimistic"} for r in rows)
    assert all(r["model_kind"].startswith("perf_model.py: a prediction") for r in rows)
