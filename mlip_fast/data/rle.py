"""Run-length encoding of binary masks (SIIM-ACR's ``train-rle.csv``): relative runs (each start counted
from the end of the previous run, SIIM's variant) or standard absolute runs, column-major as the
competition's masks."""
from __future__ import annotations

import numpy as np

__all__ = ["rle_decode", "rle_encode"]

def rle_decode(rle: str, height: int, width: int, relative: bool = True) -> np.ndarray:
    """Decode a SIIM-ACR run-length string to a bool mask ``[height, width]``.

    Pixels are numbered column by column (top to bottom, then left to right). ``relative=True`` is
    ``train-rle.csv``'s encoding: each start is the gap after the end of the previous run (the first
    from pixel 0). ``relative=False`` is the standard Kaggle encoding: 1-based absolute starts.
    "-1" or "" is an empty mask.
    """
    flat = np.zeros(height * width, dtype=bool)
    text = (rle or "").strip()
    if text in ("", "-1"):
        return flat.reshape(width, height).T
    values = np.array(text.split(), dtype=np.int64)
    if values.size % 2:
        raise ValueError(f"RLE has an odd number of values ({values.size})")
    starts, lengths = values[0::2], values[1::2]
    if (lengths < 0).any() or (starts < 0).any():
        raise ValueError("RLE has negative values")
    if relative:
        ends_before = np.concatenate([[0], np.cumsum(starts + lengths)[:-1]])
        starts = ends_before + starts
    else:
        starts = starts - 1
    if starts.size and (starts.min() < 0 or (starts + lengths).max() > flat.size):
        raise ValueError(f"RLE runs fall outside a {height}x{width} image")
    for s, n in zip(starts.tolist(), lengths.tolist()):
        flat[s : s + n] = True
    return flat.reshape(width, height).T


def rle_encode(mask: np.ndarray, relative: bool = True) -> str:
    """Inverse of ``rle_decode`` ("-1" for an empty mask)."""
    flat = np.asarray(mask, dtype=bool).T.reshape(-1)
    padded = np.concatenate([[False], flat, [False]])
    changes = np.flatnonzero(padded[1:] != padded[:-1])
    starts, ends = changes[0::2], changes[1::2]
    if starts.size == 0:
        return "-1"
    lengths = ends - starts
    if relative:
        prev_end = np.concatenate([[0], ends[:-1]])
        starts = starts - prev_end
    else:
        starts = starts + 1
    return " ".join(f"{s} {n}" for s, n in zip(starts.tolist(), lengths.tolist()))
