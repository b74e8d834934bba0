"""Image-to-report and report-to-image retrieval with global embeddings.

API::

    evaluate_retrieval(model, data, *, ks=(1, 5, 10), batch_size=32, device=None, max_samples=None,
                       progress=True, transform=None, return_similarity=False) -> dict

``data`` yields samples with ``image`` and ``report`` (see ``mlip_fast.eval.common``). Every image and
every report is encoded once; ``similarity[i, j] = cos(image_i, report_j)`` over the whole set. For
image i the correct report is report i (and vice versa). Ranks are 1-based and a tie with the correct
item counts against it (``mlip_fast.eval.metrics.retrieval_ranks``).

Returned metrics::

    {"image_to_report": {"recall@1", "recall@5", "recall@10", "median_rank", "mean_rank", "n_queries",
                         "n_items", "chance": {...}},
     "report_to_image": {... same keys ...}, "n_pairs", "n_duplicate_reports"}

``n_duplicate_reports`` counts reports whose exact text occurs more than once: such pairs cannot all be
ranked first, which bounds Recall@1 below 1 even for a perfect model.
"""
from __future__ import annotations

from collections import Counter
from typing import Optional, Sequence

import torch

from mlip_fast.data.readers import EvalDataError
from mlip_fast.eval import metrics as M
from mlip_fast.eval.common import evaluating, eval_transform, iter_batches, l2_normalise, model_device

__all__ = ["evaluate_retrieval"]


def evaluate_retrieval(
    model,
    data,
    *,
    ks: Sequence[int] = (1, 5, 10),
    batch_size: int = 32,
    device=None,
    max_samples: Optional[int] = None,
    progress: bool = True,
    transform=None,
    return_similarity: bool = False,
) -> dict:
    """Recall@K and median rank in both directions (see module doc)."""
    dev = model_device(model, device)
    transform = transform if transform is not None else eval_transform(model)
    images, texts, reports = [], [], []
    with evaluating(model):
        for batch in iter_batches(data, batch_size=batch_size, transform=transform, max_samples=max_samples,
                                  progress=progress, desc="retrieval"):
            batch_reports = batch.get("reports")
            if batch_reports is None or any(not isinstance(r, str) or not r.strip() for r in batch_reports):
                raise EvalDataError("retrieval needs a non-empty 'report' for every sample (an image-report dataset)")
            images.append(l2_normalise(model.encode_image(batch["images"].to(dev))).cpu())
            texts.append(l2_normalise(model.encode_text(list(batch_reports))).cpu())
            reports.extend(batch_reports)
    image = torch.cat(images)
    text = torch.cat(texts)
    if image.shape[0] < 2:
        raise EvalDataError(f"retrieval needs at least 2 image-report pairs, got {image.shape[0]}")
    sim = (image @ text.T).numpy()
    counts = Counter(reports)
    result = {
        "image_to_report": M.retrieval_report(sim, ks=ks),
        "report_to_image": M.retrieval_report(sim.T, ks=ks),
        "n_pairs": int(sim.shape[0]),
        "n_duplicate_reports": int(sum(c for c in counts.values() if c > 1)),
    }
    if return_similarity:
        result["similarity"] = sim
    return result
