"""Two gloo processes give the loss and gradients of one process on the concatenated batch.

Per-rank losses are means over local rows, so the single-process loss equals their average, and the
gradient each rank gets on its own inputs (summed over ranks by the all-gather's backward) equals
world_size times the single-process gradient on that slice.
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mlip_fast import functional as MF

WORLD = 2
B, K, S, D = 3, 4, 3, 5


def _batch():
    gen = torch.Generator().manual_seed(11)
    smask = torch.rand(WORLD * B, S, generator=gen) > 0.4
    smask[:, 0] = True
    pmask = torch.rand(WORLD * B, K, generator=gen) > 0.3
    pmask[:, 0] = True
    return dict(
        image=torch.randn(WORLD * B, D, generator=gen, dtype=torch.float64),
        text=torch.randn(WORLD * B, D, generator=gen, dtype=torch.float64),
        patches=torch.randn(WORLD * B, K, D, generator=gen, dtype=torch.float64),
        sentences=torch.randn(WORLD * B, S, D, generator=gen, dtype=torch.float64),
        logits=torch.randn(WORLD * B, K, generator=gen, dtype=torch.float64),
        weights=torch.rand(WORLD * B, generator=gen, dtype=torch.float64) + 0.2,
        smask=smask,
        pmask=pmask,
    )


def _losses(x, local_loss):
    out = {}
    for name in ("global", "local", "total"):
        t = {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in x.items()}
        if name == "global":
            loss = MF.global_contrastive_loss(t["image"], t["text"], 8.0, t["weights"], local_loss=local_loss)
            keys = ("image", "text")
        elif name == "local":
            loss = MF.patch_sentence_loss(
                t["patches"], t["sentences"], t["smask"], t["pmask"], 6.0, t["weights"], local_loss=local_loss, impl="reference"
            )
            keys = ("patches", "sentences")
        else:
            loss, _ = MF.mlip_loss(
                t["image"], t["text"], t["patches"], t["sentences"], t["smask"], t["logits"], t["weights"], 8.0, 6.0,
                t["pmask"], weight_local=True, local_loss=local_loss, impl="reference",
            )
            keys = ("image", "text", "patches", "sentences", "logits")
        loss.backward()
        out[name] = (loss.detach(), {k: t[k].grad for k in keys})
    return out


def _worker(rank, init_file, result_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        full = _batch()
        mine = {k: v[rank * B : (rank + 1) * B] for k, v in full.items()}
        torch.save({ll: _losses(mine, ll) for ll in (True, False)}, os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.barrier()
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    full = _batch()
    for local_loss in (True, False):
        single = _losses(full, local_loss)
        for name, (loss, grads) in single.items():
            rank_losses = [ranks[r][local_loss][name][0] for r in range(WORLD)]
            torch.testing.assert_close(sum(rank_losses) / WORLD, loss, rtol=1e-10, atol=1e-12)
            if not local_loss and name != "total":  # the full G x G losses are the same on every rank
                for rl in rank_losses:
                    torch.testing.assert_close(rl, loss, rtol=1e-10, atol=1e-12, msg=f"{name} loss, full mode")
            for key, g in grads.items():
                for r in range(WORLD):
                    got = ranks[r][local_loss][name][1][key]
                    torch.testing.assert_close(got, WORLD * g[r * B : (r + 1) * B], rtol=1e-9, atol=1e-12,
                                               msg=f"{name} loss, local_loss={local_loss}, grad of {key}, rank {r}")
