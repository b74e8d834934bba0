"""Image transform: aspect-preserving resize, pad to square, optional mild affine, normalisation.

``ImageTransform(image_size, train, in_chans)(image) -> torch.float32 [in_chans, S, S]`` with
``S = image_size``. ``image`` is what a user has at hand (:func:`to_gray`): a Pillow image of any mode
(8- or 16-bit grey, RGB, RGBA, palette, ...), a numpy array ``[H, W]`` or ``[H, W, C]``, a tensor
``[H, W]`` or ``[C, H, W]`` (C = 1, 3 or 4), or the path of an image file (PNG, JPEG, DICOM, ...,
read by :func:`mlip_fast.preprocess.images.load_image`). Colour becomes BT.601 luminance with alpha composited
onto black, as the loader does, and the grey image is replicated to ``in_chans`` channels.

The longer side is resized to ``S`` (antialiased bilinear), the shorter side is padded with 0 (black,
the background of a radiograph) on both sides to centre the image, then in training a small random
rotation / scale / translation is applied (bilinear ``grid_sample``), and finally ``(x - mean) / std``.
Horizontal flips are deliberately absent: reports name sides ("left base"), and a flip would
contradict them.

In training, when the resize shrinks by no more than ``FUSED_MIN_SCALE`` (e.g. 256 px shards to 224 px,
or a JPEG decoded at a reduced DCT scale), resize, pad and the random affine are one bilinear resampling
of the source (the composed affine map; zeros outside the image, as the padding): less than half the
CPU time, and at 256 -> 224 px within 0.004 mean absolute difference (44 dB PSNR) of resizing with
antialiasing first. An image already ``S x S`` gives the same result either way; stronger reductions
take the antialiased resize first. A mask always follows the image's path.

:class:`PreprocessConfig` holds the transform's settings; a model carries one and checkpoints store it
(``preprocess_config.json``), so a loaded model gets back the transforms it was trained with.

Randomness comes from torch: pass ``generator=`` for a reproducible draw, otherwise the global torch
RNG is used, which DataLoader seeds differently in every worker.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mlip_fast._checks import dataclass_from_dict
from mlip_fast.preprocess.images import load_image, pil_to_gray

__all__ = ["ImageTransform", "PreprocessConfig", "resize_pad", "to_gray", "DEFAULT_AUGMENT", "DEFAULT_MEAN",
           "DEFAULT_STD"]

DEFAULT_AUGMENT = {"degrees": 7.0, "scale": (0.92, 1.08), "translate": 0.04}
# Normalisation of a grey radiograph in [0, 1]: the whole field's intensities land around zero.
DEFAULT_MEAN, DEFAULT_STD = 0.5, 0.25
_LUMA = (0.299, 0.587, 0.114)
FUSED_MIN_SCALE = 0.5  # below it, bilinear sampling without antialiasing would alias


def resize_pad(image: torch.Tensor, size: int) -> torch.Tensor:
    """Resize ``[H, W]`` (or ``[C, H, W]``) so the longer side is ``size``, keeping the aspect ratio,
    then pad with 0 to ``[size, size]`` (image centred). Returns the same leading layout as the input."""
    squeeze = image.dim() == 2
    x = image[None, None] if squeeze else image[None]
    h, w = x.shape[-2:]
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=scale < 1)
    top, left = (size - nh) // 2, (size - nw) // 2
    x = F.pad(x, (left, size - nw - left, top, size - nh - top), value=0.0)
    return x[0, 0] if squeeze else x[0]


class ImageTransform:
    """Map an image to the model's input tensor.

    Args:
        image_size: output side S.
        train: apply the random affine augmentation.
        in_chans: 1, or 3 to replicate the grey channel.
        mean, std: normalisation, scalars or one value per channel.
        augment: overrides of ``DEFAULT_AUGMENT``: ``degrees`` (max absolute rotation), ``scale``
            ((min, max) zoom), ``translate`` (max shift as a fraction of the side). Zeros disable a part.

    Call: ``transform(image, generator=None)`` with any image :func:`to_gray` takes (PIL image, array,
    tensor, path) -> float32 tensor ``[in_chans, S, S]``; ``transform(image, generator, mask=mask)`` ->
    ``(image_tensor, bool mask [S, S])`` with the same resize, pad and affine applied to the mask (``[H, W]``
    like the grey image).
    """

    def __init__(
        self,
        image_size: int = 224,
        train: bool = False,
        in_chans: int = 1,
        mean: float | Sequence[float] = DEFAULT_MEAN,
        std: float | Sequence[float] = DEFAULT_STD,
        augment: dict | None = None,
    ):
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        if in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")
        unknown = set(augment or {}) - set(DEFAULT_AUGMENT)
        if unknown:
            raise ValueError(f"unknown augment keys {sorted(unknown)}; known: {sorted(DEFAULT_AUGMENT)}")
        self.image_size = int(image_size)
        self.train = bool(train)
        self.in_chans = int(in_chans)
        self.augment = {**DEFAULT_AUGMENT, **(augment or {})}
        self.mean = self._per_channel(mean, "mean")
        self.std = self._per_channel(std, "std")
        if (self.std <= 0).any():
            raise ValueError(f"std must be positive, got {std}")

    def _per_channel(self, value, name: str) -> torch.Tensor:
        t = torch.as_tensor(value, dtype=torch.float32).flatten()
        if t.numel() == 1:
            t = t.expand(self.in_chans)
        if t.numel() != self.in_chans:
            raise ValueError(f"{name} needs 1 or {self.in_chans} values, got {t.numel()}")
        return t.clone().view(-1, 1, 1)

    @classmethod
    def from_config(cls, config: "PreprocessConfig", train: bool = False) -> "ImageTransform":
        """The transform a :class:`PreprocessConfig` describes (``train`` adds its augmentation)."""
        return cls(config.image_size, train=train, in_chans=config.in_chans, mean=config.mean, std=config.std,
                   augment=config.augment)

    @property
    def config(self) -> "PreprocessConfig":
        """The settings of this transform (without the train switch) as a :class:`PreprocessConfig`."""
        return PreprocessConfig(image_size=self.image_size, in_chans=self.in_chans,
                                mean=tuple(self.mean.flatten().tolist()), std=tuple(self.std.flatten().tolist()),
                                augment=dict(self.augment))

    def __repr__(self) -> str:
        return (
            f"ImageTransform(image_size={self.image_size}, train={self.train}, in_chans={self.in_chans}, "
            f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}, augment={self.augment})"
        )

    def __call__(self, image, generator: torch.Generator | None = None, mask=None):
        """Transform ``image``; with ``mask`` (the grey image's [H, W], any dtype, nonzero = inside) also
        return the mask under the same geometry as a bool tensor ``[S, S]``: ``(image_tensor, mask_tensor)``."""
        x = to_gray(image, max_side=self.image_size)
        m = None
        if mask is not None:
            m = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask)
            if tuple(m.shape) != tuple(x.shape):
                raise ValueError(f"mask shape {tuple(m.shape)} differs from image shape {tuple(x.shape)}")
            m = (m != 0).to(torch.float32)
        size = self.image_size
        theta = self._random_theta(generator) if self.train else None
        if theta is not None and size / max(x.shape) >= FUSED_MIN_SCALE:
            theta = _fit_then(theta, tuple(x.shape), size)
            x = _warp(x, theta, (size, size))
            m = _warp(m, theta, (size, size)) if m is not None else None
        else:
            x = resize_pad(x, size)
            m = resize_pad(m, size) if m is not None else None
            if theta is not None:
                x = _warp(x, theta)
                m = _warp(m, theta) if m is not None else None
        x = x.unsqueeze(0).expand(self.in_chans, -1, -1)
        x = ((x - self.mean) / self.std).contiguous()
        return x if m is None else (x, m > 0.5)

    def batch(self, images: Sequence, seeds: Sequence[int]) -> torch.Tensor:
        """``[B, in_chans, S, S]``, bitwise ``torch.stack([self(image, generator=torch.Generator().manual_seed(seed))
        for image, seed in zip(images, seeds)])``. A training batch whose grey images share one shape that takes
        the fused path is one batched resampling (the random draws stay per sample, each from its seed): a few
        operators per batch instead of about 35 per image. Any other batch goes image by image."""
        if len(images) != len(seeds):
            raise ValueError(f"got {len(images)} images and {len(seeds)} seeds")
        xs = [to_gray(image, max_side=self.image_size) for image in images]
        size = self.image_size
        shape = tuple(xs[0].shape) if xs else None
        thetas = None
        if self.train and xs and all(tuple(x.shape) == shape for x in xs) and size / max(shape) >= FUSED_MIN_SCALE:
            generator = torch.Generator()
            thetas = [self._random_affine(generator.manual_seed(int(seed))) for seed in seeds]
        if thetas is None or thetas[0] is None:  # eval, no augmentation, mixed shapes, a strong reduction
            return torch.stack([self(x, generator=torch.Generator().manual_seed(int(seed)))
                                for x, seed in zip(xs, seeds)])
        theta = _fit_then(torch.tensor(thetas, dtype=torch.float32), shape, size)  # [B, 2, 3]
        grid = torch.matmul(theta, _base_grid(size, size)).transpose(1, 2).view(len(xs), size, size, 2)
        x = F.grid_sample(torch.stack(xs)[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return ((x.expand(-1, self.in_chans, -1, -1) - self.mean) / self.std).contiguous()

    def _random_theta(self, generator: torch.Generator | None) -> torch.Tensor | None:
        rows = self._random_affine(generator)
        return None if rows is None else torch.tensor(rows, dtype=torch.float32)[None]

    def _random_affine(self, generator: torch.Generator | None) -> list | None:
        """The random affine map's two rows as Python floats (None when the augmentation is off)."""
        degrees = float(self.augment["degrees"])
        lo, hi = (float(v) for v in self.augment["scale"])
        translate = float(self.augment["translate"])
        if degrees == 0 and lo == hi == 1 and translate == 0:
            return None
        u = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
        angle = math.radians((2 * u[0] - 1) * degrees)
        zoom = lo + (hi - lo) * u[1]
        tx, ty = ((2 * u[2] - 1) * translate * 2, (2 * u[3] - 1) * translate * 2)  # grid units span 2
        # affine_grid maps output coordinates to input coordinates, so the inverse of zoom is used.
        cos, sin = math.cos(angle) / zoom, math.sin(angle) / zoom
        return [[cos, -sin, tx], [sin, cos, ty]]


@functools.lru_cache(maxsize=8)
def _base_grid(h: int, w: int) -> torch.Tensor:
    """Homogeneous pixel-centre coordinates ``[3, h * w]`` (x, y, 1) in ``affine_grid``'s
    ``align_corners=False`` convention."""
    xs = (torch.arange(w, dtype=torch.float32) * 2 + 1) / w - 1
    ys = (torch.arange(h, dtype=torch.float32) * 2 + 1) / h - 1
    return torch.stack([xs.expand(h, w), ys[:, None].expand(h, w), torch.ones(h, w)]).reshape(3, h * w)


def _warp(x: torch.Tensor, theta: torch.Tensor, size: tuple | None = None) -> torch.Tensor:
    """``x [H, W]`` sampled (bilinear, zeros outside) at ``affine_grid(theta)`` points of an output of
    ``size`` (default ``x``'s own)."""
    # The grid of F.affine_grid as one [2, 3] @ [3, HW] product, viewed (not copied) as [1, H, W, 2]:
    # affine_grid costs about 4x the sampling itself on one CPU thread at 224 px.
    h, w = size or x.shape
    grid = (theta[0] @ _base_grid(h, w)).T.view(1, h, w, 2)
    return F.grid_sample(x[None, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0, 0]


def _fit_then(theta: torch.Tensor, shape: tuple, size: int) -> torch.Tensor:
    """``theta`` [B, 2, 3] (output -> S x S canvas, normalised coordinates) composed with the map from the
    canvas of ``resize_pad`` (longer side to ``size``, centred) to the source image of ``shape``."""
    h, w = shape
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    top, left = (size - nh) // 2, (size - nw) // 2
    # source pixel x_s = (x_canvas - left + 0.5) * w / nw - 0.5, in normalised coordinates g = a c + b:
    a = torch.tensor([[size / nw], [size / nh]], dtype=theta.dtype)
    b = torch.tensor([(size - 2 * left) / nw - 1, (size - 2 * top) / nh - 1], dtype=theta.dtype)
    composed = theta * a
    composed[..., 2] += b
    return composed


def to_gray(image, max_side: int | None = None) -> torch.Tensor:
    """Any image a user has at hand -> float32 grey tensor ``[H, W]`` (values in [0, 1] for integer inputs).

    - a Pillow image, any mode: :func:`mlip_fast.preprocess.images.pil_to_gray` (8-bit / 255, 16-bit / 65535,
      colour to luminance, alpha composited onto black, EXIF orientation applied);
    - a path (``str`` or ``os.PathLike``): :func:`mlip_fast.preprocess.images.load_image` (format by content,
      DICOM included; ``max_side`` lets a large JPEG decode at a reduced scale, never below it);
    - a numpy array ``[H, W]`` or ``[H, W, C]``, a tensor ``[H, W]`` or ``[C, H, W]``, with C = 1 (grey),
      3 (RGB) or 4 (RGBA); uint8 is divided by 255, uint16 by 65535, bool becomes 0 / 1, floating point is
      taken as it is (expected in [0, 1]).

    Raises TypeError for another kind of object or dtype, ValueError for another layout.
    """
    if isinstance(image, (str, os.PathLike)):
        return torch.from_numpy(load_image(Path(image), max_side=max_side))
    if _is_pil(image):
        return torch.from_numpy(np.ascontiguousarray(pil_to_gray(image), dtype=np.float32))
    if isinstance(image, np.ndarray):
        if image.ndim == 3 and image.shape[-1] not in (1, 3, 4):
            raise ValueError(f"a numpy image must be [H, W] or [H, W, C] with C = 1, 3 or 4 (channels last, as PIL "
                             f"gives them), got shape {image.shape}")
        x = torch.from_numpy(np.ascontiguousarray(image))
        channels_last = True
    elif isinstance(image, torch.Tensor):
        if image.dim() == 3 and image.shape[0] not in (1, 3, 4):
            raise ValueError(f"an image tensor must be [H, W] or [C, H, W] with C = 1, 3 or 4 (channels first), got "
                             f"shape {tuple(image.shape)}")
        x = image.detach().cpu()
        channels_last = False
    else:
        raise TypeError(f"expected a PIL image, a numpy array, a tensor or an image file path, got "
                        f"{type(image).__name__}")
    if x.dim() not in (2, 3):
        raise ValueError(f"expected an image [H, W] or with a channel axis, got shape {tuple(x.shape)}")
    x = _unit_float(x)
    if x.dim() == 3:
        x = x.movedim(-1, 0) if channels_last else x
        x = _channels_to_gray(x)
    return x.contiguous()


def _is_pil(image) -> bool:
    # duck-typed, so that Pillow is not imported unless a user passes one of its images
    return hasattr(image, "getbands") and hasattr(image, "mode") and hasattr(image, "convert")


_INT_SCALE = {torch.uint8: 255.0, torch.uint16: 65535.0}


def _unit_float(x: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.bool:
        return x.to(torch.float32)
    if x.dtype in _INT_SCALE:
        return x.to(torch.float32) / _INT_SCALE[x.dtype]
    if x.dtype.is_floating_point:
        return x.to(torch.float32)
    raise TypeError(f"image dtype {x.dtype} has no known range; pass uint8, uint16, bool, or floating point in [0, 1]")


def _channels_to_gray(x: torch.Tensor) -> torch.Tensor:
    """``[C, H, W]`` (C = 1 grey, 3 RGB, 4 RGBA) -> ``[H, W]``: BT.601 luminance, alpha composited onto black."""
    if x.shape[0] == 1:
        return x[0]
    gray = torch.einsum("chw,c->hw", x[:3], torch.tensor(_LUMA, dtype=x.dtype))
    return gray * x[3] if x.shape[0] == 4 else gray


@dataclass
class PreprocessConfig:
    """The image preprocessing a model expects, stored with its weights (``preprocess_config.json``).

    ``image_size`` S and ``in_chans`` match the model's ViT; ``mean`` / ``std`` normalise each channel
    after the grey image in [0, 1] is resized (longer side to S, antialiased bilinear) and centred on a
    zero-padded S x S square; ``augment`` is the training augmentation (``DEFAULT_AUGMENT`` with the
    given keys replaced).
    """

    image_size: int = 224
    in_chans: int = 1
    mean: tuple = (DEFAULT_MEAN,)
    std: tuple = (DEFAULT_STD,)
    augment: dict = field(default_factory=lambda: dict(DEFAULT_AUGMENT))

    def __post_init__(self):
        self.mean = tuple(float(v) for v in np.atleast_1d(self.mean))
        self.std = tuple(float(v) for v in np.atleast_1d(self.std))
        self.augment = {k: (tuple(v) if isinstance(v, (list, tuple)) else v)
                        for k, v in {**DEFAULT_AUGMENT, **self.augment}.items()}
        ImageTransform.from_config(self)  # validates every field the way the transform does

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str = "preprocess config") -> "PreprocessConfig":
        return dataclass_from_dict(cls, data, where)

    @classmethod
    def from_json(cls, path) -> "PreprocessConfig":
        return cls.from_dict(json.loads(Path(path).read_text()), where=str(path))

    def to_json(self, path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def transforms(self) -> tuple:
        """``(train_transform, eval_transform)``."""
        return ImageTransform.from_config(self, train=True), ImageTransform.from_config(self, train=False)
