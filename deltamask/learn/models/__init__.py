"""Backbones by name, split into a frozen prefix and the masked last blocks, loaded offline first.

    backbone = load_backbone("mobilenet_v2", blocks=5, size=64)
    hidden = backbone.prefix(images)              # computed once per local dataset
    feats = backbone.masked(hidden)               # (B, backbone.feature_dim); masks go over this part
    d = masked_weight_count(backbone)             # positions a mask covers

Each backbone's module is imported only when it is loaded (timm, transformers and torchvision are slow
to import and optional). `weights` is "default" (the offline copy, then the ordinary download where the
backbone has one), None (random or seeded init) or the path of a weight file.
"""
import importlib
import os
from pathlib import Path
from typing import Dict, Optional, Union

from torch import nn

from deltamask.errors import ModelError
from deltamask.learn.masking import MASKABLE as MASKED_TYPES  # the weights a mask covers
from deltamask.learn.models.base import Backbone, Preprocessing

Weights = Union[str, "os.PathLike[str]", None]

# name -> the module under deltamask.learn.models whose `load(name, weights, blocks, **kw)` builds it
BACKBONES: Dict[str, str] = {
    "mobilenet_v2": "torchvision_models",
    "clip_vit_b32": "timm_models",
    "clip_vit_l14": "timm_models",
    "dinov2_s14": "timm_models",
    "dinov2_b14": "timm_models",
    "convmixer_768_32": "timm_models",
    "minilm_l6": "text_models",
    "tiny": "tiny",
}



def load_backbone(name: str, weights: Weights = "default", blocks: int = 5, **kw) -> Backbone:
    """The backbone `name` with its last `blocks` blocks in `masked`; ModelError for an unknown name, a
    missing weight file or a `blocks` the backbone does not have. `kw` goes to the backbone's loader
    (e.g. `size=64` for image backbones)."""
    if name not in BACKBONES:
        raise ModelError(f"unknown backbone {name!r}; known backbones: {', '.join(BACKBONES)}")
    module = importlib.import_module(f"deltamask.learn.models.{BACKBONES[name]}")
    return module.load(name, weights=weights, blocks=blocks, **kw)


def masked_weight_count(backbone: Backbone) -> int:
    """d: the number of Linear and Conv weight elements in `backbone.masked` (biases and norms excluded)."""
    return sum(m.weight.numel() for m in backbone.masked.modules() if isinstance(m, MASKED_TYPES))


def _check_blocks(name: str, blocks: int, total: int) -> None:
    if isinstance(blocks, bool) or not isinstance(blocks, int) or not 1 <= blocks <= total:
        raise ModelError(f"{name} has {total} blocks; blocks must be an int in 1..{total}, got {blocks!r}")


def _weight_file(name: str, weights: Weights) -> Optional[Path]:
    """The weight file `weights` names, None for "default" and None; ModelError if it does not exist."""
    if weights is None or weights == "default":
        return None
    if not isinstance(weights, (str, os.PathLike)):
        raise ModelError(f"weights for {name} must be 'default', None or a file path, got {weights!r}")
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ModelError(f"weight file for {name} not found: {path}")
    return path


class _FrozenModes:
    """Mixin for the prefix and masked parts. `train()` sets the mode of the modules added after
    `_freeze_modes()` (masking layers may sample only in training) but leaves the backbone's own modules
    in eval: BatchNorm keeps its running statistics, dropout (modules and BERT's attention-probability
    dropout, which reads its parent's flag) stays off, so the frozen backbone is the same function in both
    modes. Linear and Conv modules follow the mode: a masking wrapper may read their flag."""

    def _freeze_modes(self) -> None:
        self._frozen_modules = [m for m in self.modules()  # type: ignore[attr-defined]
                                if m is not self and not isinstance(m, MASKED_TYPES)]

    def train(self, mode: bool = True):
        super().train(mode)  # type: ignore[misc]
        for m in getattr(self, "_frozen_modules", ()):
            m.training = False  # not m.eval(): that would also reach masking modules inside m
        return self


class _FrozenSequential(_FrozenModes, nn.Sequential):
    """nn.Sequential whose backbone modules stay in eval (see `_FrozenModes`)."""

    def __init__(self, *modules: nn.Module) -> None:
        super().__init__(*modules)
        self._freeze_modes()


__all__ = ["BACKBONES", "Backbone", "ModelError", "Preprocessing", "load_backbone", "masked_weight_count"]
