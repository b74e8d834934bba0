"""Image loading (real mixed-format chest X-rays, synthetic edge cases, bad files) and the transform."""
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from mlip_fast.preprocess.images import ImageLoadError, load_image, sniff_format
from mlip_fast.preprocess.transforms import ImageTransform, resize_pad

from tests.paths import COVID_CXR
from tests.preprocess.dicom_files import write_dicom

COVID = COVID_CXR / "images"


def _covid_files():
    if not COVID.is_dir():
        pytest.skip(f"real covid_chestxray images not found at {COVID}")
    return sorted(p for p in COVID.iterdir() if p.is_file())


def test_real_images_all_load_by_content():
    files = _covid_files()
    assert len(files) == 443
    png_named_jpg = 0
    for path in files:
        head = path.read_bytes()[:132]
        fmt = sniff_format(head)
        assert fmt in ("png", "jpeg"), path
        if fmt == "png" and path.suffix.lower() in (".jpg", ".jpeg"):
            png_named_jpg += 1
        image = load_image(path, max_side=128)
        assert image.dtype == np.float32 and image.ndim == 2, path
        assert min(image.shape) >= 16 and 0.0 <= image.min() and image.max() <= 1.0, path
        assert image.std() > 0.01, path  # a real radiograph, not a blank decode
    assert png_named_jpg >= 17


def test_real_images_match_pillow_luminance():
    files = _covid_files()
    by_mode = {}
    for path in files:
        with Image.open(path) as img:
            by_mode.setdefault(img.mode, path)
    assert {"L", "RGB"} <= set(by_mode)
    for mode, path in by_mode.items():
        with Image.open(path) as img:
            expected = np.asarray(img.convert("RGB").convert("L"), dtype=np.float32) / 255.0
            alpha = np.asarray(img.getchannel("A"), dtype=np.float32) / 255.0 if mode == "RGBA" else 1.0
        got = load_image(path)
        assert got.shape == expected.shape, (mode, path)
        # Pillow rounds luminance to integers; alpha is composited onto black.
        assert np.abs(got - expected * alpha).max() <= 1.5 / 255, (mode, path)


def test_png_named_jpg_copy_loads(tmp_path):
    files = _covid_files()
    png = next(p for p in files if sniff_format(p.read_bytes()[:8]) == "png")
    disguised = tmp_path / "really_png.jpg"
    shutil.copy(png, disguised)
    np.testing.assert_array_equal(load_image(disguised), load_image(png))


def test_sixteen_bit_png(tmp_path):
    values = (np.arange(60 * 40, dtype=np.uint32).reshape(60, 40) * 27 % 65536).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    got = load_image(path)
    assert got.shape == (60, 40)
    np.testing.assert_allclose(got, values.astype(np.float32) / 65535.0, atol=1e-6)
    stretched = load_image(path, minmax=True)
    assert stretched.min() == 0.0 and stretched.max() == 1.0


def test_modes_grayscale_rgb_rgba_palette(tmp_path):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (30, 50), dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "g.png")
    np.testing.assert_allclose(load_image(tmp_path / "g.png"), gray / 255.0, atol=1e-7)

    rgb = np.stack([gray, gray, gray], -1)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    np.testing.assert_allclose(load_image(tmp_path / "rgb.png"), gray / 255.0, atol=1e-5)

    rgba = np.concatenate([rgb, np.full((30, 50, 1), 128, np.uint8)], -1)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    np.testing.assert_allclose(load_image(tmp_path / "rgba.png"), gray / 255.0 * 128 / 255.0, atol=1e-5)

    pal = Image.fromarray(gray).convert("P")
    pal.save(tmp_path / "p.png")
    expected = np.asarray(pal.convert("L"), dtype=np.float32) / 255.0
    np.testing.assert_allclose(load_image(tmp_path / "p.png"), expected, atol=1.5 / 255)

    Image.fromarray(gray).save(tmp_path / "g.bmp")
    np.testing.assert_allclose(load_image(tmp_path / "g.bmp"), gray / 255.0, atol=1e-7)

    Image.fromarray(gray).save(tmp_path / "g.jpg", quality=95)
    assert np.abs(load_image(tmp_path / "g.jpg") - gray / 255.0).mean() < 0.05


def test_jpeg_draft_keeps_at_least_max_side(tmp_path):
    big = (np.linspace(0, 255, 1600)[None, :] * np.ones((1200, 1))).astype(np.uint8)
    Image.fromarray(big).save(tmp_path / "big.jpg")
    small = load_image(tmp_path / "big.jpg", max_side=300)
    assert max(small.shape) >= 300 and small.shape[1] < 1600
    assert abs(small.shape[0] / small.shape[1] - 0.75) < 0.02


