"""2 and 3 gloo processes give the loss and gradients of one process on the concatenated batch.

Per-rank losses are means over local rows, so the single-process loss equals their average, and the
gradient each rank gets on its own inputs (summed over ranks by the all-gather's backward) equals
world_size times the single-process gradient on that slice. Ranks hold different numbers of sentences per
report (ragged S): the library pads them itself. In the default mode (local loss, gather with gradient)
each rank calls the fused scores op once per loss and exchanges [B, B] score blocks with an all-to-all; with
optimal-transport matching the same holds for the OT op's one score matrix.
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mlip_fast import distributed as MD
from mlip_fast import functional as MF
from mlip_fast.ops import patch_sentence as ps_op
from mlip_fast.ops import patch_sentence_ot as ot_op

B, K, S, D = 3, 4, 5, 5
IMPLS = ("reference", "chunked")
MODES = ((True, True), (True, False), (False, True))  # (local_loss, gather_with_grad)


def _s_of(rank: int) -> int:
    return S - (rank % 3)  # ranks hold 5, 4, 3 sentence slots


def _batch(world):
    gen = torch.Generator().manual_seed(11)
    smask = torch.rand(world * B, S, generator=gen) > 0.4
    smask[:, 0] = True
    for r in range(world):  # the slots beyond a rank's S are padding in the concatenated batch
        smask[r * B : (r + 1) * B, _s_of(r):] = False
    pmask = torch.rand(world * B, K, generator=gen) > 0.3
    pmask[:, 0] = True
    return dict(
        image=torch.randn(world * B, D, generator=gen, dtype=torch.float64),
        text=torch.randn(world * B, D, generator=gen, dtype=torch.float64),
        patches=torch.randn(world * B, K, D, generator=gen, dtype=torch.float64),
        sentences=torch.randn(world * B, S, D, generator=gen, dtype=torch.float64),
        logits=torch.randn(world * B, K, generator=gen, dtype=torch.float64),
        weights=torch.rand(world * B, generator=gen, dtype=torch.float64) + 0.2,
        smask=smask,
        pmask=pmask,
    )


def _losses(x, local_loss, gather_with_grad, impl):
    out = {}
    dist_kw = dict(local_loss=local_loss, gather_with_grad=gather_with_grad)
    for name in ("global", "local", "total"):
        t = {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in x.items()}
        if name == "global":
            loss = MF.global_contrastive_loss(t["image"], t["text"], 8.0, t["weights"], **dist_kw)
            keys = ("image", "text")
        elif name == "local":
            loss = MF.patch_sentence_loss(
                t["patches"], t["sentences"], t["smask"], t["pmask"], 6.0, t["weights"], impl=impl, **dist_kw
            )
            keys = ("patches", "sentences")
        else:
            loss, _ = MF.mlip_loss(
                t["image"], t["text"], t["patches"], t["sentences"], t["smask"], t["logits"], t["weights"], 8.0, 6.0,
                t["pmask"], weight_local=True, impl=impl, **dist_kw,
            )
            keys = ("image", "text", "patches", "sentences", "logits")
        loss.backward()
        out[name] = (loss.detach(), {k: t[k].grad for k in keys})
    return out


def _count_calls(impl):
    """Wraps the impl's function to count fused-op calls."""
    chosen = ps_op.REGISTRY.impls[impl]
    calls = []
    original = chosen.fn

    def counting(*args, **kwargs):
        calls.append(args[4].directions)
        return original(*args, **kwargs)

    object.__setattr__(chosen, "fn", counting)
    return calls, lambda: object.__setattr__(chosen, "fn", original)


