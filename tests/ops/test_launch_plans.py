"""The launchers' host-side planning: the plain-Python integer helpers equal triton's (whose host calls cost
microseconds each since triton 3.5), the cached configs equal a fresh computation and hand each caller its own
copy, and a backward side's cached plan is what bwd_config and backward_split choose for it."""
import pytest
import torch
import triton

from mlip_fast.kernels._common import cdiv, next_pow2, pow2
from mlip_fast.kernels.patch_sentence import heuristics as h
from mlip_fast.kernels.patch_sentence import launch as L

SHAPES = [(128, 98, 128, 16, 512), (4, 7, 5, 3, 33), (64, 196, 1024, 40, 256), (1, 1, 1, 1, 16)]


def test_integer_helpers_equal_tritons():
    for a in list(range(0, 700)) + [2**20 - 1, 2**20, 2**20 + 1, 3 * 2**31]:
        assert next_pow2(a) == triton.next_power_of_2(a), a
        for b in (1, 2, 3, 7, 16, 64, 128, 132):
            assert cdiv(a, b) == triton.cdiv(a, b), (a, b)
    assert [pow2(n, 16) for n in (0, 1, 16, 17)] == [16, 16, 16, 32]


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cached_configs_equal_a_fresh_computation_and_are_copies(arch, dtype):
    for B, K, G, S, D in SHAPES:
        calls = [
            (h.fwd_config, (B, K, G, S, D, dtype, arch, 132), dict(normalize=True)),
            (h.fwd_v3_config, (B, K, G, S, D, 132, "both"), {}),
            (h.bwd_config, (B, K, G, S, D, dtype, arch, True), dict(atomic=False)),
            (h.bwd_config, (G, S, B, K, D, dtype, arch, False), dict(atomic=True)),
        ]
        for fn, args, kwargs in calls:
            first = fn(*args, **kwargs)
            assert first == fn.__wrapped__(*args, **kwargs)
            first["num_warps"] = -1  # a caller editing its copy
            assert fn(*args, **kwargs) == fn.__wrapped__(*args, **kwargs)


@pytest.mark.parametrize("deterministic", [False, True])
def test_backward_plan_is_the_split_search_choice(deterministic):
    dtype = torch.bfloat16
    for X, R, Y, C, D in SHAPES:
        for arch, sms in ((80, 108), (90, 132)):
            for own_is_patch in (True, False):
                def config_of(atomic, X=X, R=R, Y=Y, C=C, D=D, arch=arch, own_is_patch=own_is_patch):
                    return h.bwd_config(X, R, Y, C, D, dtype, arch, own_is_patch, atomic=atomic)

                base = config_of(False)
                rows = cdiv(X, base["XB"]) * cdiv(R, base["RB"])
                steps = cdiv(Y, base["YB"]) * cdiv(C, base["CB"])
                split = h.backward_split(rows * cdiv(D, base["DC"]), steps, sms, arch, dtype, config_of, deterministic)
                split = cdiv(steps, cdiv(steps, max(1, min(split, steps))))
                atomic = split > h.DETERMINISTIC_SPLIT and not deterministic
                plan = L._bwd_plan(X, R, Y, C, D, dtype, arch, sms, own_is_patch, deterministic, None, ())
                assert plan == (tuple(config_of(atomic).items()), rows, split, cdiv(steps, split), atomic)
    # a forced split and block-size overrides are part of the key
    forced = L._bwd_plan(64, 98, 128, 16, 512, dtype, 90, 132, True, deterministic, 3, (("DC", 64),))
    assert dict(forced[0])["DC"] == 64 and forced[2] == 3
