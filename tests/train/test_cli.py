"""The training app's command line: shipped DeepSpeed configs by name, the open_clip-style flags mapped onto
the ds config and checked with it, usage errors found before any slow work (one line, exit 2), clean help
texts that show every effective default (the ds config's values included), --version, the mlip-train argument
split with DeepSpeed's own launcher options, and a run logger that propagates to the user's logging set-up."""
import argparse
import logging
import subprocess
import sys

import pytest

from mlip_fast.data.sources import DataConfigError
from mlip_fast.models.config import ConfigError
from mlip_fast.train import ds_config as dsc
from mlip_fast.train.args import build_parser, parse_args
from mlip_fast.train.launch import launcher_options, split_argv
from mlip_fast.train.setup import preflight
from mlip_fast.train.reporting import LOGGER_NAME, RunReporter
from tests.train.conftest import REPO, clean_env, write_ds


def checked(*argv):
    """preflight of a command line on CPU: (ds config, model config, changes)."""
    return preflight(parse_args(list(argv)), "cpu")


def test_shipped_configs_by_name_and_flags_mapped_onto_them():
    assert {"zero1", "zero2", "zero2_fp32", "zero3", "zero3_fp32"} <= set(dsc.shipped_ds_configs())
    assert dsc.resolve_ds_config("zero3") == dsc.SHIPPED_DIR / "zero3.json"
    assert dsc.resolve_ds_config("zero3.json") == dsc.SHIPPED_DIR / "zero3.json"
    config, model_cfg, changes = checked("--deepspeed_config", "zero2", "--batch-size", "6", "--precision", "fp32",
                                         "--wd", "0.2", "--warmup", "7", "--accum-freq", "2")
    assert config["train_micro_batch_size_per_gpu"] == 6 and "train_batch_size" not in config
    assert config["bf16"]["enabled"] is False and dsc.precision_dtype(config) is not None
    assert config["optimizer"]["params"]["weight_decay"] == 0.2
    assert config["scheduler"]["params"]["warmup_num_steps"] == 7 and config["gradient_accumulation_steps"] == 2
    # the global batch follows the per-process batch: 6 x 2 accumulation x 3 processes
    assert dsc.resolve_batch_sizes(config, 3)["train_batch_size"] == 36
    assert "bf16.enabled: True -> False" in changes and "train_batch_size: 64 -> derived" in changes
    assert model_cfg.name == "mlip-tiny"
    config, _, _ = checked("--deepspeed_config", "zero2_fp32", "--precision", "bf16")
    assert str(dsc.precision_dtype(config)) == "torch.bfloat16"
    assert checked("--deepspeed_config", "ds.json")[2] == []  # no flag, no change


@pytest.mark.parametrize("argv, error, match", [
    (["--model", "nope"], ConfigError, "unknown model 'nope'; shipped models: mlip-small, mlip-tiny"),
    (["--model", "missing.json"], ConfigError, "model config file 'missing.json' does not exist"),
    (["--model-overrides", '{"vision": {"widht": 3}}'], ConfigError, "unknown keys \\['widht'\\]"),
    (["--mask-ratio", "1.0"], ConfigError, "mask_ratio must be in \\[0, 1\\), got 1.0"),
    (["--model-overrides", '{"max_logit_scale": Infinity}'], ConfigError,
     "max_logit_scale must be a finite number in \\(0, inf\\), got inf"),
    (["--model-overrides", '{"init_logit_scale": "NaN"}'], ConfigError,
     "init_logit_scale must be a finite number in \\(0, inf\\), got 'NaN'"),
    (["--model-overrides", '{"text": {"dropout": NaN}}'], ConfigError, "text.dropout must be a finite number in \\[0, 1\\)"),
    (["--model-overrides", '{"text": {"attention_dropout": 1.5}}'], ConfigError,
     "text.attention_dropout must be a finite number in \\[0, 1\\)"),
    (["--pretrained", "/no/such/vit.safetensors"], ConfigError, "--pretrained '/no/such/vit.safetensors' does not exist"),
    (["--precision", "fp16"], dsc.DSConfigError, "fp16 is enabled but this run is on cpu"),
    (["--data", "/no/such/master.csv"], DataConfigError, "--data /no/such/master.csv: no such file or folder"),
    (["--deepspeed_config", "zero9"], dsc.DSConfigError, "'zero9' does not exist.*zero1, zero2"),
    (["--deepspeed_config", "zero2_fp16_gpu"], dsc.DSConfigError, "needs a CUDA GPU"),
])
def test_usage_errors_before_any_slow_work(argv, error, match):
    base = ["--deepspeed_config", "zero2_fp32"] if "--deepspeed_config" not in argv else []
    with pytest.raises(error, match=match):
        checked(*base, *argv)