def _worker(rank, world, init_file, result_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        full = _batch(world)
        mine = {k: v[rank * B : (rank + 1) * B] for k, v in full.items()}
        mine["sentences"] = mine["sentences"][:, : _s_of(rank)]
        mine["smask"] = mine["smask"][:, : _s_of(rank)]
        results = {}
        for impl in IMPLS:
            for mode in MODES:
                results[(impl, mode)] = _losses(mine, *mode, impl)
        calls, restore = _count_calls("chunked")
        t = {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in mine.items()}
        MF.patch_sentence_loss(t["patches"], t["sentences"], t["smask"], t["pmask"], 6.0, impl="chunked").backward()
        restore()
        results["calls"] = calls
        results["ot"] = {mode: _ot_losses(mine, *mode) for mode in MODES}
        ot_calls = []
        chosen = ot_op.REGISTRY.impls["chunked"]
        original = chosen.fn
        object.__setattr__(chosen, "fn", lambda *a, **k: ot_calls.append(1) or original(*a, **k))
        try:
            t = {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in mine.items()}
            MF.patch_sentence_loss(t["patches"], t["sentences"], t["smask"], t["pmask"], 6.0, impl="chunked",
                                   local_matching="ot").backward()
        finally:
            object.__setattr__(chosen, "fn", original)
        results["ot_calls"] = len(ot_calls)
        torch.save(results, os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.barrier()
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_processes_match_one(tmp_path, world):
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    full = _batch(world)
    for r in range(world):
        assert ranks[r]["calls"] == ["both"], "one fused scores call per loss in the default distributed mode"
        assert ranks[r]["ot_calls"] == 1, "one OT scores call per loss in the default distributed mode"
    _check_ot_matching(ranks, full, world)
    for impl in IMPLS:
        for local_loss, gather_with_grad in MODES:
            single = _losses(full, local_loss, gather_with_grad, impl)
            for name, (loss, grads) in single.items():
                rank_out = [ranks[r][(impl, (local_loss, gather_with_grad))][name] for r in range(world)]
                rank_losses = [o[0] for o in rank_out]
                msg = f"{name} loss, impl={impl}, local_loss={local_loss}, gather_with_grad={gather_with_grad}"
                torch.testing.assert_close(sum(rank_losses) / world, loss, rtol=1e-10, atol=1e-12, msg=msg)
                if not local_loss and name != "total":  # the full G x G losses are the same on every rank
                    for rl in rank_losses:
                        torch.testing.assert_close(rl, loss, rtol=1e-10, atol=1e-12, msg=f"{msg}, full mode")
                if not gather_with_grad:
                    continue  # gradients then reach local tensors only: not the single-process gradient
                for key, g in grads.items():
                    for r in range(world):
                        got = rank_out[r][1][key]
                        want = world * g[r * B : (r + 1) * B]
                        if key == "sentences":
                            want = want[:, : _s_of(r)]
                        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12, msg=f"{msg}, grad of {key}, rank {r}")


def _ot_losses(x, local_loss, gather_with_grad):
    """The local and total losses with optimal-transport matching (chunked impl) and their input gradients."""
    out = {}
    kw = dict(local_loss=local_loss, gather_with_grad=gather_with_grad, impl="chunked", local_matching="ot",
              ot_eps=0.1, ot_iters=8)
    for name in ("local", "total"):
        t = {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in x.items()}
        if name == "local":
            loss = MF.patch_sentence_loss(t["patches"], t["sentences"], t["smask"], t["pmask"], 6.0, t["weights"], **kw)
            keys = ("patches", "sentences")
        else:
            loss, _ = MF.mlip_loss(t["image"], t["text"], t["patches"], t["sentences"], t["smask"], t["logits"],
                                   t["weights"], 8.0, 6.0, t["pmask"], weight_local=True, **kw)
            keys = ("image", "text", "patches", "sentences", "logits")
        loss.backward()
        out[name] = (loss.detach(), {k: t[k].grad for k in keys})
    return out


def _check_ot_matching(ranks, full, world):
    """The OT-matching losses of the ranks against one process on the whole batch, as for the max path."""
    for mode in MODES:
        local_loss, gather_with_grad = mode
        for name, (loss, grads) in _ot_losses(full, *mode).items():
            msg = f"OT {name} loss, local_loss={local_loss}, gather_with_grad={gather_with_grad}"
            rank_out = [ranks[r]["ot"][mode][name] for r in range(world)]
            torch.testing.assert_close(sum(o[0] for o in rank_out) / world, loss, rtol=1e-10, atol=1e-12, msg=msg)
            if not gather_with_grad:
                continue
            for key, g in grads.items():
                for r in range(world):
                    want = world * g[r * B : (r + 1) * B]
                    if key == "sentences":
                        want = want[:, : _s_of(r)]
                    torch.testing.assert_close(rank_out[r][1][key], want, rtol=1e-9, atol=1e-12,
                                               msg=f"{msg}, grad of {key}, rank {r}")


def _a2a_worker(rank, world, init_file, result_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        gen = torch.Generator().manual_seed(rank)
        x = torch.randn(2, world * 3, generator=gen, dtype=torch.float64, requires_grad=True)
        y = MD.all_to_all_blocks(x)
        up = torch.randn(y.shape, generator=gen, dtype=torch.float64)
        (y * up).sum().backward()
        torch.save(dict(x=x.detach(), y=y.detach(), up=up, grad=x.grad), os.path.join(result_dir, f"a2a{rank}.pt"))
    finally:
        dist.barrier()
        dist.destroy_process_group()


@pytest.mark.slow
def test_all_to_all_blocks_exchange_and_gradient(tmp_path):
    world = 3
    mp.spawn(_a2a_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    res = [torch.load(tmp_path / f"a2a{r}.pt") for r in range(world)]
    for me in range(world):
        want = torch.cat([res[r]["x"][:, me * 3 : (me + 1) * 3] for r in range(world)], dim=0)
        torch.testing.assert_close(res[me]["y"], want, rtol=0, atol=0)
    for r in range(world):  # d/dx of sum_me <y_me, up_me>: block `me` of x_r went to rank me, rows r
        want = torch.cat([res[me]["up"][r * 2 : (r + 1) * 2] for me in range(world)], dim=1)
        torch.testing.assert_close(res[r]["grad"], want, rtol=0, atol=0)


def test_single_process_calls_the_op_once():
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(4, 5, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    s = torch.randn(4, 3, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    calls, restore = _count_calls("chunked")
    try:
        MF.patch_sentence_loss(p, s, impl="chunked").backward()
        MF.mlip_loss(p.sum(1), s.sum(1), p, s, impl="chunked", lambda_sie=0.0)[0].backward()
    finally:
        restore()
    assert calls == ["both", "both"]
