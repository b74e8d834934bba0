"""What a patch-sentence scores call asks for, in one value handed from the public op to every impl."""
from __future__ import annotations

from dataclasses import dataclass

DIRECTIONS = ("both", "i2t", "t2i")
PRECISIONS = ("ieee", "tf32")


@dataclass(frozen=True)
class ScoresOptions:
    """Options of one scores call (checked by :meth:`checked`).

    directions: "both", "i2t" (image-to-text only) or "t2i" (text-to-image only).
    normalize: score the L2-normalised embeddings (x / max(||x||, 1e-12), norms in fp32) without the caller
        holding normalised copies; the gradient is the one of the raw inputs.
    precision: fp32 dot products as IEEE fp32 ("ieee", the default) or on TF32 tensor cores ("tf32": about
        10 mantissa bits per product, fp32 accumulation; the Triton impl on GPU only, the others stay IEEE).
        Half inputs always use their tensor cores with fp32 accumulation.
    deterministic: backward without atomics (bitwise reproducible on one GPU model).
    """

    directions: str = "both"
    normalize: bool = False
    precision: str = "ieee"
    deterministic: bool = False

    def checked(self) -> "ScoresOptions":
        if self.directions not in DIRECTIONS:
            raise ValueError(f"directions must be one of {DIRECTIONS}, got {self.directions!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        return self

    @property
    def do_i2t(self) -> bool:
        return self.directions in ("both", "i2t")

    @property
    def do_t2i(self) -> bool:
        return self.directions in ("both", "t2i")
