"""``--torchcompile``: a compiled run trains with the losses of the uncompiled run, records the compile, and its
checkpoints and export have the uncompiled format, so each kind of run resumes the other's checkpoint.

The runs use ``--torchcompile-backend aot_eager`` (dynamo's graphs, forward and backward traced by AOTAutograd as
inductor gets them, no generated C++): inductor's kernel builds take minutes on two shared cores; the flag's default
stays inductor (measured in docs/training.md). The compared runs have no masking and no dropout
(``DETERMINISTIC``): compiled dropout draws its masks from other random streams than eager dropout.
"""
import json
import socket
import subprocess

import pytest
import torch
from safetensors import safe_open

from mlip_fast.losses import MLIPLoss
from mlip_fast.models import create_model, from_pretrained
from mlip_fast.models.config import ConfigError
from mlip_fast.train import compile as tcompile
from mlip_fast.train.args import parse_args
from mlip_fast.train.checkpoint_files import load_weights_only
from mlip_fast.train.main import train
from tests.train.conftest import (DETERMINISTIC, REPO, TRAIN_PY, base_args, clean_env, seed_run_dir, train_records,
                                  write_ds)

COMPILED = ("--torchcompile", "--torchcompile-backend", "aot_eager")
# Compiled graphs may fuse ops and reorder fp32 sums (and the compiled report encoder runs BERT over the padding,
# where eager takes the padding-free path), so a compiled step's loss may differ from eager's in the last bits, and
# the weights of later steps inherit that: 1e-4 relative is ample for 3 AdamW steps of lr 1e-3 on losses near 11,
# and far below the loss's change per step (> 0.05).
RTOL, ATOL = 1e-4, 1e-5
LOSS_TERMS = ("loss", "loss_global", "loss_local", "loss_sie")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _model_keys(checkpoint_dir) -> list:
    state = load_weights_only(checkpoint_dir / "mp_rank_00_model_states.pt")
    return sorted(state["module"])


def _export_keys(export_dir) -> list:
    with safe_open(str(export_dir / "model.safetensors"), "pt") as f:
        return sorted(f.keys())


def _assert_close_losses(records: dict, reference: dict, steps) -> None:
    for step in steps:
        for key in LOSS_TERMS:
            torch.testing.assert_close(records[step][key], reference[step][key], rtol=RTOL, atol=ATOL,
                                       msg=lambda m: f"step {step} {key}: {m}")


def test_compiled_run_matches_and_checkpoints_cross_resume(tmp_path, synthetic_cache, shared_tokenizer,
                                                           one_process_reference):
    ds = write_ds(tmp_path / "ds.json")
    # compiled, steps 1-2
    compiled_dir = seed_run_dir(tmp_path / "compiled", shared_tokenizer)
    summary = train(base_args(ds, compiled_dir, synthetic_cache, *DETERMINISTIC, "--steps", "2", *COMPILED))
    record = summary["torchcompile"]
    assert record["enabled"] and record["backend"] == "aot_eager"
    # the BERT report encoder keeps its padding-free eager path
    assert record["compiled"] == ["model.visual.embeddings.forward", "model.visual.estimator.forward",
                                  "model.visual._run_blocks", "MLIPLoss (fullgraph)"]
    assert record["compile_s"] > 0 and record["graphs"] >= 4
    assert record["first_step_s"] > record["steady_step_s"] > 0 and record["warmup_excess_s"] > 0
    assert json.loads((compiled_dir / "summary.json").read_text())["torchcompile"] == record
    assert f"torch.compile (aot_eager): compiling {record['compile_s']} s" in (compiled_dir / "run.log").read_text()
    records = train_records(compiled_dir)
    assert all(torch.isfinite(torch.tensor([records[s][k] for k in LOSS_TERMS])).all() for s in (1, 2))
    _assert_close_losses(records, one_process_reference, (1, 2))

    # uncompiled, step 3 from the compiled run's checkpoint
    eager_dir = tmp_path / "eager"
    summary = train(base_args(ds, eager_dir, synthetic_cache, *DETERMINISTIC,
                              "--resume", str(compiled_dir / "checkpoints" / "step00000002")))
    assert summary["resumed_from_step"] == 2 and summary["torchcompile"] == {"enabled": False}
    _assert_close_losses(train_records(eager_dir), one_process_reference, (3,))

    # the same formats: no _orig_mod. prefix in the checkpoint's or the export's weights
    keys = _model_keys(compiled_dir / "checkpoints" / "step00000002")
    assert keys == _model_keys(eager_dir / "checkpoints" / "step00000003")
    assert not [k for k in keys if "_orig_mod" in k]
    assert _export_keys(compiled_dir / "export") == _export_keys(eager_dir / "export")
    assert json.loads((compiled_dir / "export" / "config.json").read_text()) == \
        json.loads((eager_dir / "export" / "config.json").read_text())
    from_pretrained(compiled_dir / "export")

    # compiled again, step 4 from the uncompiled run's checkpoint
    torch._dynamo.reset()
    again = tmp_path / "again"
    summary = train(base_args(ds, again, synthetic_cache, *DETERMINISTIC, "--steps", "4", *COMPILED,
                              "--resume", str(eager_dir / "checkpoints" / "step00000003")))
    assert summary["resumed_from_step"] == 3 and summary["steps"] == 4 and summary["torchcompile"]["enabled"]
    assert sorted(train_records(again)) == [4]
    assert torch.isfinite(torch.tensor(train_records(again)[4]["loss"]))


