"""ImageTransform.batch: a training batch resampled in a few batched operators, bitwise the per-image transform."""
import numpy as np
import pytest
import torch

from mlip_fast.preprocess.transforms import ImageTransform


def _images(shapes, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    if dtype == np.uint8:
        return [rng.integers(0, 256, shape, dtype=np.uint8) for shape in shapes]
    return [rng.random(shape, dtype=np.float32) for shape in shapes]


def _one_by_one(transform, images, seeds):
    return torch.stack([transform(im, generator=torch.Generator().manual_seed(s)) for im, s in zip(images, seeds)])


SEEDS = [0, 1, 2**62 + 3, 123456789, 42, 7, 2**40, 99]


@pytest.mark.parametrize("size,shape,in_chans", [
    (64, (64, 64), 1),   # the default run: the fused path, one shape
    (64, (64, 64), 3),
    (64, (80, 50), 1),   # not square: the fit to the canvas is part of the map
    (32, (64, 64), 1),   # a reduction of 2: still fused
    (48, (30, 40), 1),   # an enlargement
])
def test_training_batch_is_bitwise_the_per_image_transform(size, shape, in_chans):
    transform = ImageTransform(size, train=True, in_chans=in_chans, mean=0.4, std=0.3)
    images = _images([shape] * len(SEEDS))
    got = transform.batch(images, SEEDS)
    assert got.shape == (len(SEEDS), in_chans, size, size) and got.is_contiguous()
    assert torch.equal(got, _one_by_one(transform, images, SEEDS))
    # each sample's draw depends on its own seed only: reordering the batch reorders the output
    order = [3, 1, 0, 2, 7, 6, 5, 4]
    assert torch.equal(transform.batch([images[i] for i in order], [SEEDS[i] for i in order]), got[order])


@pytest.mark.parametrize("case", ["mixed shapes", "strong reduction", "eval", "no augmentation", "uint8"])
def test_other_batches_take_the_per_image_path_with_the_same_result(case):
    shapes = [(64, 64)] * 4
    kwargs = {"train": True}
    dtype = np.float32
    if case == "mixed shapes":
        shapes = [(64, 64), (70, 64), (64, 64), (50, 90)]
    elif case == "strong reduction":
        shapes = [(256, 256)] * 4  # 64 / 256 < FUSED_MIN_SCALE: antialiased resize first
    elif case == "eval":
        kwargs = {"train": False}
    elif case == "no augmentation":
        kwargs["augment"] = {"degrees": 0, "scale": (1, 1), "translate": 0}
    else:
        dtype = np.uint8
    transform = ImageTransform(64, **kwargs)
    images = _images(shapes, dtype=dtype)
    assert torch.equal(transform.batch(images, SEEDS[:4]), _one_by_one(transform, images, SEEDS[:4]))


def test_batch_needs_one_seed_per_image():
    transform = ImageTransform(64, train=True)
    with pytest.raises(ValueError, match="2 images and 3 seeds"):
        transform.batch(_images([(64, 64)] * 2), [1, 2, 3])
