"""DeepSpeed config checks: every mistake is reported with its key before anything starts."""
import json

import pytest

from mlip_fast.train import ds_config as dsc
from tests.train.conftest import BASE_DS, REPO


def config(**changes):
    c = json.loads(json.dumps(BASE_DS))
    c.update(changes)
    return c


def test_shipped_configs_are_valid_on_cpu():
    paths = [REPO / "ds.json", *sorted((REPO / "mlip_fast/train/ds_configs").glob("*.json"))]
    names = {p.name for p in paths}
    assert {"ds.json", "zero1.json", "zero2.json", "zero3.json", "zero2_fp16_gpu.json"} <= names
    for path in paths:
        cfg = dsc.load_ds_config(path)
        assert cfg["optimizer"]["params"]["torch_adam"] is True
        assert cfg["optimizer"]["params"]["fused"] is True  # torch's one-pass AdamW kernel (test_fused_adamw_...)
        assert tuple(cfg["optimizer"]["params"]["betas"]) == (0.9, 0.95)
        assert cfg["optimizer"]["params"]["weight_decay"] == 0.05
        assert cfg["gradient_clipping"] > 0
        if path.name == "zero2_fp16_gpu.json":
            with pytest.raises(dsc.DSConfigError, match="fp16.*needs a CUDA GPU"):
                dsc.validate_ds_config(cfg, device_type="cpu")
            dsc.validate_ds_config(cfg, device_type="cuda")
        else:
            dsc.validate_ds_config(cfg, device_type="cpu")
    assert dsc.load_ds_config(REPO / "ds.json")["zero_optimization"]["stage"] == 2