@pytest.mark.slow
def test_two_processes_compile_the_loss_with_breaks_at_the_gathers(tmp_path, synthetic_cache, shared_tokenizer,
                                                                  one_process_reference):
    """``deepspeed --num_gpus 2`` (gloo): the loss's gathers pad the sentences to a size read from a collective,
    which a whole graph cannot branch on, so with several processes the loss compiles with graph breaks; the run
    trains the losses of the one-process run."""
    run_dir = seed_run_dir(tmp_path / "run", shared_tokenizer)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = REPO / ".venv" / "bin" / "deepspeed"
    cmd = [str(launcher) if launcher.exists() else "deepspeed", "--num_gpus", "2", "--master_port", str(port),
           str(TRAIN_PY), *base_args(write_ds(tmp_path / "ds.json"), run_dir, synthetic_cache, *DETERMINISTIC,
                                     *COMPILED)]
    proc = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["torchcompile"]["compiled"][-1] == "MLIPLoss (graph breaks at the gathers)"
    _assert_close_losses(train_records(run_dir), one_process_reference, (1, 2, 3))


def test_the_flag_and_its_backend_parse():
    args = parse_args(["--deepspeed_config", "zero2_fp32", "--torchcompile"])
    assert args.torchcompile and args.torchcompile_backend == "inductor"
    assert not parse_args(["--deepspeed_config", "zero2_fp32"]).torchcompile
    with pytest.raises(SystemExit):
        parse_args(["--deepspeed_config", "zero2_fp32", "--torchcompile", "--torchcompile-backend", "cudagraphs"])


def test_inductor_without_a_cpp_compiler_is_refused(monkeypatch):
    args = parse_args(["--deepspeed_config", "zero2_fp32", "--torchcompile"])
    monkeypatch.setattr(tcompile.shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match="no C\\+\\+ compiler"):
        tcompile.check_compile(args, "cpu")
    args.torchcompile_backend = "aot_eager"
    tcompile.check_compile(args, "cpu")  # generates no code: no compiler needed


@pytest.mark.parametrize("checkpointing", [False, True])
def test_compile_keeps_the_state_dict_keys(checkpointing):
    """In place: the same state_dict keys. The report encoder is compiled only off its padding-free path (here
    under gradient checkpointing)."""
    model, loss = create_model("mlip-tiny"), MLIPLoss()
    model.set_grad_checkpointing(checkpointing)
    keys, loss_keys = list(model.state_dict()), list(loss.state_dict())
    state = tcompile.compile_for_training(model, loss, "eager")
    assert list(model.state_dict()) == keys and list(loss.state_dict()) == loss_keys
    assert ("model.text.forward" in state.compiled) == checkpointing
    assert state.compiled[-1] == "MLIPLoss (fullgraph)"
    assert tcompile.compile_for_training(create_model("mlip-tiny"), MLIPLoss(), "eager", world_size=2).compiled[-1] \
        == "MLIPLoss (graph breaks at the gathers)"


def test_the_record_without_compile_and_its_step_times():
    assert tcompile.compile_record(None, [1.0, 0.1]) == {"enabled": False}
    state = tcompile.CompileState(backend="inductor", compiled=["x"])
    record = tcompile.compile_record(state, [5.0, 2.0, 0.1, 0.1, 0.1, 0.1])
    assert record["first_step_s"] == 5.0 and record["steady_step_s"] == 0.1
    assert record["warmup_excess_s"] == pytest.approx(6.8)