@pytest.mark.parametrize(
    "content, reason",
    [
        (None, "not found"),
        (b"", "empty"),
        (b"this is not an image at all", "unsupported"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "corrupt"),
        (b"\xff\xd8\xff\xe0" + b"\x13" * 30, "corrupt"),
    ],
)
def test_bad_files_raise_naming_the_file(tmp_path, content, reason):
    path = tmp_path / "bad_image.png"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ImageLoadError, match=reason) as info:
        load_image(path)
    assert "bad_image.png" in str(info.value) and info.value.path == str(path)


def test_truncated_real_jpeg(tmp_path):
    files = _covid_files()
    jpeg = next(p for p in files if sniff_format(p.read_bytes()[:8]) == "jpeg" and p.stat().st_size > 20000)
    cut = tmp_path / jpeg.name
    cut.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 3])
    with pytest.raises(ImageLoadError, match=jpeg.name):
        load_image(cut)


def test_dicom_monochrome1_inverted_and_windowed(tmp_path):
    pixels = np.tile(np.arange(0, 4000, 100, dtype=np.uint16), (8, 1))
    mono2 = load_image(write_dicom(tmp_path / "a.bin", pixels, slope=1.0, intercept=0.0))  # no extension: content decides
    mono1 = load_image(write_dicom(tmp_path / "b.dcm", pixels, slope=1.0, intercept=0.0,
                                   photometric="MONOCHROME1"))
    np.testing.assert_allclose(mono2, pixels / pixels.max(), atol=1e-6)
    np.testing.assert_allclose(mono1, 1.0 - mono2, atol=1e-6)
    win = load_image(write_dicom(tmp_path / "c.dcm", pixels, slope=2.0, intercept=-100.0, window=(2000.0, 1001.0)))
    value = pixels * 2.0 - 100.0
    np.testing.assert_allclose(win, np.clip((value - 1999.5) / 1000.0 + 0.5, 0, 1), atol=1e-6)


def test_dicom_without_pydicom_is_a_clear_error(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_pydicom(name, *args, **kwargs):
        if name == "pydicom" or name.startswith("pydicom."):
            raise ImportError("no pydicom")
        return real_import(name, *args, **kwargs)

    path = tmp_path / "scan.dcm"
    path.write_bytes(b"\x00" * 128 + b"DICM" + b"\x00" * 64)
    monkeypatch.setattr(builtins, "__import__", no_pydicom)
    with pytest.raises(ImageLoadError, match="scan.dcm.*pydicom"):
        load_image(path)


# ---------------------------------------------------------------- transforms


def test_resize_pad_keeps_aspect_and_centres():
    wide = torch.ones(50, 100)
    out = resize_pad(wide, 64)
    assert out.shape == (64, 64)
    rows = (out > 0.5).any(1).nonzero().flatten()
    assert rows.numel() == 32 and rows[0] == 16 and rows[-1] == 47
    assert torch.all(out[:16] == 0) and torch.all(out[48:] == 0)
    tall = resize_pad(torch.ones(7, 3), 10)
    cols = (tall > 0.5).any(0).nonzero().flatten()
    assert cols.numel() == 4 and tall.shape == (10, 10)
    same = torch.rand(32, 32)
    assert torch.equal(resize_pad(same, 32), same)


def test_transform_shapes_normalisation_and_channels():
    image = np.full((120, 80), 0.75, dtype=np.float32)
    one = ImageTransform(image_size=48)(image)
    assert one.shape == (1, 48, 48) and one.dtype == torch.float32
    # Image area: (0.75 - 0.5) / 0.25 = 1; padding: (0 - 0.5) / 0.25 = -2.
    assert torch.isclose(one[0, 24, 24], torch.tensor(1.0)) and one[0, 24, 0] == -2.0
    three = ImageTransform(image_size=48, in_chans=3, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))(image)
    assert three.shape == (3, 48, 48)
    np.testing.assert_allclose(three[:, 24, 24].numpy(), [(0.75 - m) / s for m, s in
                                                           [(0.4, 0.2), (0.5, 0.25), (0.6, 0.3)]], rtol=1e-5)
    u8 = ImageTransform(image_size=48)((image * 255).astype(np.uint8))
    assert torch.allclose(u8, one, atol=0.02)
    with pytest.raises(ValueError, match="in_chans"):
        ImageTransform(in_chans=2)
    with pytest.raises(ValueError, match="unknown augment"):
        ImageTransform(augment={"flip": True})
    with pytest.raises(ValueError, match="channels last"):
        ImageTransform(image_size=8)(np.zeros((3, 5, 6), np.float32))


