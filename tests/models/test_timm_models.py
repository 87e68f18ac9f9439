"""timm backbones: the split reproduces forward_features + forward_head(pre_logits=True) exactly."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports timm or huggingface_hub

import pytest  # noqa: E402
import torch  # noqa: E402

from deltamask.errors import ModelError  # noqa: E402
from deltamask.learn.models import load_backbone  # noqa: E402
from deltamask.learn.models import timm_models as tm  # noqa: E402


@pytest.mark.parametrize("name, size", [("clip_vit_b32", 64), ("dinov2_s14", 28), ("convmixer_768_32", 32)])
def test_features_from_a_weight_file_equal_the_timm_model(name, size, tmp_path):
    torch.manual_seed(0)
    model = tm.create_model(name, weights=None, size=size).eval()
    with torch.no_grad():  # move off the init (DINOv2's LayerScale starts near 0: blocks ~ identity)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path / f"{name}.pth"
    torch.save(model.state_dict(), path)
    bb = load_backbone(name, weights=path, size=size)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = model.forward_head(model.forward_features(x), pre_logits=True)
        assert torch.equal(bb.features(x), expected)
        bb.prefix.train()
        bb.masked.train()
        assert torch.equal(bb.features(x), expected)
    assert expected.shape == (2, bb.feature_dim) and bb.weights == str(path)
    assert not any(n.startswith("vit.blocks.") and int(n.split(".")[2]) >= len(model.blocks) - 5
                   for n, _ in bb.prefix.named_parameters())  # the prefix holds no masked block


def test_clip_uses_openai_preprocessing_and_quickgelu():
    with torch.device("meta"):
        bb = load_backbone("clip_vit_b32", weights=None, blocks=3, size=96)
    assert bb.preprocessing.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert bb.preprocessing.size == 96 and len(bb.masked.blocks) == 3
    assert "QuickGELU" in {type(m).__name__ for m in bb.masked.modules()}


def test_default_weights_missing_from_the_cache_name_the_fix(tmp_path, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache, whatever this machine has
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError) as err:
        load_backbone("convmixer_768_32")
    assert "convmixer_768_32.in1k" in str(err.value) and "weights=PATH" in str(err.value)
    assert "HF_HUB_OFFLINE=0" in str(err.value)


def test_default_weights_come_from_a_filled_hugging_face_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants
    from safetensors.torch import save_file
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    model = tm.create_model("convmixer_768_32", weights=None).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    repo, commit = tmp_path / "models--timm--convmixer_768_32.in1k", "0" * 40  # the hub cache layout
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(repo / "snapshots" / commit / "model.safetensors"))
    bb = load_backbone("convmixer_768_32", size=32)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(bb.features(x), model.forward_head(model.forward_features(x), pre_logits=True))
    assert bb.weights == "hf-hub:timm/convmixer_768_32.in1k"


def test_a_file_of_the_wrong_model_is_a_model_error(tmp_path):
    path = tmp_path / "wrong.pth"
    torch.save({"weight": torch.zeros(3)}, path)
    with pytest.raises(ModelError, match="cannot load convmixer_768_32") as err:
        load_backbone("convmixer_768_32", weights=path)
    assert str(path) in str(err.value)


def test_blocks_beyond_the_depth_is_a_model_error():
    with torch.device("meta"):
        with pytest.raises(ModelError, match="dinov2_s14 has 12 blocks"):
            load_backbone("dinov2_s14", weights=None, blocks=13)
        assert len(load_backbone("dinov2_s14", weights=None, blocks=12).prefix.vit.blocks) == 0


def test_a_checkpoint_for_another_input_size_has_its_position_embeddings_resampled(tmp_path):
    path = tmp_path / "dinov2_28.pth"
    torch.save(tm.create_model("dinov2_s14", weights=None, size=28).state_dict(), path)
    bb = load_backbone("dinov2_s14", weights=path, size=56)
    assert bb.prefix.vit.pos_embed.shape == (1, 1 + 4 * 4, 384)
    with torch.no_grad():
        assert bb.features(torch.randn(1, 3, 56, 56)).shape == (1, 384)
