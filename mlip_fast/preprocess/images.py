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
- DICOM: pydicom's own ``apply_modality_lut`` (Modality LUT Sequence or RescaleSlope / RescaleIntercept)
  then ``apply_voi_lut`` (the first VOI LUT Sequence item, else the first window with its VOI LUT
  Function: LINEAR, LINEAR_EXACT or SIGMOID), scaled from the VOI output range to [0, 1] (``0 .. 2^n - 1``
  for an n-bit VOI LUT, pydicom's window output range for a window); without any VOI the min-max range
  of the modality values (also when the window is one pydicom refuses, e.g. a width below 1);
  MONOCHROME1 is inverted so that bone is bright, as in MONOCHROME2 and in every
  PNG/JPEG export.

``pil_to_gray(image)`` applies the same conventions to an already opened Pillow image (the transforms
take one).
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

__all__ = ["ImageLoadError", "load_image", "sniff_format", "pil_to_gray"]

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
# Pillow formats whose EXIF orientation tag is applied (as viewers do)
_EXIF_FORMATS = ("JPEG", "MPO", "TIFF", "WEBP")


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
    with Image.open(io.BytesIO(data)) as img:
        if fmt == "jpeg" and max_side:
            # JPEG DCT scaling: decode at 1/2, 1/4 or 1/8 size while staying >= max_side.
            img.draft(img.mode if img.mode in ("L", "RGB") else None, (max_side, max_side))
        img.load()
        return pil_to_gray(img)


def pil_to_gray(img) -> np.ndarray:
    """A Pillow image of any mode (1, L, LA, I;16*, I, F, P, PA, RGB, RGBA, CMYK, ...) -> float32 ``[H, W]``
    with the module's intensity conventions (8-bit / 255, 16-bit / 65535, colour to BT.601 luminance,
    alpha composited onto black); the EXIF orientation of a JPEG / TIFF / WebP is applied first."""
    if img.format in _EXIF_FORMATS:
        img = ImageOps.exif_transpose(img)
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
    from pydicom.pixels import apply_modality_lut

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
    values = apply_modality_lut(arr, ds)
    out = _apply_voi(values, ds)
    if out is None:
        out = _minmax(np.asarray(values, dtype=np.float64))
    if photometric == "MONOCHROME1":
        out = 1.0 - out
    return out.astype(np.float32)


def _apply_voi(values: np.ndarray, ds) -> np.ndarray | None:
    """pydicom's ``apply_voi_lut`` on the modality values, scaled from its output range to [0, 1]; None
    when the dataset has no usable VOI (no LUT Sequence item with descriptor and data, no window)."""
    from pydicom.pixels import apply_voi_lut, apply_windowing

    item = (ds.get("VOILUTSequence") or [None])[0]
    if item is not None and item.get("LUTDescriptor") is not None and item.get("LUTData") is not None:
        if values.dtype.kind == "f" and np.array_equal(values, np.round(values)):
            values = values.astype(np.int64)  # a LUT is indexed by integers (rescale made them floats)
        depth = int(item.LUTDescriptor[2])
        return np.clip(apply_voi_lut(values, ds).astype(np.float64) / (2**depth - 1), 0.0, 1.0)
    if ds.get("WindowCenter") is None or ds.get("WindowWidth") is None:
        return None
    try:
        windowed = apply_voi_lut(values, ds)
        # the window's output range, exactly as pydicom derives it (bits stored, sign, rescale, LUT depth):
        # its function sends -inf to the bottom and +inf to the top of that range, for every VOI LUT Function
        lo, hi = apply_windowing(np.array([-np.inf, np.inf]), ds)
    except ValueError:
        return None  # a window pydicom refuses (width < 1 for LINEAR, an unknown function): the image is still usable
    if not hi > lo:
        return None
    return np.clip((windowed - lo) / (hi - lo), 0.0, 1.0)
