"""ViT attention backend switch: sdpa vs math vs an fp64 reference, selection, refusals, env override."""
import pytest
import torch

from mlip_fast.models import attention as A
from mlip_fast.ops.dispatch import ImplUnavailableError, describe_selected


def reference(q, k, v):
    """fp64 softmax(q k^T / sqrt(d)) v per head, with an explicit loop over heads; [B, N, H, Dh]."""
    q, k, v = (t.double() for t in (q, k, v))
    outs = []
    for h in range(q.shape[2]):
        s = q[:, :, h] @ k[:, :, h].transpose(1, 2) / q.shape[-1] ** 0.5
        outs.append(torch.softmax(s, dim=-1) @ v[:, :, h])
    return torch.stack(outs, dim=2)


def naive(q, k, v):
    """The same formula computed entirely in the inputs' dtype by plain PyTorch ops: the error baseline."""
    s = torch.einsum("bnhd,bmhd->bhnm", q, k) * q.shape[-1] ** -0.5
    return torch.einsum("bhnm,bmhd->bnhd", torch.softmax(s, dim=-1), v)


@pytest.mark.parametrize("shape", [(2, 97, 3, 59), (1, 1, 1, 8), (3, 33, 4, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_and_math_match_reference(shape, dtype):
    """Each backend's error vs fp64 is at most 2x the error of the naive same-dtype PyTorch computation
    (flash-attention's tolerance rule), forward and backward with a random upstream gradient."""
    q, k, v = (torch.randn(*shape, dtype=torch.float64) for _ in range(3))
    grad = torch.randn(*shape, dtype=torch.float64)
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ref = reference(qr, kr, vr)
    ref_grads = torch.autograd.grad(ref, (qr, kr, vr), grad)
    qn, kn, vn = (t.to(dtype).requires_grad_() for t in (q, k, v))
    out_naive = naive(qn, kn, vn)
    grads_naive = torch.autograd.grad(out_naive, (qn, kn, vn), grad.to(dtype))
    base = (out_naive.double() - ref).abs().max().item()
    for backend in ("sdpa", "math"):
        qs, ks, vs = (t.to(dtype).requires_grad_() for t in (q, k, v))
        out = A.attention(qs, ks, vs, backend)
        assert out.dtype == dtype and out.shape == shape
        err = (out.double() - ref).abs().max().item()
        assert err <= 2 * base + 1e-6, (backend, err, base)
        grads = torch.autograd.grad(out, (qs, ks, vs), grad.to(dtype))
        for g, g_naive, g_ref in zip(grads, grads_naive, ref_grads):
            err = (g.double() - g_ref).abs().max().item()
            base_g = (g_naive.double() - g_ref).abs().max().item()
            assert err <= 2 * base_g + 1e-6, (backend, "grad", err, base_g)


def test_auto_on_cpu_picks_sdpa_and_is_reported():
    q = torch.randn(1, 4, 2, 8)
    A.attention(q, q, q, "auto")
    assert A.selected_backend() == "sdpa"
    assert describe_selected()["vit_attention"] == "sdpa"
    A.attention(q, q, q, "math")
    assert A.selected_backend() == "math"


@pytest.mark.parametrize("backend", ["flash", "xformers"])
def test_explicit_backend_that_cannot_run_lists_every_backend(backend):
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ImplUnavailableError) as e:
        A.attention(q, q, q, backend)
    msg = str(e.value)
    assert backend in msg and "device cpu not supported" in msg
    for name in A.BACKENDS:
        assert name in msg


def test_backend_report_names_reasons():
    report = A.backend_report("cpu", torch.float32)
    assert report["sdpa"] == "available" and report["math"] == "available"
    assert "cuda" in report["flash"] and "cuda" in report["xformers"]


def test_env_override(monkeypatch):
    q = torch.randn(1, 4, 2, 8)
    monkeypatch.setenv(A.ENV_VAR, "math")
    A.attention(q, q, q, "auto")
    assert A.selected_backend() == "math"
    monkeypatch.setenv(A.ENV_VAR, "flash")
    with pytest.raises(ImplUnavailableError):
        A.attention(q, q, q, "sdpa")
    monkeypatch.setenv(A.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match="MLIP_ATTN_BACKEND"):
        A.attention(q, q, q, "auto")


def test_unknown_backend_name():
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="not an attention backend"):
        A.attention(q, q, q, "cudnn")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["flash", "xformers"])
def test_gpu_backends_match_sdpa(backend):
    q, k, v = (torch.randn(2, 97, 3, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    if A.backend_report("cuda", torch.bfloat16)[backend] != "available":
        pytest.skip(f"{backend} not installed")
    ref = reference(q, k, v)
    err = (A.attention(q, k, v, backend).double() - ref).abs().max()
    base = (naive(q, k, v).double() - ref).abs().max()
    assert err <= 2 * base + 1e-6


def test_flash_declines_head_dims_it_cannot_take():
    assert A._flash_limits({"head_dim": 64}) == []
    assert "256" in A._flash_limits({"head_dim": 320})[0]
    assert "multiple of 8" in A._flash_limits({"head_dim": 60})[0]