@pytest.mark.parametrize("changes, match", [
    ({"train_batch_sise": 8}, r"unknown top-level key 'train_batch_sise' \(did you mean 'train_batch_size'\?\)"),
    ({"zero_optimization": {"stage": 2, "overlap_com": True}}, r"invalid 'zero_optimization'.*overlap_com"),
    ({"bf16": {"enabled": True, "loss_scale": 1}}, r"invalid 'bf16'.*loss_scale"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "beta": [0.9, 0.95]}}},
     r"unknown AdamW optimizer parameter 'beta' \(did you mean 'betas'\?\)"),
    ({"optimizer": {"type": "AdamQ", "params": {"lr": 1e-3}}}, r"unknown optimizer type 'AdamQ'"),
    ({"optimizer": {"type": "AdamW", "params": {"betas": [0.9, 0.95]}}}, r"optimizer.params.lr is required"),
    ({"scheduler": {"type": "WarmupCosineLR", "params": {"warmup_steps": 10}}},
     r"unknown WarmupCosineLR scheduler parameter 'warmup_steps'"),
    ({"scheduler": {"type": "CosineLR", "params": {}}}, r"unknown scheduler type 'CosineLR'"),
    ({"fp16": {"enabled": True}}, r"fp16 is enabled but this run is on cpu"),
    ({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, r"fp16 and bf16 are both enabled"),
    ({"gradient_clipping": -1}, r"gradient_clipping must be a finite number >= 0, got -1"),
    ({"gradient_clipping": float("nan")}, r"gradient_clipping must be a finite number >= 0, got nan"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": -0.001}}}, r"optimizer.params.lr must be a learning rate in \(0, 10\], got -0.001"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 0}}}, r"optimizer.params.lr must be a learning rate in \(0, 10\], got 0"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": "0.002"}}},
     r"optimizer.params.lr must be a learning rate in \(0, 10\], got '0.002' \(a string\)"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": float("inf")}}}, r"optimizer.params.lr must be a learning rate in \(0, 10\]"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 1e9}}}, r"optimizer.params.lr must be a learning rate in \(0, 10\], got 1000000000.0"),
    ({"scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": 100.0}}},
     r"scheduler.params.warmup_max_lr must be a learning rate in \(0, 10\], got 100.0"),
    ({"scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 11.0}}},
     r"scheduler.params.warmup_min_lr must be a learning rate in \[0, 10\], got 11.0"),
    ({"scheduler": {"type": "OneCycle", "params": {"cycle_min_lr": 0.0, "cycle_max_lr": 1e3, "cycle_first_step_size": 5}}},
     r"scheduler.params.cycle_max_lr must be a learning rate in \(0, 10\], got 1000.0"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 1.5]}}}, r"optimizer.params.betas must be two numbers in \[0, 1\)"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "eps": -1e-8}}}, r"optimizer.params.eps must be a finite number > 0"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": float("nan")}}}, r"optimizer.params.weight_decay must be a finite number >= 0, got nan"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "amsgrad": "yes"}}}, r"optimizer.params.amsgrad must be true or false, got 'yes' \(a string\)"),
    ({"optimizer": {"type": "Lamb", "params": {"lr": True}}}, r"optimizer.params.lr must be a learning rate in \(0, 10\], got true"),
    ({"scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": "auto", "cos_min_ratio": 2.0}}},
     r"scheduler.params.cos_min_ratio must be a number in \[0, 1\], got 2.0"),
    ({"scheduler": {"type": "WarmupCosineLR", "params": {"warmup_type": "cosine"}}}, r"scheduler.params.warmup_type must be 'log' or 'linear'"),
    ({"scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": -1.0}}}, r"scheduler.params.warmup_max_lr must be a learning rate in \(0, 10\]"),
    ({"scheduler": {"type": "OneCycle", "params": {"cycle_min_lr": 0.0, "cycle_max_lr": 0.1, "cycle_first_step_size": 0}}},
     r"scheduler.params.cycle_first_step_size must be an int > 0, got 0"),
    ({"scheduler": {"type": "LRRangeTest", "params": {"lr_range_test_step_rate": float("nan")}}},
     r"scheduler.params.lr_range_test_step_rate must be a finite number >= 0, got nan"),
    ({"checkpoint": {"use_node_local_storage": True}}, r"use_node_local_storage is not supported"),
    ({"zero_optimization": {"stage": 4}}, r"stage"),
])
def test_bad_configs_name_the_problem(changes, match):
    with pytest.raises(dsc.DSConfigError, match=match):
        dsc.validate_ds_config(config(**changes), device_type="cpu")


def test_load_errors(tmp_path):
    with pytest.raises(dsc.DSConfigError, match="does not exist"):
        dsc.load_ds_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{\"train_batch_size\": 8,}")
    with pytest.raises(dsc.DSConfigError, match="not valid JSON"):
        dsc.load_ds_config(bad)


@pytest.mark.parametrize("given, world, expected", [
    ({"train_batch_size": 32}, 1, (32, 32, 1)),
    ({"train_batch_size": 32}, 2, (32, 16, 1)),
    ({"train_batch_size": 32, "gradient_accumulation_steps": 2}, 2, (32, 8, 2)),
    ({"train_micro_batch_size_per_gpu": 4}, 2, (8, 4, 1)),
    ({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 3}, 2, (24, 4, 3)),
    ({"train_batch_size": 24, "train_micro_batch_size_per_gpu": 4}, 2, (24, 4, 3)),
    ({"train_batch_size": 24, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 3}, 2, (24, 4, 3)),
])
def test_batch_sizes_follow_the_world_size(given, world, expected):
    out = dsc.resolve_batch_sizes(given, world)
    got = (out["train_batch_size"], out["train_micro_batch_size_per_gpu"], out["gradient_accumulation_steps"])
    assert got == expected
    assert got[0] == got[1] * got[2] * world


