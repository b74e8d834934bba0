"""The logit scales are bounded by clamping their parameter after each optimizer step (open_clip), not in
forward: the training loop clamps right after the step, and under DeepSpeed the optimizer's fp32 copy of the
parameter is clamped too (otherwise the next step would write the unclamped copy back into the model)."""
import math

import pytest
import torch
from torch import nn

from mlip_fast.losses import LogitScale
from mlip_fast.train.loop import LOSS_KEYS, LoopContext, clamp_engine_logit_scales, train_loop
from mlip_fast.train.signals import StopRequest
from tests.process_group import free_port

BOUND = math.log(100.0)
BOUND_FP32 = torch.tensor(BOUND, dtype=torch.float32).item()


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = LogitScale(90.0, max_scale=100.0)


class _Engine:
    """What ``train_loop`` uses of a DeepSpeed engine, over a plain SGD step; records the parameter at every
    forward and right after every optimizer step."""

    def __init__(self, lr: float):
        self.module, self.device, self.lr = _Net(), torch.device("cpu"), lr
        self.optimizer = torch.optim.SGD(self.module.parameters(), lr=lr)
        self.at_forward, self.after_step = [], []

    def get_lr(self):
        return [self.lr]

    def train(self):
        self.module.train()

    def __call__(self, inputs, **kwargs):
        self.at_forward.append(self.module.scale.log_scale.item())
        return {"logit_scale_global": self.module.scale()}

    def backward(self, loss, **kwargs):
        loss.backward()

    def step(self):
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.after_step.append(self.module.scale.log_scale.item())

    def was_step_applied(self):
        return True


class _Reporter:
    def start_progress(self, *args, **kwargs):
        pass

    update_progress = close_progress = record = start_progress


def _criterion(logit_scale_global):
    # a loss that always wants a larger scale: every step pushes the parameter up by lr * scale
    total = -logit_scale_global
    return total, {k: total.detach() for k in LOSS_KEYS}


def _batches():
    keys = ("images", "input_ids", "attention_mask", "sentence_spans", "sentence_mask")
    while True:
        yield {k: torch.zeros(1, 2) for k in keys}


def test_loop_clamps_right_after_each_optimizer_step():
    engine = _Engine(lr=0.01)  # log(90) + 0.01 * 90 > log(100): every step overshoots the bound
    ctx = LoopContext(engine=engine, criterion=_criterion, batches=_batches(), reporter=_Reporter(), stop=StopRequest(),
                      seed=0, rank=0, world_size=1, accumulation=1, global_batch=1, steps_per_epoch=10, total_steps=3,
                      start_step=0, dtype=torch.float32)
    train_loop(ctx)
    assert len(engine.after_step) == 3 and all(v > BOUND + 0.1 for v in engine.after_step)
    assert engine.at_forward[0] == pytest.approx(math.log(90.0), rel=1e-7)
    assert engine.at_forward[1:] == [BOUND_FP32, BOUND_FP32]  # clamped before the next step's forward
    assert engine.module.scale.log_scale.item() == BOUND_FP32  # and after the last one


def _engine(deepspeed, stage: int, bf16: bool):
    """A DeepSpeed engine over a logit scale and a small linear layer, AdamW at lr 0.1."""
    net = _Net()
    net.lin = nn.Linear(2, 2)
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": stage},
              "bf16": {"enabled": bf16},
              "optimizer": {"type": "AdamW", "params": {"lr": 0.1, "weight_decay": 0.0, "torch_adam": True}}}
    engine, _, _, _ = deepspeed.initialize(model=net, model_parameters=net.parameters(), config=config)
    return engine


def _zero_gradient_step(engine, dtype: torch.dtype) -> None:
    """One optimizer step whose gradients are all zero (Adam's first update is then 0)."""
    engine.train()
    loss = engine.module.scale() * 0.0 + engine.module.lin(torch.ones(1, 2, dtype=dtype)).sum() * 0.0
    engine.backward(loss)
    engine.step()


@pytest.mark.parametrize("stage,precision", [(2, "fp32"), (3, "bf16")])
def test_engine_clamp_reaches_the_optimizer_copy(stage, precision, one_process_world):
    """ZeRO-2 (fp32 partitions of the parameters) and ZeRO-3 (bf16 model, partitioned parameters): after the
    clamp, a step with zero gradient (Adam's first update is then 0) leaves the model at the bound, which it
    only does when the optimizer's fp32 copy was clamped as well."""
    deepspeed = pytest.importorskip("deepspeed")
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    engine = _engine(deepspeed, stage, bf16=precision == "bf16")
    param = engine.module.scale.log_scale
    safe_set_full_fp32_param(param, torch.full((1,), 7.0))  # as if the last step went far above the bound
    clamp_engine_logit_scales(engine.module)
    assert safe_get_full_fp32_param(param).item() == BOUND_FP32
    _zero_gradient_step(engine, param.dtype)
    assert safe_get_full_fp32_param(param).item() == BOUND_FP32
    assert engine.module.scale().float().item() == pytest.approx(100.0, rel=1e-2 if precision == "bf16" else 1e-6)


def _two_ranks(rank: int, port: int, stage: int, failures) -> None:
    """One rank of a 2-process gloo group. ZeRO-3 partitions the 1-element logit-scale parameter into one value
    on rank 0 and one padding value on rank 1 (DeepSpeed's full-parameter setter cannot write such a
    parameter from rank 1, which is why the clamp works on each rank's own partitions); ZeRO-2 puts it in one
    rank's fp32 partition while both ranks hold the model's full parameter."""
    import os

    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param, safe_set_local_fp32_param

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    try:
        deepspeed.init_distributed(dist_backend="gloo", verbose=False)
        torch.manual_seed(0)
        engine = _engine(deepspeed, stage, bf16=True)
        param = engine.module.scale.log_scale
        # as if the last step went far above the bound, in both copies and on both ranks
        with torch.no_grad():
            if stage == 3:
                safe_set_local_fp32_param(param, torch.full((param.ds_tensor.numel(),), 7.0))
                param.ds_tensor.data.fill_(7.0)
            else:
                safe_set_full_fp32_param(param, torch.full((1,), 7.0))  # the owning rank's fragment
                param.data.fill_(7.0)
        clamp_engine_logit_scales(engine.module)
        assert safe_get_full_fp32_param(param).item() == BOUND_FP32
        _zero_gradient_step(engine, torch.bfloat16)
        clamp_engine_logit_scales(engine.module)
        assert safe_get_full_fp32_param(param).item() == BOUND_FP32
        assert engine.module.scale().float().item() == pytest.approx(100.0, rel=1e-2)
        dist.barrier()
    except BaseException as e:  # noqa: BLE001  (reported to the parent, which fails the test)
        failures.put(f"rank {rank}: {type(e).__name__}: {e}")
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.parametrize("stage", [2, 3])
def test_engine_clamp_two_processes(stage):
    """ZeRO-2 and ZeRO-3 over 2 gloo processes (the layout ``deepspeed --num_gpus 2`` trains with): the clamp
    reaches the fp32 partition and the model's, and the next step keeps the bound."""
    pytest.importorskip("deepspeed")
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    failures = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_two_ranks, args=(rank, port, stage, failures)) for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    reported = []
    while not failures.empty():
        reported.append(failures.get())
    assert not reported and all(p.exitcode == 0 for p in procs), (reported, [p.exitcode for p in procs])