def test_text_dropout_flags_set_the_hidden_and_attention_dropouts():
    _, cfg, _ = checked("--deepspeed_config", "zero2_fp32", "--text-dropout", "0.2", "--text-attention-dropout", "0")
    assert (cfg.text.dropout, cfg.text.attention_dropout) == (0.2, 0.0)
    _, cfg, _ = checked("--deepspeed_config", "zero2_fp32", "--text-dropout", "0.2")
    assert (cfg.text.dropout, cfg.text.attention_dropout) == (0.2, None)  # None: the same as the hidden states'
    _, cfg, _ = checked("--deepspeed_config", "zero2_fp32", "--text-attention-dropout", "0",
                        "--model-overrides", '{"text": {"attention_dropout": 0.05}}')
    assert cfg.text.attention_dropout == 0.05  # the JSON overrides win, as for text.dropout
    with pytest.raises(SystemExit):
        parse_args(["--text-attention-dropout", "1"])


def test_flags_the_config_cannot_take_are_refused(tmp_path, capsys):
    no_scheduler = write_ds(tmp_path / "plain.json", scheduler=None)
    with pytest.raises(dsc.DSConfigError, match="--warmup .* no 'scheduler' section"):
        checked("--deepspeed_config", str(no_scheduler), "--warmup", "5")
    one_cycle = write_ds(tmp_path / "cycle.json", scheduler={"type": "OneCycle", "params": {"cycle_max_lr": 0.01}})
    with pytest.raises(dsc.DSConfigError, match="--warmup needs a scheduler with warmup_num_steps"):
        checked("--deepspeed_config", str(one_cycle), "--warmup", "5")
    with pytest.raises(dsc.DSConfigError, match="warmup_num_steps \\(30\\) must be below the run's 20 steps"):
        dsc.resolve_schedule(checked("--deepspeed_config", "zero2", "--warmup", "30")[0], 20)
    for argv, flag in ((["--warmup", "9", "--steps", "9"], "--warmup 9 must be below --steps 9"),
                       (["--batch-size", "0"], "--batch-size"), (["--precision", "fp64"], "--precision"),
                       (["--wd", "-1"], "--wd"), ([], "--deepspeed_config is required")):
        with pytest.raises(SystemExit) as info:
            parse_args([*(["--deepspeed_config", "zero2"] if argv else []), *argv])
        err = capsys.readouterr().err
        assert info.value.code == 2 and flag in err and len(err.strip().splitlines()) == 1, err


def test_unknown_model_through_the_module_entry_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mlip_fast.train", "--deepspeed_config", "zero2", "--model", "nope",
                           "--output-dir", str(tmp_path / "run")], cwd=REPO, env=clean_env(), capture_output=True,
                          text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: unknown model 'nope'; shipped models:")
    assert not (tmp_path / "run").exists()


