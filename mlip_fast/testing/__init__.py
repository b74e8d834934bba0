"""Independent references and input cases for testing mlip_fast's ops: fp64 grids written apart from
``mlip_fast.reference``, case generators with odd shapes and ragged masks, and exact distributions. The tests, the
GPU check (``tools/gpu_check``) and the benchmarks use the same ones.

- ``mlip_fast.testing.patch_sentence``: the max scores op;
- ``mlip_fast.testing.patch_sentence_ot``: the optimal-transport scores op;
- ``mlip_fast.testing.integrity_mask``: integrity-scored masking.

and, for any op, :func:`assert_compiled_grads_equal`.
"""
import torch


def assert_compiled_grads_equal(loss_fn, *inputs: torch.Tensor) -> None:
    """``loss_fn(*inputs)`` compiled whole (``fullgraph=True``, AOT autograd without a code generator) gives the
    same input gradients as eager, bitwise: the op's custom ops and fake impls trace without a graph break."""
    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    eager_in = [x.clone().requires_grad_() for x in inputs]
    compiled_in = [x.clone().requires_grad_() for x in inputs]
    loss_fn(*eager_in).backward()
    compiled(*compiled_in).backward()
    for got, want in zip(compiled_in, eager_in):
        torch.testing.assert_close(got.grad, want.grad, rtol=0, atol=0)