def test_train_augmentation_is_seeded_and_mild():
    rng = np.random.default_rng(0)
    image = rng.random((90, 70)).astype(np.float32)
    train = ImageTransform(image_size=64, train=True)
    a = train(image, generator=torch.Generator().manual_seed(3))
    b = train(image, generator=torch.Generator().manual_seed(3))
    c = train(image, generator=torch.Generator().manual_seed(4))
    plain = ImageTransform(image_size=64)(image)
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, plain)
    # Mild: the augmented image stays correlated with the plain one.
    corr = torch.corrcoef(torch.stack([a.flatten(), plain.flatten()]))[0, 1]
    assert corr > 0.5
    off = ImageTransform(image_size=64, train=True, augment={"degrees": 0, "scale": (1, 1), "translate": 0})
    assert torch.equal(off(image), plain)


def test_warp_grid_equals_affine_grid():
    """The transform's affine warp samples at F.affine_grid's points (fp32 rounding apart), odd sizes too."""
    from mlip_fast.preprocess.transforms import _warp

    gen = torch.Generator().manual_seed(0)
    for h, w in ((33, 33), (17, 40), (64, 64)):
        theta = torch.tensor([[[0.93, -0.2, 0.05], [0.21, 1.04, -0.07]]])
        x = torch.rand(h, w, generator=gen)
        grid = torch.nn.functional.affine_grid(theta.double(), [1, 1, h, w], align_corners=False)
        ref = torch.nn.functional.grid_sample(x.double()[None, None], grid, align_corners=False)[0, 0]
        # fp32 grid coordinates are off by ~1e-7, i.e. ~1e-5 px; the bilinear slope is at most 1 per px
        torch.testing.assert_close(_warp(x, theta), ref.float(), rtol=0, atol=1e-5)


def test_train_transform_resamples_once_for_mild_reductions():
    """Resize + pad + affine as one resampling: exact for an S x S image, within fp32 rounding when only
    padding is involved, close to antialiased resizing at 256 -> 224 px, and unused below FUSED_MIN_SCALE."""
    from mlip_fast.preprocess.transforms import FUSED_MIN_SCALE, _warp

    def two_step(image, size, seed):
        theta = ImageTransform(size, train=True)._random_theta(torch.Generator().manual_seed(seed))
        return _warp(resize_pad(torch.from_numpy(image), size), theta)

    def smooth(h, w):  # radiograph-like content
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        return (0.5 + 0.3 * np.sin(9 * xx + 4 * yy) * np.cos(6 * yy)).astype(np.float32)

    for (h, w), size, atol in (((48, 48), 48, 0.0), ((40, 48), 48, 1e-5), ((37, 29), 37, 1e-5)):
        image = np.random.default_rng(h).random((h, w)).astype(np.float32)
        fused = ImageTransform(size, train=True, mean=0.0, std=1.0)(image, torch.Generator().manual_seed(3))[0]
        torch.testing.assert_close(fused, two_step(image, size, 3), rtol=0, atol=atol)
    image = smooth(307, 256)
    fused = ImageTransform(224, train=True, mean=0.0, std=1.0)(image, torch.Generator().manual_seed(1))[0]
    assert (fused - two_step(image, 224, 1)).abs().mean() < 0.004
    image = smooth(600, 500)
    assert 224 / 600 < FUSED_MIN_SCALE
    strong = ImageTransform(224, train=True, mean=0.0, std=1.0)(image, torch.Generator().manual_seed(2))[0]
    assert torch.equal(strong, two_step(image, 224, 2))


def test_affine_rotation_direction_is_a_pure_rotation():
    """A 90-degree setting rotates a single bright pixel on the expected circle around the centre."""
    image = np.zeros((33, 33), np.float32)
    image[16, 28] = 1.0
    t = ImageTransform(image_size=33, train=True, mean=0.0, std=1.0,
                       augment={"degrees": 90.0, "scale": (1, 1), "translate": 0})
    out = t(image, generator=torch.Generator().manual_seed(0))[0]
    y, x = np.unravel_index(int(out.argmax()), out.shape)
    assert abs(np.hypot(y - 16, x - 16) - 12) <= 1.5


def test_mask_follows_the_image_geometry():
    rng = np.random.default_rng(1)
    image = rng.random((60, 90)).astype(np.float32)
    mask = np.zeros((60, 90), np.uint8)
    mask[20:40, 10:30] = 255
    image[mask > 0] = 1.0
    plain = ImageTransform(image_size=45, mean=0.0, std=1.0)
    x, m = plain(image, mask=mask)
    assert m.dtype == torch.bool and m.shape == (45, 45)
    assert x[0][m].mean() > 0.9  # the mask sits on the bright square
    train = ImageTransform(image_size=45, train=True, mean=0.0, std=1.0, augment={"degrees": 20.0})
    xa, ma = train(image, generator=torch.Generator().manual_seed(5), mask=mask)
    xb = train(image, generator=torch.Generator().manual_seed(5))
    assert torch.equal(xa, xb)
    assert xa[0][ma].mean() > 0.85 and abs(int(ma.sum()) - int(m.sum())) < 0.3 * int(m.sum())
    with pytest.raises(ValueError, match="mask shape"):
        plain(image, mask=mask[:10])
