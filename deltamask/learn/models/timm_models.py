"""The paper's timm backbones, CLIP ViT-B/32 and ViT-L/14, DINOv2-S/14 and B/14, ConvMixer-768/32, built
offline with weights from a local file or a filled Hugging Face cache.

Importing this module sets HF_HUB_OFFLINE=1 unless the environment already sets it: without it, timm retries
the unreachable hub for ~60 s per model. Set HF_HUB_OFFLINE=0 (before importing) to let timm download.
"""
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from timm.layers import global_pool_nlc  # noqa: E402
from timm.layers.activations import QuickGELU as _TimmQuickGELU  # noqa: E402
from timm.models.vision_transformer import Attention as _TimmAttention, Block as _TimmBlock  # noqa: E402
from torch import nn  # noqa: E402

from deltamask.errors import ModelError  # noqa: E402
from deltamask.learn.models import Weights, _check_blocks, _FrozenModes, _FrozenSequential, _weight_file  # noqa: E402
from deltamask.learn.models.base import Backbone, Preprocessing  # noqa: E402

log = logging.getLogger(__name__)

# OpenAI CLIP needs QuickGELU: the plain `vit_*_clip_224.openai` models use exact GELU with the same weights.
TIMM_NAMES = {
    "clip_vit_b32": "vit_base_patch32_clip_quickgelu_224.openai",
    "clip_vit_l14": "vit_large_patch14_clip_quickgelu_224.openai",
    "dinov2_s14": "vit_small_patch14_dinov2.lvd142m",
    "dinov2_b14": "vit_base_patch14_dinov2.lvd142m",
    "convmixer_768_32": "convmixer_768_32.in1k",
}


class _QuickGELUFn(torch.autograd.Function):
    """x * sigmoid(1.702 x) with timm's forward bits, one new tensor each way (timm's ops make three
    forward, four backward, each a pass over a (batch, tokens, 4 * width) tensor): the derivative is
    silu'(1.702 x), one fused kernel, computed in place."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)  # fc1's output, which timm's autograd keeps too
        return (x * 1.702).sigmoid_().mul_(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        a = x * 1.702
        return torch.ops.aten.silu_backward.grad_input(grad, a, grad_input=a)


class QuickGELU(_TimmQuickGELU):
    """timm's QuickGELU, same forward bits, cheaper backward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _QuickGELUFn.apply(x)


def _fast_activations(model: nn.Module) -> None:
    """Swap timm's QuickGELU modules for ours (in place; no parameters, so no layout change)."""
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is _TimmQuickGELU:
                setattr(parent, name, QuickGELU())


class _VitPrefix(_FrozenModes, nn.Module):
    """timm VisionTransformer.forward_features up to the masked blocks: patch embedding, class token and
    position embedding, patch dropout, pre-norm, the first blocks. Holds the model with its tail removed."""

    def __init__(self, vit: nn.Module, keep: int) -> None:
        super().__init__()
        vit.blocks = vit.blocks[:keep]
        vit.norm, vit.fc_norm, vit.head_drop, vit.head = nn.Identity(), nn.Identity(), nn.Identity(), nn.Identity()
        vit.attn_pool = None
        self.vit = vit
        self._freeze_modes()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.vit
        return v.blocks(v.norm_pre(v.patch_drop(v._pos_embed(v.patch_embed(x)))))


class _VitTail(_FrozenModes, nn.Module):
    """The last blocks, the final norm and VisionTransformer.forward_head(pre_logits=True): pooling (class
    token, average or attention pool) and fc_norm. head_drop is left out: it is the identity in eval."""

    def __init__(self, vit: nn.Module, blocks: int) -> None:
        super().__init__()
        self.blocks = vit.blocks[len(vit.blocks) - blocks:]
        self.norm, self.attn_pool, self.fc_norm = vit.norm, vit.attn_pool, vit.fc_norm
        self.pool_type = vit.global_pool
        self.num_prefix_tokens = vit.num_prefix_tokens
        self.include_prefix = getattr(vit, "pool_include_prefix", False)
        # class-token pooling reads one token of the last block: in training its query, attention output
        # projection and MLP (five sixths of the block's weights) run on that token alone; inference
        # runs timm's blocks as they are, so features stay bit-identical to timm's
        last = self.blocks[-1]
        self.token_only = (self.pool_type == "token" and self.attn_pool is None and type(last) is _TimmBlock
                           and type(last.attn) is _TimmAttention and getattr(last.attn, "gate", None) is None)
        self._freeze_modes()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.token_only and torch.is_grad_enabled():
            *first, last = self.blocks
            for block in first:
                x = block(x)
            return self.fc_norm(self.norm(_class_token_block(last, x))[:, 0])
        x = self.norm(self.blocks(x))
        if self.attn_pool is not None:
            x = self.attn_pool(x if self.include_prefix else x[:, self.num_prefix_tokens:])
        else:
            x = global_pool_nlc(x, pool_type=self.pool_type, num_prefix_tokens=self.num_prefix_tokens,
                                reduce_include_prefix=self.include_prefix)
        return self.fc_norm(x)


