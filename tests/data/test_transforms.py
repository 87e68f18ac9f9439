import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from deltamask.data import DataError, iter_prepared, prepare_images


def test_grayscale_becomes_three_equal_channels_of_the_requested_size():
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    out = prepare_images(images, 64, 3, mean=(0.0,), std=(1.0,))
    assert out.shape == (5, 3, 64, 64) and out.dtype == torch.float32
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 0], out[:, 2])
    assert 0.0 <= out.min() and out.max() <= 1.0


def test_normalisation_is_per_channel_on_the_0_1_scale():
    images = np.empty((2, 10, 12, 3), np.uint8)
    images[..., 0], images[..., 1], images[..., 2] = 255, 0, 51
    mean, std = (0.5, 0.25, 0.1), (0.5, 0.25, 0.2)
    out = prepare_images(images, 7, 3, mean, std)  # bilinear resizing keeps a constant image constant
    expected = [(1.0 - 0.5) / 0.5, (0.0 - 0.25) / 0.25, (0.2 - 0.1) / 0.2]
    for c in range(3):
        assert torch.allclose(out[:, c], torch.full((2, 7, 7), expected[c]), atol=1e-5)


def test_resizing_is_antialiased_bilinear_without_corner_alignment():
    images = np.random.default_rng(1).integers(0, 256, (3, 40, 40), dtype=np.uint8)
    x = torch.from_numpy(images).float().div(255).unsqueeze(1)
    expected = F.interpolate(x, size=(16, 16), mode="bilinear", antialias=True, align_corners=False)
    assert torch.allclose(prepare_images(images, 16, 1, (0.0,), (1.0,)), expected, atol=1e-6)
    same = prepare_images(images, 40, 1, (0.0,), (1.0,))  # no resize at the native size: exact
    assert torch.equal(same, x)


def test_colour_to_one_channel_uses_luma():
    images = np.zeros((1, 4, 4, 3), np.uint8)
    images[..., 1] = 255
    out = prepare_images(images, 4, 1, (0.0,), (1.0,))
    assert out.shape == (1, 1, 4, 4) and torch.allclose(out, torch.full_like(out, 0.587))


@pytest.mark.parametrize("batch", [1, 4, 7, 100])
def test_batches_concatenate_to_the_full_tensor(batch):
    images = np.random.default_rng(2).integers(0, 256, (10, 9, 11, 3), dtype=np.uint8)
    full = prepare_images(images, 8, 3)
    parts = list(iter_prepared(images, batch, 8, 3))
    assert [len(p) for p in parts] == [min(batch, 10 - i) for i in range(0, 10, batch)]
    assert torch.equal(torch.cat(parts), full)


@pytest.mark.parametrize("images, message", [
    (np.zeros((2, 8, 8), np.float32), "uint8"),
    ([[[0]]], "uint8"),
    (np.zeros((8, 8), np.uint8), "shape"),
    (np.zeros((2, 8, 8, 2), np.uint8), "shape"),
])
def test_wrong_images_raise_data_error(images, message):
    with pytest.raises(DataError, match=message):
        prepare_images(images, 8, 3)


def test_wrong_settings_raise_data_error():
    images = np.zeros((1, 8, 8), np.uint8)
    with pytest.raises(DataError, match="mean and std"):
        prepare_images(images, 8, 3, mean=(0.1, 0.2), std=(1.0,))
    with pytest.raises(DataError, match="mean and std"):
        prepare_images(images, 8, 3, mean=(0.1,), std=(0.0,))
    with pytest.raises(DataError, match="channels"):
        prepare_images(images, 8, 2)
    with pytest.raises(DataError, match="batch"):
        next(iter_prepared(images, 0, 8))


def test_the_data_package_imports_without_torch():
    code = "import sys; sys.modules['torch'] = None; import deltamask.data; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
