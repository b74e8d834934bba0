"""The synthetic preset fills only the flags left unset, and real data keeps the spec's defaults; bad
numbers are refused by the parser."""
import pytest

from mlip_fast.train.args import SPEC_LAMBDA_LOCAL, SYNTHETIC_PRESET, parse_args

BASE = ["--deepspeed_config", "ds.json"]


def test_synthetic_default_takes_the_preset():
    args = parse_args(BASE)
    for key, value in SYNTHETIC_PRESET.items():
        assert getattr(args, key) == value, key


def test_explicit_flags_win_over_the_preset():
    args = parse_args(BASE + ["--lambda-local", "0.5", "--steps", "7"])
    assert args.lambda_local == 0.5 and args.steps == 7


def test_real_data_keeps_the_spec_loss_weights():
    args = parse_args(BASE + ["--data", "/data/mimic/master.csv"])
    assert args.lambda_local == SPEC_LAMBDA_LOCAL == 1.0
    assert args.mask_ratio is None and args.steps is None  # the model config and one epoch decide


def test_bad_numbers_are_refused_naming_the_flag(capsys):
    for flag, value in (("--lr", "-0.01"), ("--lr", "0"), ("--lr", "nan"), ("--lambda-local", "nan"),
                        ("--lambda-sie", "-1"), ("--max-bad-fraction", "2")):
        with pytest.raises(SystemExit) as info:
            parse_args(BASE + [flag, value])
        assert info.value.code == 2
        assert flag in capsys.readouterr().err
    assert parse_args(BASE + ["--lr", "2e-3"]).lr == 2e-3
    assert parse_args(BASE).seed is None  # 0 for a new run, the checkpoint's for a resumed one


def test_values_that_used_to_fail_late_are_refused_in_one_line(capsys):
    """Each of these passed the parser and ended in a traceback (or a NaN stop) after the data was built."""
    for flag, value, says in (("--max-bad-fraction", "1.0", "must be in [0, 1)"), ("--epochs", "inf", "finite number > 0"),
                              ("--epochs", "nan", "finite number > 0"), ("--lr", "1e9", "learning rate in (0, 10]")):
        with pytest.raises(SystemExit) as info:
            parse_args(BASE + [flag, value])
        err = capsys.readouterr().err
        assert info.value.code == 2 and flag in err and says in err and len(err.strip().splitlines()) == 1, err
    assert parse_args(BASE + ["--max-bad-fraction", "0.5", "--lr", "10"]).lr == 10.0


def test_report_to_and_its_older_spelling(capsys):
    base = ["--deepspeed_config", "zero2_fp32"]
    assert parse_args(base).report_to == "none"
    assert parse_args([*base, "--report-to", "wandb"]).report_to == "wandb"
    assert parse_args([*base, "--tensorboard"]).report_to == "tensorboard"  # scripts written for --tensorboard
    with pytest.raises(SystemExit) as info:
        parse_args([*base, "--tensorboard", "--report-to", "wandb"])
    assert info.value.code == 2 and "--tensorboard and --report-to wandb disagree" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args([*base, "--report-to", "mlflow"])
    assert "argument --report-to: invalid choice: 'mlflow'" in capsys.readouterr().err


def test_local_matching_flags_set_the_model_config(capsys):
    from mlip_fast.models.config import ConfigError
    from mlip_fast.train.setup import model_config

    cfg = model_config(parse_args(BASE + ["--local-matching", "ot", "--ot-eps", "0.1", "--ot-iters", "20"]))
    assert (cfg.local_matching, cfg.ot_eps, cfg.ot_iters) == ("ot", 0.1, 20)
    assert model_config(parse_args(BASE)).local_matching == "ot"  # the synthetic preset's
    assert model_config(parse_args(BASE + ["--ot-iters", "20"])).ot_iters == 20
    real = BASE + ["--data", "/data/mimic/master.csv"]
    assert model_config(parse_args(real)).local_matching == "max"  # the method's matching on real data
    assert model_config(parse_args(BASE + ["--local-matching", "max"])).local_matching == "max"
    with pytest.raises(ConfigError, match="add --local-matching ot"):
        model_config(parse_args(real + ["--ot-iters", "20"]))  # an OT setting that would change nothing
    for flag, value in (("--local-matching", "sinkhorn"), ("--ot-eps", "0"), ("--ot-iters", "0")):
        with pytest.raises(SystemExit) as info:
            parse_args(BASE + [flag, value])
        assert info.value.code == 2 and flag in capsys.readouterr().err


def test_vit_registers_flag_sets_the_model_config_and_overrides_win(capsys):
    from mlip_fast.train.setup import model_config

    assert model_config(parse_args(BASE + ["--vit-registers", "3"])).vision.registers == 3
    both = parse_args(BASE + ["--vit-registers", "3", "--model-overrides", '{"vision": {"registers": 1}}'])
    assert model_config(both).vision.registers == 1
    with pytest.raises(SystemExit) as info:
        parse_args(BASE + ["--vit-registers", "-1"])
    assert info.value.code == 2 and "--vit-registers" in capsys.readouterr().err


def test_preset_ot_eps_only_with_ot_matching():
    assert parse_args(BASE).ot_eps == SYNTHETIC_PRESET["ot_eps"]
    args = parse_args(BASE + ["--local-matching", "max"])  # the preset's OT eps would contradict the matching
    assert args.local_matching == "max" and args.ot_eps is None
    assert parse_args(BASE + ["--ot-eps", "0.1"]).ot_eps == 0.1
