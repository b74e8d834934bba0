"""State-dict comparison shared by the checkpoint and pretrained-weight loaders."""
from __future__ import annotations

from typing import Iterable, Mapping, Optional

import torch


def state_mismatch(
    title: str,
    got: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    also_unexpected: Iterable[str] = (),
) -> Optional[str]:
    """A message listing wrong-shape, missing and unexpected keys of ``got`` against ``expected`` (plus
    ``also_unexpected``: source keys that could not be mapped at all); None if everything fits."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted((set(got) - set(expected)) | set(also_unexpected))
    wrong = sorted(
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in got.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    )
    if not (missing or unexpected or wrong):
        return None
    lines = [title]
    for name, keys in (("wrong shapes", wrong), ("missing keys", missing), ("unexpected keys", unexpected)):
        if keys:
            lines.append(f"  {name} ({len(keys)}): {keys}")
    return "\n".join(lines)
