"""The drop-in losses compile whole: ``torch.compile(loss, fullgraph=True)`` traces the global, patch-sentence
and MLIP losses with the reference and the chunked scores impls, max and optimal-transport matching, without a
graph break (value checks, which read tensor contents, are skipped while tracing; each chunked impl is one custom
op), and the compiled losses give the eager values and gradients. ``aot_eager`` traces forward and backward as inductor would, without its C++
compile time."""
import pytest
import torch

from mlip_fast.losses import GlobalContrastiveLoss, MLIPLoss, PatchSentenceLoss

B, K, S, D = 4, 6, 3, 8
OT_ITERS = 10


def _inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(B, K, D, generator=gen)
    s = torch.randn(B, S, D, generator=gen)
    smask = torch.ones(B, S, dtype=torch.bool)
    smask[0, 2] = smask[3, 1] = False
    return dict(image_global=torch.randn(B, D, generator=gen), text_global=torch.randn(B, D, generator=gen),
                patches=p, sentences=s, sentence_mask=smask, integrity_logits=torch.randn(B, K, generator=gen),
                integrity_weights=torch.rand(B, generator=gen) + 0.5)


def _run(fn, inputs, keys):
    leaves = {k: inputs[k].clone().requires_grad_() for k in keys}
    out = fn({**inputs, **leaves})
    total = out[0] if isinstance(out, tuple) else out
    return total.detach(), torch.autograd.grad(total, list(leaves.values()))


CASES = {
    "global": (lambda: GlobalContrastiveLoss(), lambda m, x: m(x["image_global"], x["text_global"]),
               ("image_global", "text_global")),
    "patch_sentence_reference": (lambda: PatchSentenceLoss(impl="reference"),
                                 lambda m, x: m(x["patches"], x["sentences"], x["sentence_mask"]), ("patches", "sentences")),
    "patch_sentence_chunked": (lambda: PatchSentenceLoss(impl="chunked"),
                               lambda m, x: m(x["patches"], x["sentences"], x["sentence_mask"]), ("patches", "sentences")),
    "mlip_chunked": (lambda: MLIPLoss(impl="chunked"), lambda m, x: m(**x),
                     ("image_global", "text_global", "patches", "sentences", "integrity_logits")),
    "mlip_reference": (lambda: MLIPLoss(impl="reference"), lambda m, x: m(**x),
                       ("image_global", "text_global", "patches", "sentences", "integrity_logits")),
    "patch_sentence_ot_chunked": (lambda: PatchSentenceLoss(local_matching="ot", impl="chunked", ot_iters=OT_ITERS),
                                  lambda m, x: m(x["patches"], x["sentences"], x["sentence_mask"]),
                                  ("patches", "sentences")),
    "mlip_ot_chunked": (lambda: MLIPLoss(local_matching="ot", impl="chunked", ot_iters=OT_ITERS), lambda m, x: m(**x),
                        ("image_global", "text_global", "patches", "sentences", "integrity_logits")),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_loss_compiles_whole_and_matches_eager(case):
    torch._dynamo.reset()
    make, call, keys = CASES[case]
    module = make()
    inputs = _inputs()
    compiled = torch.compile(lambda x: call(module, x), fullgraph=True, backend="aot_eager")
    eager_loss, eager_grads = _run(lambda x: call(module, x), inputs, keys)
    loss, grads = _run(compiled, inputs, keys)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-6, atol=1e-6)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("matching", ["max", "ot"])
def test_no_graph_break_in_the_mlip_loss(matching):
    explanation = torch._dynamo.explain(MLIPLoss(impl="chunked", local_matching=matching))(**_inputs())
    assert explanation.graph_break_count == 0, [str(b.reason)[:200] for b in explanation.break_reasons]


def test_no_graph_break_in_the_ot_patch_sentence_loss():
    x = _inputs()
    module = PatchSentenceLoss(local_matching="ot", impl="chunked")
    explanation = torch._dynamo.explain(module)(x["patches"], x["sentences"], x["sentence_mask"])
    assert explanation.graph_break_count == 0, [str(b.reason)[:200] for b in explanation.break_reasons]
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x["patches"], x["sentences"], x["sentence_mask"]),
                               module(x["patches"], x["sentences"], x["sentence_mask"]), rtol=1e-6, atol=1e-6)


def test_chunked_custom_ops_pass_opcheck():
    from mlip_fast.ops.patch_sentence.chunked import chunked_fwd

    x = _inputs()
    p, s = x["patches"].requires_grad_(), x["sentences"].requires_grad_()
    torch.library.opcheck(chunked_fwd, (p, s, x["sentence_mask"], None, True, True, True, True, 2**17),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_ot_chunked_custom_ops_pass_opcheck():
    from mlip_fast.ops.patch_sentence_ot.chunked import chunked_fwd

    x = _inputs()
    p, s = x["patches"].requires_grad_(), x["sentences"].requires_grad_()
    pmask = torch.ones(B, K, dtype=torch.bool)
    pmask[1, 2] = False
    for normalize in (False, True):
        torch.library.opcheck(chunked_fwd, (p, s, x["sentence_mask"], pmask, 0.05, 5, None, 2**18, 16.0, normalize),
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
