"""The synthetic preset fills only the flags left unset, and real data keeps the spec's defaults."""
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
