"""The performance model: SASS opcodes land on the right pipes, the issue model charges each pipe its rate, the
baselines keep their order, and the committed ``perf_model.json`` is what the model computes from the committed
static compile (regenerate with ``python -m tools.perf_model`` after ``kernel_static.json`` changes)."""
import json
from pathlib import Path

import pytest

from tools import perf_model
from tools import perf_model_hw as hw
from tools import perf_model_peers as peers_model
from tools.kernel_static import analysis as ks
from tools.kernel_static.records import unpack

ROOT = Path(__file__).resolve().parents[1]

MODEL = json.loads((ROOT / "benchmarks" / "results" / "perf_model.json").read_text())


@pytest.mark.parametrize("opcode,pipe,data", [
    ("FMNMX", "alu", 0), ("SEL", "alu", 0), ("FSEL", "alu", 0), ("ISETP.GE.AND", "alu", 0), ("LOP3.LUT", "alu", 0),
    ("FFMA", "fp32", 0), ("IMAD.WIDE", "imad", 0), ("MUFU.RCP", "xu", 0), ("SHFL.BFLY", "shuffle", 128),
    ("LDS.128", "shared", 512), ("LDSM.16.M88.4", "shared", 512), ("STS.64", "shared", 256),
    ("LDGSTS.E.BYPASS.LTC128B.128", "global", 512), ("HGMMA.64x64x16.F32.BF16", "tensor", 0),
    ("UIADD3", "uniform", 0), ("BAR.SYNC", "control", 0), ("MOV", "other", 0),
])
def test_sass_opcodes_map_to_their_pipe(opcode, pipe, data):
    assert ks.sass_pipe(opcode) == pipe
    assert ks.sass_data_bytes(opcode) == data


def test_sass_loops_count_pipes():
    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   FMNMX R2, R3, R4, !PT ;
        /*0020*/                   SHFL.BFLY PT, R5, R6, 0x1, 0x1f ;
        /*0030*/               @P0 BRA 0x10 ;
        /*0040*/                   EXIT ;
    """
    (loop,) = ks.sass_loops(ks.parse_sass(sass), 90)
    assert loop["pipes"] == {"alu": 1, "shuffle": 1, "control": 1} and loop["data_bytes"] == 128


def test_issue_model_charges_each_pipe_its_rate():
    # 100 ALU instructions per warp, 8 warps (2 per scheduler): the ALU pipe (2 clocks each) limits, not issue
    clocks, limit = hw.issue_cycles(({"alu": 100}, 0), 8, "sm_90")
    assert (clocks, limit) == (400, "alu")
    # fp32 runs at full rate on sm_90 and half rate on sm_80
    assert hw.issue_cycles(({"fp32": 100}, 0), 4, "sm_90") == (100, "issue")
    assert hw.issue_cycles(({"fp32": 100}, 0), 4, "sm_80") == (200, "fma")
    # the L1 / shared data path is per SM: 8 warps x 1024 bytes at 128 bytes per clock
    assert hw.issue_cycles(({"shared": 2}, 1024), 8, "sm_90") == (64, "data path")


def test_baselines_keep_their_order():
    card = hw.CARDS[0]
    shape = dict(B=128, G=128, K=98, S=16, D=512)
    t = {impl: peers_model.grid_model(impl, "fwd", card, shape, "bf16")["seconds"] for impl in ("naive", "naive_bf16", "compiled")}
    assert t["compiled"] < t["naive_bf16"] < t["naive"]
    lik = peers_model.maxsim_model("lik", "fwd", card, 7.0, shape, "bf16")
    l2_bytes = 2 * 128 * 128 * (98 + 16) * 512 * 2  # two calls, each program reading its query block and documents
    assert lik["seconds"] >= l2_bytes / 7e12
    assert lik["model_kind"].startswith("lower bound")


def test_committed_model_covers_the_issue():
    recs = MODEL["records"]
    assert {r["impl"] for r in recs} == {"fused", "fused_v2", "naive", "naive_bf16", "compiled", "lik", "flash_maxsim"}
    assert {r["dtype"] for r in recs} == {"fp32", "tf32", "bf16"}
    assert all(r["model"].startswith("perf_model.py: a prediction, not a measurement") for r in recs)
    assert all([x["assumption"] for x in r["by_l2"]] == ["pessimistic", "middle", "optimistic"] for r in recs)
    training = {(r["card"], r["G"], r["K"], r["mode"]) for r in recs if r["training_path"]}
    assert {(c, G, 98, m) for c in ("H100", "A100") for G in (128, 1024) for m in ("fwd", "bwd", "fwd+bwd")} <= training
    assert MODEL["verdicts"] and "not a measurement" in MODEL["model"]


def test_committed_model_is_computed_from_the_committed_static_compile():
    static = unpack(json.loads((ROOT / "benchmarks" / "results" / "kernel_static.json").read_text()))
    fresh = json.loads(json.dumps(perf_model.build(static)))
    assert fresh == MODEL["records"], "stale: regenerate with `python -m tools.perf_model`"


def test_committed_model_has_v3_beside_the_kernel_it_replaced():
    """On H100 the training path's forward is the persistent kernel (forward_v3.py), modelled from its own static
    record (patch tile streamed, sentence block resident), with the forced v2 forward beside it at every PERF.md
    shape; on A100 the dispatch keeps v2."""
    recs = [r for r in MODEL["records"] if r["mode"] == "fwd" and r["dtype"] == "bf16" and r["D"] == 512
            and r["impl"] in ("fused", "fused_v2")]
    pairs = {}
    for r in recs:
        pairs.setdefault((r["card"], r["G"], r["K"], r["normalize"]), {})[r["impl"]] = r
    for (card, G, K, normalize), both in pairs.items():
        new, old = both["fused"]["kernel"], both["fused_v2"]["kernel"]
        assert old["kernel_name"] == "_patch_sentence_fwd_kernel"
        if card == "H100":
            assert new["kernel_name"] == "_patch_sentence_fwd_v3_kernel"
            assert new["l2_bytes_per_tile"] < old["l2_bytes_per_tile"]
        else:
            assert new == old
