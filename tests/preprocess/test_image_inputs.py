"""What a user can hand the transforms (Pillow images of every mode, 8/16-bit, numpy, tensors, paths), each
against luminance / scaling written out in fp64 here, and DICOM through pydicom's modality and VOI LUTs
(VOI LUT Sequence, LINEAR_EXACT and SIGMOID windows) against the DICOM formulas."""
import numpy as np
import pytest
import torch
from PIL import Image

from mlip_fast.preprocess.images import load_image
from mlip_fast.preprocess.transforms import ImageTransform, to_gray

from tests.paths import COVID_CXR
from tests.preprocess.dicom_files import write_dicom

LUMA = np.array([0.299, 0.587, 0.114])
# float32 arithmetic on values in [0, 1]: a few ulps of 1.0
ATOL = 1e-6


def rgb_array(h=23, w=31, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def check(actual: torch.Tensor, expected: np.ndarray):
    assert actual.dtype == torch.float32 and tuple(actual.shape) == expected.shape
    np.testing.assert_allclose(actual.numpy(), expected, atol=ATOL, rtol=0)


def test_pil_modes_8_and_16_bit():
    rgb = rgb_array()
    alpha = np.random.default_rng(1).integers(0, 256, rgb.shape[:2], dtype=np.uint8)
    grey = rgb[..., 0]
    wide = np.random.default_rng(2).integers(0, 65536, (17, 9), dtype=np.uint16)
    check(to_gray(Image.fromarray(grey)), grey / 255.0)
    check(to_gray(Image.fromarray(wide)), wide / 65535.0)                    # mode I;16
    check(to_gray(Image.fromarray(wide.astype(np.int32))), wide / 65535.0)   # mode I (16-bit PNG as Pillow opens it)
    check(to_gray(Image.fromarray(rgb)), (rgb / 255.0) @ LUMA)
    rgba = np.dstack([rgb, alpha])
    check(to_gray(Image.fromarray(rgba)), (rgb / 255.0) @ LUMA * (alpha / 255.0))
    check(to_gray(Image.fromarray(grey).convert("LA")), grey / 255.0)       # opaque alpha
    check(to_gray(Image.fromarray(grey > 127)), (grey > 127).astype(np.float64))  # mode 1
    palette = Image.fromarray(rgb).quantize(16)
    check(to_gray(palette), (np.asarray(palette.convert("RGB")) / 255.0) @ LUMA)


def test_arrays_tensors_and_paths_agree_with_pil(tmp_path):
    rgb = rgb_array()
    alpha = np.random.default_rng(3).integers(0, 256, rgb.shape[:2], dtype=np.uint8)
    expected = (rgb / 255.0) @ LUMA
    check(to_gray(rgb), expected)                                            # numpy [H, W, 3]
    check(to_gray(torch.from_numpy(rgb).permute(2, 0, 1)), expected)         # tensor [3, H, W]
    check(to_gray(np.dstack([rgb, alpha])), expected * alpha / 255.0)        # RGBA
    check(to_gray(rgb[..., :1]), rgb[..., 0] / 255.0)                        # [H, W, 1]
    wide = np.random.default_rng(4).integers(0, 65536, (5, 7), dtype=np.uint16)
    check(to_gray(wide), wide / 65535.0)
    check(to_gray(torch.from_numpy(wide)), wide / 65535.0)
    check(to_gray(np.eye(4, dtype=bool)), np.eye(4))
    check(to_gray(torch.full((2, 3), 0.25, dtype=torch.float64)), np.full((2, 3), 0.25))
    Image.fromarray(rgb).save(tmp_path / "x.png")
    check(to_gray(tmp_path / "x.png"), (rgb / 255.0) @ LUMA)                 # a Path
    check(to_gray(str(tmp_path / "x.png")), (rgb / 255.0) @ LUMA)            # a str
    with pytest.raises(TypeError, match="int32 has no known range"):
        to_gray(np.zeros((4, 4), np.int32))
    with pytest.raises(TypeError, match="PIL image, a numpy array, a tensor or an image file path"):
        to_gray([[0.0, 1.0]])
    with pytest.raises(ValueError, match="channels first"):
        to_gray(torch.zeros(5, 4, 3))


def test_transform_takes_a_real_pil_image_like_its_grey_array():
    """A real RGB chest X-ray as Image.open gives it: the transform equals the transform of its luminance
    computed here; masks follow the same geometry; the path gives the loader's image."""
    path = next((p for p in sorted((COVID_CXR / "images").glob("*.jp*g")) if Image.open(p).mode == "RGB"), None)
    if path is None:
        pytest.skip(f"no real RGB JPEG under {COVID_CXR}")
    tf = ImageTransform(64, in_chans=3)
    with Image.open(path) as img:
        out = tf(img)
        expected_grey = (np.asarray(img, dtype=np.float64) / 255.0) @ LUMA
    assert out.shape == (3, 64, 64) and torch.equal(out[0], out[2])
    torch.testing.assert_close(out, tf(expected_grey.astype(np.float32)), atol=4 * ATOL / 0.25, rtol=0)
    mask = np.zeros(expected_grey.shape, bool)
    mask[: mask.shape[0] // 2] = True
    with Image.open(path) as img:
        _, m = ImageTransform(64)(img, mask=mask)
    assert m.shape == (64, 64) and 0.3 < m.float().mean() < 0.7
    assert torch.equal(tf(path), tf(load_image(path, max_side=64)))


# ---------------------------------------------------------------- DICOM through pydicom's LUTs


PIXELS = np.tile(np.arange(0, 4096, 64, dtype=np.uint16), (4, 1))  # 12-bit ramp, [4, 64]


def test_dicom_voi_lut_sequence(tmp_path):
    lut = np.round(65535 * np.sqrt(np.arange(4096) / 4095))  # a non-linear VOI LUT, 16-bit output
    out = load_image(write_dicom(tmp_path / "lut.dcm", PIXELS, voi_lut=lut))
    np.testing.assert_allclose(out, lut[PIXELS] / 65535, atol=ATOL)
    # the LUT takes precedence over a window in the same dataset, as DICOM viewers do by default
    both = load_image(write_dicom(tmp_path / "both.dcm", PIXELS, voi_lut=lut, window=(100.0, 50.0)))
    np.testing.assert_array_equal(both, out)
    inverted = load_image(write_dicom(tmp_path / "m1.dcm", PIXELS, voi_lut=lut, photometric="MONOCHROME1"))
    np.testing.assert_allclose(inverted, 1 - out, atol=ATOL)


def test_dicom_sigmoid_and_linear_exact_windows_after_the_rescale(tmp_path):
    value = PIXELS * 2.0 - 1024.0  # modality values (HU-like) after slope 2, intercept -1024
    c, w = 1500.0, 800.0
    sig = load_image(write_dicom(tmp_path / "s.dcm", PIXELS, slope=2.0, intercept=-1024.0, window=(c, w),
                                 function="SIGMOID"))
    np.testing.assert_allclose(sig, 1 / (1 + np.exp(-4 * (value - c) / w)), atol=ATOL)
    exact = load_image(write_dicom(tmp_path / "e.dcm", PIXELS, slope=2.0, intercept=-1024.0, window=(c, w),
                                   function="LINEAR_EXACT"))
    np.testing.assert_allclose(exact, np.clip((value - c) / w + 0.5, 0, 1), atol=ATOL)
    several = load_image(write_dicom(tmp_path / "m.dcm", PIXELS, slope=2.0, intercept=-1024.0,
                                     window=([c, 40.0], [w, 400.0]), function="LINEAR_EXACT"))
    np.testing.assert_array_equal(several, exact)  # the first of several windows
    # a window pydicom refuses (LINEAR needs width >= 1): the min-max range of the modality values
    refused = load_image(write_dicom(tmp_path / "r.dcm", PIXELS, slope=2.0, intercept=-1024.0, window=(c, 0.5)))
    np.testing.assert_allclose(refused, (value - value.min()) / (value.max() - value.min()), atol=ATOL)
