"""The registry: names, errors, the split and its frozen statistics, d for every backbone (meta device)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports timm or huggingface_hub

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from deltamask.errors import DeltaMaskError, ModelError  # noqa: E402
from deltamask.learn.models import BACKBONES, Backbone, load_backbone, masked_weight_count  # noqa: E402

# d = Linear/Conv weights of the last 5 blocks (what deltamask.learn.masking masks), measured here;
# docs/design.md section 6.2's second column counts every parameter of those 5 blocks (biases, norms,
# LayerScale too).
D_LAST_5 = {
    "clip_vit_b32": (35_389_440, 35_439_360),
    "clip_vit_l14": (62_914_560, 62_981_120),
    "dinov2_s14": (8_847_360, 8_876_160),
    "dinov2_b14": (35_389_440, 35_447_040),
    "convmixer_768_32": (3_137_280, 3_160_320),
}


def block_params(backbone: Backbone) -> int:
    """Every parameter of the masked blocks, without the final norm and pooling."""
    blocks = getattr(backbone.masked, "blocks", backbone.masked)
    return sum(p.numel() for m in blocks if not isinstance(m, nn.LayerNorm) for p in m.parameters())


def test_unknown_backbone_lists_the_known_names():
    with pytest.raises(ModelError, match="unknown backbone 'resnet50'") as err:
        load_backbone("resnet50")
    assert all(name in str(err.value) for name in BACKBONES)
    assert isinstance(err.value, DeltaMaskError) and isinstance(err.value, ValueError)


@pytest.mark.parametrize("blocks", [0, 7, -1, True, 2.0, "5"])
def test_blocks_out_of_range_is_a_model_error(blocks):
    with pytest.raises(ModelError, match=r"tiny has 6 blocks; blocks must be an int in 1\.\.6"):
        load_backbone("tiny", blocks=blocks)


@pytest.mark.parametrize("name", ["tiny", "mobilenet_v2", "dinov2_s14", "clip_vit_l14"])
def test_missing_weight_file_names_the_path(name, tmp_path):
    missing = tmp_path / "no" / "such.pth"
    with pytest.raises(ModelError, match="not found") as err:
        load_backbone(name, weights=missing)
    assert str(missing) in str(err.value)


def test_tiny_is_seeded_and_splits_into_prefix_and_last_blocks():
    a, b, c = load_backbone("tiny"), load_backbone("tiny"), load_backbone("tiny", seed=1)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(a.features(x), b.features(x))
        assert not torch.equal(a.features(x), c.features(x))
        assert a.features(x).shape == (3, a.feature_dim) == (3, 32)
    assert (len(a.prefix), a.blocks, masked_weight_count(a)) == (1, 5, 6_768)
    assert masked_weight_count(load_backbone("tiny", blocks=2)) == 16 * 8 * 9 + 32 * 16 * 9
    assert not any(p.requires_grad for p in list(a.prefix.parameters()) + list(a.masked.parameters()))


def test_tiny_loads_a_saved_state_dict_and_takes_three_channels(tmp_path):
    from deltamask.learn.models.tiny import tiny_model
    path = tmp_path / "tiny.pth"
    torch.save(tiny_model(channels=3, seed=7).state_dict(), path)
    loaded, seeded = load_backbone("tiny", weights=path, channels=3), load_backbone("tiny", channels=3, seed=7)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded.features(x), seeded.features(x))
    assert loaded.weights == str(path) and loaded.preprocessing.channels == 3


def test_train_mode_keeps_batchnorm_statistics_and_the_function():
    bb = load_backbone("tiny", blocks=3)
    with torch.no_grad():  # running statistics that differ from the init, so that a reset would show
        for m in bb.masked.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    before = {k: v.clone() for k, v in bb.masked.state_dict().items()}
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        expected = bb.features(x)
        bb.prefix.train()
        bb.masked.train()
        assert torch.equal(bb.features(x), expected)
    assert all(torch.equal(v, before[k]) for k, v in bb.masked.state_dict().items())
    assert bb.masked.training and not any(m.training for m in bb.masked.modules() if isinstance(m, nn.BatchNorm2d))
    assert all(m.training for m in bb.masked.modules() if isinstance(m, nn.Conv2d))  # masks may read it


def test_masking_module_covers_exactly_the_counted_weights():
    from deltamask.learn.masking import MaskedModule
    bb = load_backbone("tiny")
    assert MaskedModule(bb.masked).d == masked_weight_count(bb) == 6_768


@pytest.mark.parametrize("name", sorted(D_LAST_5))
def test_timm_masked_weight_count_matches_the_architecture(name):
    with torch.device("meta"):  # architecture only: no memory, no init time
        bb = load_backbone(name, weights=None)
    d, all_params = D_LAST_5[name]
    assert masked_weight_count(bb) == d
    assert block_params(bb) == all_params
    assert bb.blocks == 5 and bb.weights is None and bb.preprocessing.size == 224