@pytest.mark.parametrize("given, world, match", [
    ({"train_batch_size": 30}, 4, r"not divisible by gradient_accumulation_steps \(1\) x world size \(4\)"),
    ({"train_batch_size": 24, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2}, 2,
     r"train_batch_size \(24\) != train_micro_batch_size_per_gpu \(4\) x gradient_accumulation_steps \(2\) x world size \(2\)"),
    ({"gradient_accumulation_steps": 2}, 1, r"set train_batch_size or train_micro_batch_size_per_gpu"),
    ({"train_batch_size": 0}, 1, r"must be a positive int"),
])
def test_inconsistent_batch_sizes(given, world, match):
    with pytest.raises(dsc.DSConfigError, match=match):
        dsc.resolve_batch_sizes(given, world)


def test_schedule_auto_follows_the_run_length():
    out = dsc.resolve_schedule(config(), total_steps=400)
    params = out["scheduler"]["params"]
    assert params["total_num_steps"] == 400
    assert params["warmup_num_steps"] == round(dsc.WARMUP_FRACTION * 400)
    assert dsc.resolve_schedule(config(), total_steps=3)["scheduler"]["params"]["warmup_num_steps"] == 2
    fixed = config(scheduler={"type": "WarmupCosineLR", "params": {"total_num_steps": 50, "warmup_num_steps": 5}})
    assert dsc.resolve_schedule(fixed, total_steps=400)["scheduler"]["params"] == {"total_num_steps": 50,
                                                                                  "warmup_num_steps": 5}


def test_a_range_test_schedule_may_not_climb_past_the_largest_learning_rate():
    """LRRangeTest raises the rate without bound: the rate of the run's last step is checked once the run's length
    is known (a jump to 1e6 at step 8 turned the loss NaN two steps later)."""
    jump = config(scheduler={"type": "LRRangeTest", "params": {"lr_range_test_min_lr": 1e-3, "lr_range_test_step_size": 8,
                                                              "lr_range_test_step_rate": 1e9,
                                                              "lr_range_test_staircase": True}})
    dsc.validate_ds_config(jump, device_type="cpu")  # every value is in range by itself
    assert dsc.resolve_schedule(jump, total_steps=8)["scheduler"]["type"] == "LRRangeTest"  # steps 1-8 at 1e-3
    with pytest.raises(dsc.DSConfigError, match=r"LRRangeTest reaches a learning rate of 1e\+06 by step 9; learning "
                                                 r"rates must be in \(0, 10\]"):
        dsc.resolve_schedule(jump, total_steps=9)


def test_fused_adamw_through_the_engine_is_plain_adamw(one_process_world):
    """ds.json's optimizer section builds torch's AdamW with ``fused=True`` inside the ZeRO engine (one pass over the
    flat fp32 partition instead of about ten element-wise ops; docs/training.md, "Where the time goes"), and its
    steps give the parameters of a plain (for-loop) torch AdamW with the same hyper-parameters and gradients, to
    fp32 rounding, over three steps (no schedule, no clipping: the optimizer alone)."""
    deepspeed = pytest.importorskip("deepspeed")
    import torch

    cfg = dsc.load_ds_config(REPO / "ds.json")
    cfg = {k: v for k, v in cfg.items() if k != "scheduler"} | {"train_batch_size": 4, "gradient_clipping": 0.0}
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    ref = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    ref.load_state_dict(net.state_dict())
    params = {k: v for k, v in cfg["optimizer"]["params"].items() if k not in ("torch_adam", "fused")}
    ref_opt = torch.optim.AdamW(ref.parameters(), foreach=False, fused=False, **params)
    engine, _, _, _ = deepspeed.initialize(model=net, model_parameters=net.parameters(), config=cfg)
    inner = engine.optimizer.optimizer if hasattr(engine.optimizer, "optimizer") else engine.optimizer
    assert isinstance(inner, torch.optim.AdamW) and inner.defaults["fused"] is True
    for step in range(3):
        x = torch.randn(4, 6)
        engine.backward(engine(x).square().mean())
        engine.step()
        ref_opt.zero_grad()
        ref(x).square().mean().backward()
        ref_opt.step()
    for (name, p), q in zip(engine.module.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6), name
