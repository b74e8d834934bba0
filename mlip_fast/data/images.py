"""Image loading for chest X-rays: one grayscale float array per file, format decided by content.

``load_image(path) -> np.ndarray float32 [H, W] in [0, 1]``. The file's bytes decide the decoder (PNG,
JPEG, BMP, TIFF, GIF, WebP through Pillow; DICOM through pydicom when installed), never its extension:
public chest X-ray sets contain PNG files named ``.jpg``. Every failure (missing, empty, truncated,
corrupt, unsupported format, DICOM without pydicom) raises ``ImageLoadError`` naming the file.

Intensity conventions:
- 8-bit images are divided by 255, 16-bit by 65535 (the container's range: a 12-bit image stored in 16
  bits stays dark; the transform's normalisation, or ``minmax=True``, takes care of contrast);
- colour images become luminance (ITU-R BT.601 weights, as Pillow's "L"); alpha is composited onto
  black (the background of a radiograph); palette images are expanded first;
- DICOM: the modality LUT (RescaleSlope / RescaleIntercept) is applied, then the first VOI window
  (WindowCenter / WindowWidth) when present, else the min-max range; MONOCHROME1 is inverted so that
  bone is bright, as in MONOCHROME2 and in every PNG/JPEG export.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

__all__ = ["ImageLoadError", "load_image", "sniff_format"]

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


class ImageLoadError(Exception):
    """An image file could not be read. ``path`` names the file, ``reason`` says why."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot load image '{self.path}': {reason}")


def sniff_format(head: bytes) -> str | None:
    """The image format named by the first bytes of a file ("png", "jpeg", "dicom", "bmp", "tiff",
    "gif", "webp"), or None when unknown. DICOM is recognised by its "DICM" tag at byte 128."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(b"BM"):
        return "bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return None


def load_image(path: str | os.PathLike, *, minmax: bool = False, max_side: int | None = None) -> np.ndarray:
    """Load one image as grayscale float32 ``[H, W]`` in ``[0, 1]``.

    Args:
        path: file to read; its content, not its extension, decides the decoder.
        minmax: stretch the result to the full ``[0, 1]`` range (constant images become zeros).
        max_side: a hint that the caller will downsample so the longer side is ``max_side``: large
            JPEGs are then decoded at a reduced scale (never below ``max_side``), which is several times
            faster. The returned array can still be larger than ``max_side``.

    Raises:
        ImageLoadError: missing, empty, truncated, corrupt or unsupported file (the message names it).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImageLoadError(path, "file not found") from None
    except OSError as err:
        raise ImageLoadError(path, f"cannot read file ({err.strerror or err})") from None
    if not data:
        raise ImageLoadError(path, "file is empty")
    fmt = sniff_format(data[:132])
    if fmt is None and path.suffix.lower() in (".dcm", ".dicom"):
        fmt = "dicom"  # DICOM files written without the 128-byte preamble
    if fmt is None:
        raise ImageLoadError(path, f"unsupported or unrecognised image format (first bytes {data[:8]!r})")
    try:
        image = _decode_dicom(data) if fmt == "dicom" else _decode_pillow(data, fmt, max_side)
    except ImageLoadError as err:
        raise ImageLoadError(path, err.reason) from None
    except Exception as err:  # decoders raise many types (OSError, SyntaxError, ValueError, ...)
        raise ImageLoadError(path, f"corrupt or truncated {fmt.upper()} data ({type(err).__name__}: {err})") from None
    if image.ndim != 2 or image.size == 0:
        raise ImageLoadError(path, f"decoded to an unexpected shape {image.shape}")
    if not np.isfinite(image).all():
        raise ImageLoadError(path, "decoded pixels contain NaN or infinity")
    if minmax:
        image = _minmax(image)
    return np.ascontiguousarray(np.clip(image, 0.0, 1.0), dtype=np.float32)


def _minmax(image: np.ndarray) -> np.ndarray:
    lo, hi = float(image.min()), float(image.max())
    if hi <= lo:
        return np.zeros_like(image, dtype=np.float32)
    return ((image - lo) / (hi - lo)).astype(np.float32)


def _decode_pillow(data: bytes, fmt: str, max_side: int | None) -> np.ndarray:
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as img:
        if fmt == "jpeg" and max_side:
            # JPEG DCT scaling: decode at 1/2, 1/4 or 1/8 size while staying >= max_side.
            img.draft(img.mode if img.mode in ("L", "RGB") else None, (max_side, max_side))
        img.load()
        if fmt in ("jpeg", "tiff", "webp"):
            img = ImageOps.exif_transpose(img)
        return _pil_to_gray(img)


def _pil_to_gray(img) -> np.ndarray:
    mode = img.mode
    if mode == "1":
        return np.asarray(img, dtype=np.float32)
    if mode == "L":
        return np.asarray(img, dtype=np.float32) / 255.0
    if mode == "LA":
        arr = np.asarray(img, dtype=np.float32) / 255.0
        return arr[..., 0] * arr[..., 1]
    if mode.startswith("I;16"):
        return np.asarray(img).astype(np.float32) / 65535.0
    if mode == "I":
        arr = np.asarray(img).astype(np.float64)
        # Pillow opens 16-bit PNGs as "I": values fit 16 bits; wider data is scaled by its own range.
        if arr.min() >= 0 and arr.max() <= 65535:
            return (arr / 65535.0).astype(np.float32)
        return _minmax(arr)
    if mode == "F":
        return _minmax(np.asarray(img, dtype=np.float32))
    if mode == "P" or mode == "PA":
        img = img.convert("RGBA" if ("transparency" in img.info or mode == "PA") else "RGB")
        mode = img.mode
    if mode not in ("RGB", "RGBA"):
        img = img.convert("RGB")
        mode = "RGB"
    arr = np.asarray(img, dtype=np.float32) / 255.0
    gray = arr[..., :3] @ _LUMA
    if mode == "RGBA":
        gray = gray * arr[..., 3]
    return gray


def _decode_dicom(data: bytes) -> np.ndarray:
    try:
        import pydicom
    except ImportError:
        raise ImageLoadError("", "DICOM file, but pydicom is not installed (pip install pydicom)") from None
    ds = pydicom.dcmread(io.BytesIO(data), force=True)
    if "PixelData" not in ds:
        raise ImageLoadError("", "DICOM file has no pixel data")
    arr = np.asarray(ds.pixel_array)
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames > 1:
        arr = arr[0]
    if photometric in ("RGB", "YBR_FULL", "YBR_FULL_422") or arr.ndim == 3:
        if photometric.startswith("YBR"):
            from pydicom.pixels import convert_color_space

            arr = convert_color_space(arr, photometric, "RGB")
        scale = float(np.iinfo(arr.dtype).max) if arr.dtype.kind in "ui" else 1.0
        return (arr[..., :3].astype(np.float32) / scale) @ _LUMA
    values = arr.astype(np.float64)
    slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    values = values * slope + intercept
    center, width = _first(getattr(ds, "WindowCenter", None)), _first(getattr(ds, "WindowWidth", None))
    if center is not None and width is not None and width > 1:
        # DICOM PS3.3 C.11.2.1.2 linear VOI function.
        out = np.clip((values - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)
    else:
        out = _minmax(values)
    if photometric == "MONOCHROME1":
        out = 1.0 - out
    return out.astype(np.float32)


def _first(value) -> float | None:
    if value is None:
        return None
    try:
        return float(value[0]) if hasattr(value, "__len__") and not isinstance(value, str) else float(value)
    except (TypeError, ValueError, IndexError):
        return None