def _class_token_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm Block(x)[:, :1] (no attention mask, eval): keys and values from every token, one query."""
    attn, h = block.attn, block.norm1(x)
    b, n, _ = h.shape
    q, k, v = attn.qkv(h).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    o = F.scaled_dot_product_attention(attn.q_norm(q[:, :, :1]), attn.k_norm(k), v, scale=attn.scale)
    o = attn.proj_drop(attn.proj(attn.norm(o.transpose(1, 2).reshape(b, 1, -1))))
    x = x[:, :1] + block.drop_path1(block.ls1(o))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def _load_file(model: nn.Module, name: str, path: Path) -> None:
    """Load a timm or open_clip checkpoint through the model family's own filter (key conversion, position
    embeddings resampled to the input size). Unlike timm's `pretrained_cfg_overlay=dict(file=...)`, which
    loads non-strictly once the classifier is dropped, a file that lacks any backbone weight fails."""
    try:
        state = timm.models.load_state_dict(str(path))
        filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
        state = filter_fn(state, model) if filter_fn is not None else state
        result = model.load_state_dict(state, strict=False)
    except Exception as e:  # unreadable file, shapes of another model: the user must see which file
        raise ModelError(f"cannot load {name} weights from {path}: {type(e).__name__}: {e}") from e
    if result.missing_keys:
        raise ModelError(f"cannot load {name} weights from {path}: it lacks {len(result.missing_keys)} of the"
                         f" model's tensors, e.g. {', '.join(result.missing_keys[:3])}")
    if result.unexpected_keys:  # a classifier or CLIP's projection: not part of the features
        log.info("%s: ignored %d tensors of %s: %s", name, len(result.unexpected_keys), path,
                 ", ".join(result.unexpected_keys[:5]))


def create_model(name: str, weights: Weights = "default", size: int = 224) -> nn.Module:
    """The timm model behind `name` without its classifier: random init for weights=None, a local file
    (timm or open_clip checkpoint; position embeddings resampled to `size`) or the Hugging Face cache."""
    timm_name = TIMM_NAMES[name]
    kw = {"num_classes": 0}
    if not timm_name.startswith("convmixer"):  # ConvMixer takes any input size
        kw["img_size"] = size
    path = _weight_file(name, weights)
    if weights is None or path is not None:
        model = timm.create_model(timm_name, pretrained=False, **kw)
        if path is not None:
            _load_file(model, name, path)
        return model
    try:
        return timm.create_model(timm_name, pretrained=True, **kw)
    except Exception as e:
        hub = timm.models.get_pretrained_cfg(timm_name).hf_hub_id
        raise ModelError(
            f"pretrained weights for {name} ({timm_name}, Hugging Face hub {hub}) are not in the local cache"
            f" and HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '')} or no network ({type(e).__name__})."
            " Pass weights=PATH (a timm or open_clip checkpoint file), or set HF_HUB_OFFLINE=0 before"
            " importing deltamask.learn.models.timm_models on a machine with internet to fill the cache,"
            " or weights=None for random init") from e


def load(name: str, weights: Weights = "default", blocks: int = 5, size: int = 224) -> Backbone:
    """A ViT (prefix = embeddings + blocks[:-blocks]; masked = blocks[-blocks:] + norm + pooling) or
    ConvMixer (prefix = stem + blocks[:-blocks]; masked = blocks[-blocks:] + average pool)."""
    path = _weight_file(name, weights)  # a missing file fails before the (slow) build
    model = create_model(name, weights, size)
    _fast_activations(model)
    _check_blocks(name, blocks, len(model.blocks))
    keep = len(model.blocks) - blocks
    if hasattr(model, "patch_embed"):
        masked: nn.Module = _VitTail(model, blocks)
        prefix: nn.Module = _VitPrefix(model, keep)
    else:
        masked = _FrozenSequential(*model.blocks[keep:], model.global_pool)
        prefix = _FrozenSequential(model.stem, *model.blocks[:keep])
    cfg = model.pretrained_cfg
    source = None if weights is None else str(path) if path is not None else f"hf-hub:{cfg.get('hf_hub_id')}"
    if source:
        log.info("%s: weights from %s", name, source)
    prep = Preprocessing(size=size, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]))
    return Backbone(name, prefix, masked, feature_dim=model.num_features, blocks=blocks, preprocessing=prep,
                    weights=source)
