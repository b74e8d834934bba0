"""Contrastive-correct gradient accumulation: the loss and every parameter gradient of N micro-batches
equal those of one batch of N x the size, in float64 on 1 and 2 gloo processes.

Two references. Without masking and dropout the model has no randomness, so the reference is literally
one forward of the N x b batch (tokenized together, so its T and S padding differ from the micro-batches':
padding must not matter). With masking and dropout the micro-batches draw their own randomness, so the
reference is the same micro-batch forwards kept in one autograd graph, concatenated and back-propagated
once: what accumulation must equal without holding N micro-batches of activations.

Tolerance: float64 with a different summation order (per-micro-batch vs whole-batch reductions) differs
by ~1e-15 relative; ``rtol=1e-9`` leaves a wide margin yet is ~1e12 times below the effect of using the
micro-batch's negatives only (checked: plain per-micro-batch accumulation misses the loss by > 0.1).
"""
from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mlip_fast.losses import MLIPLoss
from mlip_fast.models import create_model, get_tokenizer
from mlip_fast.preprocess.tokenization import tokenize_reports
from mlip_fast.train.accum import CachedLoss, ReplayMismatchError, accumulate, cache_outputs, concat_outputs
from mlip_fast.train.ds_config import DSConfigError, apply_accum_freq, resolve_batch_sizes
from mlip_fast.train.main import train
from tests.train.conftest import (DETERMINISTIC, REPO, TRAIN_PY, base_args, clean_env, seed_run_dir, train_records,
                                  write_ds)
from tests.process_group import free_port