def test_help_is_clean():
    parser = build_parser(prog="mlip-train")
    text = parser.format_help()
    assert "(default: None)" not in text and "(default: False)" not in text and "deepscale" not in text
    flat = " ".join(text.split())
    assert flat.count("(default 6000)") == 1 and "(default 6000) (default" not in flat
    assert "generator (default: 0)" in flat  # a default of 0 is shown (0 == False must not hide it)
    for action in parser._actions:
        if action.option_strings and action.help is not argparse.SUPPRESS:
            assert action.help, f"{action.option_strings} has no help"
    for flag in ("--batch-size", "--precision", "--wd", "--warmup", "--lock-image", "--lock-text", "zero2_fp32"):
        assert flag in text


def test_mlip_train_splits_launcher_and_training_arguments():
    launcher, training = split_argv(["--num_gpus", "2", "--deepspeed_config", "zero3", "--master_port=29511",
                                     "--batch-size", "8", "--no_ssh_check", "-H", "hosts", "--steps", "5"])
    assert launcher == ["--num_gpus", "2", "--master_port=29511", "--no_ssh_check", "-H", "hosts"]
    assert training == ["--deepspeed_config", "zero3", "--batch-size", "8", "--steps", "5"]
    with_value, switches = launcher_options()  # read from DeepSpeed's own parser, not a copied list
    assert {"--num_gpus", "--num_nodes", "--hostfile", "-H", "--master_addr", "--include"} <= set(with_value)
    assert {"--no_ssh_check", "--force_multi", "--save_pid"} <= set(switches)
    assert "--module" not in with_value and "--no_python" not in switches  # mlip-train sets those itself


def test_help_shows_the_ds_config_values_and_the_model_error_comes_first(capsys):
    text = build_parser(prog="mlip-train", argv=["--deepspeed_config", "zero3"]).format_help()
    rows = [" ".join(line.split()) for line in text.splitlines()]
    assert "zero3 (--deepspeed_config) 64 global 0.002 0.05 auto (5% of the run) bf16 3" in rows
    assert "zero2_fp32 64 global 0.002 0.05 auto (5% of the run) fp32 2" in rows
    flat = " ".join(text.split())
    for flag, default in (("--batch-size", "default: the ds config's train_micro_batch_size_per_gpu"),
                          ("--precision", "default: the ds config's bf16 / fp16 sections"),
                          ("--wd", "default: the ds config's optimizer.params.weight_decay"),
                          ("--warmup", "default: the ds config's scheduler.params.warmup_num_steps"),
                          ("--lr", "default: the ds config's optimizer.params.lr"),
                          ("--report-to", "(default: none)"), ("--num-workers", "(default: 2)")):
        described = flat[flat.index(f" {flag} ", flat.index("options:")):]  # past the usage line
        assert default in described[:400], flag
    with pytest.raises(SystemExit) as info:
        parse_args(["--model", "nope"])  # no DeepSpeed config either: the model is named first
    err = capsys.readouterr().err
    assert info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "error: unknown model 'nope'; shipped models:" in err


def test_help_and_version_print_no_deepspeed_warning(capsys):
    """--help of mlip-train (which lists DeepSpeed's launcher options) and of the evaluation CLI import nothing that
    prints DeepSpeed's accelerator guess; versions come from package metadata."""
    outputs = []
    for cmd in ([sys.executable, "-m", "mlip_fast.train.launch", "--help"],
                [sys.executable, "-m", "mlip_fast.eval", "zeroshot", "--help"]):
        proc = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert "Setting accelerator" not in proc.stdout + proc.stderr and "[WARNING]" not in proc.stdout + proc.stderr
        outputs.append(" ".join(proc.stdout.split()))
    launch, evaluate = outputs
    assert "launcher options (DeepSpeed's, passed to `deepspeed`): " in launch and "--num_gpus" in launch
    for shown in ("images per forward pass (default: 32)", "sampling, few-shot subsets and training (default: 0)",
                  "in 'combined' (default: 0.5)", "or all three (default: all)"):
        assert shown in evaluate, shown
    with pytest.raises(SystemExit) as info:
        build_parser(prog="mlip-train").parse_args(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("mlip_fast 0.1.0 (python ")
