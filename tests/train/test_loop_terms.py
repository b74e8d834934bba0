"""The loop logs each loss term the criterion returns: the four of every run, and the within-report term
(``loss_within``) when ``--lambda-within`` > 0 makes the criterion return it."""
import pytest
import torch

from mlip_fast.train.loop import LOSS_KEYS, LoopContext, train_loop
from mlip_fast.train.signals import StopRequest
from tests.train.test_logit_scale_clamp import _batches, _Engine


class _Recorder:
    def __init__(self):
        self.train = []

    def start_progress(self, *args, **kwargs):
        pass

    update_progress = close_progress = start_progress

    def record(self, kind, **fields):
        if kind == "train":
            self.train.append(fields)


def _run(with_within: bool):
    def criterion(logit_scale_global):
        total = -logit_scale_global
        terms = {k: total.detach() + i for i, k in enumerate(LOSS_KEYS)}
        if with_within:
            terms["loss_within"] = total.detach() * 0 + 0.25
        return total, terms

    reporter = _Recorder()
    ctx = LoopContext(engine=_Engine(lr=0.0), criterion=criterion, batches=_batches(), reporter=reporter,
                      stop=StopRequest(), seed=0, rank=0, world_size=1, accumulation=1, global_batch=1,
                      steps_per_epoch=10, total_steps=3, start_step=0, dtype=torch.float32)
    return train_loop(ctx), reporter.train


@pytest.mark.parametrize("with_within", [False, True])
def test_loop_logs_the_terms_the_criterion_returns(with_within):
    result, records = _run(with_within)
    assert len(records) == 3
    expected = set(LOSS_KEYS) | ({"loss_within"} if with_within else set())
    assert set(result.mean_terms) == set(result.last_terms) == expected
    for record in records:
        assert ("loss_within" in record) == with_within
        assert record["loss_sie"] == pytest.approx(record["loss"] + 3)  # each term under its own name
    if with_within:
        assert [r["loss_within"] for r in records] == [0.25] * 3 and result.mean_terms["loss_within"] == 0.25