N_MICRO, MICRO, WORLD = 3, 3, 2
RTOL, ATOL = 1e-9, 1e-12
TINY = dict(vision={"image_size": 32, "patch_size": 8, "width": 32, "depth": 1, "heads": 2},
            text={"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64, "max_sentences": 6},
            embed_dim=16, sie_hidden=8)
SENTENCES = ["The heart is enlarged.", "No pleural effusion.", "There is a small left pneumothorax.",
             "Patchy opacity at the right base.", "Lungs are clear.", "Mild pulmonary edema is present.",
             "No focal consolidation."]


def _model(dropout: float):
    torch.manual_seed(0)
    model = create_model("mlip-tiny", tokenizer=get_tokenizer("mlip-tiny"),
                         **{**TINY, "text": {**TINY["text"], "dropout": dropout}})
    return model.double().train()


def _reports(n: int, offset: int) -> list[str]:
    """Reports of 1 - 4 sentences, so S and T differ between micro-batches."""
    return [" ".join(SENTENCES[(offset + i + j) % len(SENTENCES)] for j in range(1 + (offset + i) % 4)) for i in range(n)]


def _batch(model, images: torch.Tensor, reports: list[str]) -> dict:
    text = tokenize_reports(model.tokenizer, reports, model.config.text.max_length, model.config.text.max_sentences)
    return {"images": images, **text}


def _data(rank: int, world: int):
    """Every rank's micro-batches [(images, reports)] (the same on every process; rank r uses its own)."""
    g = torch.Generator().manual_seed(7)
    out = []
    for r in range(world):
        micro = []
        for m in range(N_MICRO):
            images = torch.randn(MICRO, 1, 32, 32, generator=g, dtype=torch.float64)
            micro.append((images, _reports(MICRO, 5 * r + 2 * m)))
        out.append(micro)
    return out[rank]


def _grads(model) -> dict:
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


def _average_over_ranks(grads: dict) -> dict:
    if dist.is_initialized():
        for g in grads.values():
            dist.all_reduce(g)
            g /= dist.get_world_size()
    return grads


def _run(case: str, rank: int = 0, world: int = 1) -> dict:
    """{"accum": (terms, grads), "reference": (terms, grads), "plain": loss} for one process of ``world``.

    case "exact": no masking, no dropout; reference = one forward of the concatenated micro-batches.
    case "masked": mask ratio 0.5 and dropout; reference = the micro-batch forwards in one graph."""
    masked = case == "masked"
    model = _model(0.1 if masked else 0.0)
    criterion = MLIPLoss(lambda_local=1.0, lambda_sie=0.1, impl="reference")
    micro = _data(rank, world)
    batches = [_batch(model, images, reports) for images, reports in micro]
    seeds = [1000 * rank + 17 * m + 3 for m in range(N_MICRO)]

    def forward(m: int) -> dict:
        torch.manual_seed(seeds[m])
        return model(batches[m], mask_ratio=0.5 if masked else 0.0, seed=seeds[m])

    result = {}
    model.zero_grad(set_to_none=True)
    total, terms = accumulate(forward, criterion, N_MICRO)
    result["accum"] = ({k: float(v) for k, v in terms.items()}, _average_over_ranks(_grads(model)))

    model.zero_grad(set_to_none=True)
    if masked:
        merged = concat_outputs([forward(m) for m in range(N_MICRO)])
    else:
        images = torch.cat([images for images, _ in micro])
        merged = model(_batch(model, images, [r for _, reports in micro for r in reports]), mask_ratio=0.0)
    ref_total, ref_terms = criterion(**merged)
    ref_total.backward()
    result["reference"] = ({k: float(v) for k, v in ref_terms.items()}, _average_over_ranks(_grads(model)))

    # plain accumulation (the mean of per-micro-batch losses) for contrast
    with torch.no_grad():
        result["plain"] = sum(float(criterion(**forward(m))[0]) for m in range(N_MICRO)) / N_MICRO
    return result


def _assert_equal(result: dict) -> None:
    (terms, grads), (ref_terms, ref_grads) = result["accum"], result["reference"]
    for k, v in ref_terms.items():
        assert terms[k] == pytest.approx(v, rel=RTOL, abs=ATOL), k
    assert abs(result["plain"] - ref_terms["loss"]) > 0.1, "plain accumulation should differ: the test could not fail"
    assert set(grads) == set(ref_grads)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")
    # every parameter takes part, except the estimator's layers behind its zero-initialised output layer
    zero = {name for name, g in ref_grads.items() if not g.abs().max() > 0}
    assert all(name.startswith(("visual.estimator.norm.", "visual.estimator.fc1.")) for name in zero), zero


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread avoids the oversubscription of a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("case", ["exact", "masked"])
def test_accumulation_equals_one_large_batch(case, one_thread):
    _assert_equal(_run(case))


def test_variable_sentence_counts_are_padded(one_thread):
    model = _model(0.0)
    micro = _data(0, 1)
    cached = cache_outputs(lambda m: model(_batch(model, *micro[m]), mask_ratio=0.0), N_MICRO)
    counts = [o["sentences"].shape[1] for o in cached]
    assert len(set(counts)) > 1, "the micro-batches should have different sentence counts"
    merged = concat_outputs(cached)
    assert merged["sentences"].shape[:2] == (N_MICRO * MICRO, max(counts))
    assert int(merged["sentence_mask"].sum()) == sum(int(o["sentence_mask"].sum()) for o in cached)


def test_replay_mismatch_is_refused(one_thread):
    model = _model(0.1)
    batches = [_batch(model, *mb) for mb in _data(0, 1)]
    criterion = MLIPLoss(impl="reference")
    loss = CachedLoss(cache_outputs(lambda m: model(batches[m], mask_ratio=0.5, seed=m), N_MICRO), criterion)
    loss.backward()
    with pytest.raises(ReplayMismatchError, match="kept other patches"):
        loss.surrogate(0, model(batches[0], mask_ratio=0.5, seed=99))
    with pytest.raises(RuntimeError, match="already called"):
        loss.backward()


@pytest.mark.parametrize("config, world, expected", [
    # a global batch is the contrastive batch: it is kept, the micro-batch shrinks
    ({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 2}, 2, (32, 4, 4)),
    ({"train_batch_size": 32}, 1, (32, 8, 4)),
    # only a micro-batch: it is kept, the global batch grows
    ({"train_micro_batch_size_per_gpu": 8}, 2, (64, 8, 4)),
])
def test_accum_freq_sets_the_accumulation_steps(config, world, expected):
    out = resolve_batch_sizes(apply_accum_freq(config, 4), world)
    assert (out["train_batch_size"], out["train_micro_batch_size_per_gpu"], out["gradient_accumulation_steps"]) == expected
    assert apply_accum_freq(config, None) is config
    with pytest.raises(DSConfigError, match="positive int"):
        apply_accum_freq(config, 0)
    with pytest.raises(DSConfigError, match="not divisible"):
        resolve_batch_sizes(apply_accum_freq({"train_batch_size": 30}, 4), 1)


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {case: _run(case, rank, world) for case in ("exact", "masked")}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.barrier()
        dist.destroy_process_group()


@pytest.mark.slow
def test_accumulation_equals_one_large_batch_on_two_processes(tmp_path):
    mp.spawn(_worker, args=(WORLD, free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for results in ranks:
        for case in ("exact", "masked"):
            _assert_equal(results[case])
    # The ranks' mean loss and averaged gradient are one process's on all 2 x N x b rows.
    exact = [r["exact"] for r in ranks]
    model = _model(0.0)
    micro = [mb for r in range(WORLD) for mb in _data(r, WORLD)]
    rows = _batch(model, torch.cat([images for images, _ in micro]), [t for _, reports in micro for t in reports])
    total, terms = MLIPLoss(lambda_local=1.0, lambda_sie=0.1, impl="reference")(**model(rows, mask_ratio=0.0))
    total.backward()
    mean = sum(r["accum"][0]["loss"] for r in exact) / WORLD
    assert mean == pytest.approx(float(terms["loss"]), rel=RTOL)
    for name, p in model.named_parameters():
        torch.testing.assert_close(exact[0]["accum"][1][name], p.grad if p.grad is not None else torch.zeros_like(p),
                                   rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")


# ------------------------------------------------------------------------------- the training app (DeepSpeed)
def _assert_same_curve(records: dict, reference: dict) -> None:
    """fp32 with another reduction order: 1e-5 relative is ~100 ulp, while plain accumulation (negatives of
    one micro-batch) misses the first loss by a factor of ~3 (3.8 vs 11.0, checked)."""
    assert sorted(records) == sorted(reference) == [1, 2, 3]
    for step in (1, 2, 3):
        for key in ("loss", "loss_global", "loss_local", "loss_sie"):
            assert records[step][key] == pytest.approx(reference[step][key], rel=1e-5, abs=1e-6), (step, key)


def test_accum_freq_zero3_matches_one_batch(tmp_path, synthetic_cache, shared_tokenizer, one_process_reference):
    """ZeRO-3 (partitioned weights gathered in the no-grad pass and again in the re-run), one process, global
    batch 8 = 4 micro-batches of 2: the per-step losses of one micro-batch of 8."""
    run_dir = seed_run_dir(tmp_path / "run", shared_tokenizer)
    ds = write_ds(tmp_path / "ds.json", zero_optimization={"stage": 3})
    summary = train(base_args(ds, run_dir, synthetic_cache, *DETERMINISTIC, "--accum-freq", "4"))
    assert (summary["micro_batch"], summary["gradient_accumulation"], summary["global_batch"]) == (2, 4, 8)
    _assert_same_curve(train_records(run_dir), one_process_reference)


@pytest.mark.slow
def test_accum_freq_two_processes_zero2_matches_one_batch(tmp_path, synthetic_cache, shared_tokenizer,
                                                           one_process_reference):
    """``deepspeed --num_gpus 2`` (gloo), ZeRO-2, global batch 8 = micro 2 x 2 micro-batches x 2 ranks: every
    rank's loss sees all 8 rows as negatives, as the one-process run with one micro-batch of 8."""
    run_dir = seed_run_dir(tmp_path / "run", shared_tokenizer)
    launcher = REPO / ".venv" / "bin" / "deepspeed"
    cmd = [str(launcher) if launcher.exists() else "deepspeed", "--num_gpus", "2", "--master_port", str(free_port()),
           str(TRAIN_PY), *base_args(write_ds(tmp_path / "ds.json"), run_dir, synthetic_cache, *DETERMINISTIC,
                                     "--accum-freq", "2")]
    proc = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["world_size"], summary["zero_stage"], summary["micro_batch"], summary["gradient_accumulation"]) == (
        2, 2, 2, 2)
    _assert_same_curve(train_records(run_dir), one_process_reference)
