"""Stochastic binary masks over the frozen weights of a module's Linear and Conv layers.

Each masked weight w gets a score s (a trainable parameter); theta = sigmoid(s). A forward pass in
"sample" mode draws m ~ Bern(theta) afresh and uses m * w; gradients reach the scores through a
straight-through estimator:

    identity  dL/dtheta = dL/dm             (mask-tuning papers: Piggyback, Zhao et al. 2020)
    fedpm     dL/dtheta = dL/dm * theta     (the FedPM reference implementation)

Canonical order (part of the wire contract): masked layers in `named_modules()` order of the module
passed in, each weight flattened in row-major (C) order; `MaskedModule.layout()` lists (name, shape)
and `layout_digest()` hashes it so that two parties can check they agree.
"""
import hashlib
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deltamask.delta import EPS

IDENTITY, FEDPM = "identity", "fedpm"
ESTIMATORS = (IDENTITY, FEDPM)
SAMPLE, EXPECTED, FIXED = "sample", "expected", "fixed"
MASKABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)


try:
    _SIGMOID_BACKWARD = torch.ops.aten.sigmoid_backward.grad_input
except (AttributeError, RuntimeError):
    _SIGMOID_BACKWARD = None


class _SampledWeight(torch.autograd.Function):
    """w * m with m ~ Bern(sigmoid(s)), straight-through to s (times theta for FedPM). Bit for bit what
    autograd through sigmoid, bernoulli and mul gives, with two new weight-sized tensors forward and one
    backward instead of three and two (d is 35M for CLIP ViT-B/32: each is a 140 MB allocation)."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, weight: torch.Tensor, scaled: bool,
                generator: Optional[torch.Generator]) -> torch.Tensor:
        theta = torch.sigmoid(scores)
        ctx.scaled = scaled
        ctx.save_for_backward(theta, weight)
        return torch.bernoulli(theta, generator=generator).mul_(weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        theta, weight = ctx.saved_tensors
        grad = grad * weight  # dL/dm = dL/dtheta (identity)
        if ctx.scaled:
            grad.mul_(theta)  # FedPM
        if _SIGMOID_BACKWARD is not None:  # in place, bit for bit autograd's sigmoid backward
            return _SIGMOID_BACKWARD(grad, theta, grad_input=grad), None, None, None
        return grad * theta * (1 - theta), None, None, None  # older torch (the boards' 1.10 - 1.13)


class MaskedLayer(nn.Module):
    """A frozen Linear/Conv layer whose weight is multiplied by a stochastic binary mask."""

    def __init__(self, layer: nn.Module, theta0: float, estimator: str, generator: torch.Generator) -> None:
        super().__init__()
        for p in layer.parameters():
            p.requires_grad_(False)
        self.layer = layer
        self.scores = nn.Parameter(torch.full_like(layer.weight, float(logit(theta0))))
        self.estimator, self.generator = estimator, generator
        self.mode = SAMPLE
        self.fixed: Optional[torch.Tensor] = None  # a given 0/1 mask, in FIXED mode

    def weight(self) -> torch.Tensor:
        """The frozen weight times the mask: a fresh Bernoulli sample, theta or the fixed 0/1 mask."""
        if self.mode == SAMPLE:
            return _SampledWeight.apply(self.scores, self.layer.weight, self.estimator == FEDPM, self.generator)
        return self.layer.weight * (self.fixed if self.mode == FIXED else torch.sigmoid(self.scores))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight()
        if isinstance(self.layer, nn.Linear):
            return F.linear(x, weight, self.layer.bias)
        return self.layer._conv_forward(x, weight, self.layer.bias)


class MaskedModule:
    """Puts masks over every maskable layer of `module` (in place) and reads/writes their theta flat."""

    def __init__(self, module: nn.Module, theta0: float = 0.99, estimator: str = IDENTITY,
                 seed: int = 0, kinds: Sequence[type] = MASKABLE) -> None:
        if estimator not in ESTIMATORS:
            raise ValueError(f"unknown estimator {estimator!r}; expected one of {ESTIMATORS}")
        if not 0.0 <= theta0 <= 1.0:
            raise ValueError(f"theta0 must lie in [0, 1], got {theta0}")
        self.module = module
        for p in module.parameters():  # the backbone stays frozen: only the scores added below learn
            p.requires_grad_(False)
        self.generator = torch.Generator().manual_seed(seed)
        targets = [(name, m) for name, m in module.named_modules() if isinstance(m, tuple(kinds))]
        if not targets:
            raise ValueError(f"{type(module).__name__} has no {', '.join(k.__name__ for k in kinds)} layer to mask")
        self.layers: List[Tuple[str, MaskedLayer]] = []
        for name, layer in targets:
            masked = MaskedLayer(layer, theta0, estimator, self.generator)
            _replace(module, name, masked)
            self.layers.append((name, masked))
        self.d = sum(m.scores.numel() for _, m in self.layers)

    def scores(self) -> List[nn.Parameter]:
        """The trainable parameters: one score tensor per masked layer, in canonical order."""
        return [m.scores for _, m in self.layers]

    def layout(self) -> List[Tuple[str, Tuple[int, ...]]]:
        return [(name, tuple(m.scores.shape)) for name, m in self.layers]

    def layout_digest(self) -> str:
        """Hex SHA-256 of the canonical order: layer names and shapes."""
        text = ";".join(f"{name}:{'x'.join(map(str, shape))}" for name, shape in self.layout())
        return hashlib.sha256(text.encode()).hexdigest()

    def theta(self) -> np.ndarray:
        """theta of all masked weights as one float32 vector of length d, in canonical order."""
        flat = torch.empty(self.d, dtype=torch.float32)
        with torch.no_grad():  # written in place: no per-layer copies of d floats to concatenate
            for (_, m), part in zip(self.layers, self._split(flat)):
                torch.sigmoid(m.scores.reshape(-1), out=part)
        return flat.numpy()

    def set_theta(self, theta: np.ndarray) -> None:
        """Set the scores to logit(theta), theta clipped to [EPS, 1 - EPS] (never infinite scores)."""
        flat = torch.as_tensor(np.asarray(theta, dtype=np.float32))
        with torch.no_grad():  # in place, as logit() computes it, without temporaries of the layer's size
            for (_, m), part in zip(self.layers, self._split(flat)):
                m.scores.copy_(part.reshape(m.scores.shape)).clamp_(EPS, 1 - EPS).logit_()

    def weights(self) -> np.ndarray:
        """The masked layers' frozen weights themselves as one float32 vector of length d, canonical order."""
        with torch.no_grad():
            return torch.cat([m.layer.weight.reshape(-1) for _, m in self.layers]).numpy().copy()

    def set_weights(self, flat: np.ndarray) -> None:
        """Overwrite the masked layers' weights (the fine-tuning baselines; the masks stay as they are)."""
        with torch.no_grad():
            for (_, m), part in zip(self.layers, self._split(torch.as_tensor(np.asarray(flat, dtype=np.float32)))):
                m.layer.weight.copy_(part.reshape(m.layer.weight.shape))

    def bake(self, mask: np.ndarray) -> nn.Module:
        """Multiply the weights by a fixed mask (0/1, or theta itself for the expected network) and put the plain
        layers back in place: the module is an ordinary network again (export), and this MaskedModule is
        spent. Returns the module."""
        self.set_weights(self.weights() * np.asarray(mask, dtype=np.float32))
        for name, masked in self.layers:
            _replace(self.module, name, masked.layer)
        self.layers = []
        return self.module

    def weight_tensors(self) -> List[torch.Tensor]:
        return [m.layer.weight for _, m in self.layers]

    def set_mode(self, mode: str, mask: Optional[np.ndarray] = None) -> None:
        """sample (training), expected (m = theta) or fixed (a given 0/1 mask of length d)."""
        if mode not in (SAMPLE, EXPECTED, FIXED):
            raise ValueError(f"unknown mask mode {mode!r}")
        parts = self._split(torch.as_tensor(np.asarray(mask, dtype=np.float32))) if mode == FIXED else None
        for i, (_, m) in enumerate(self.layers):
            m.mode = mode
            m.fixed = parts[i].reshape(m.scores.shape) if parts is not None else None

    def _split(self, flat: torch.Tensor) -> List[torch.Tensor]:
        if flat.shape != (self.d,):
            raise ValueError(f"expected a flat vector of d = {self.d} values, got shape {tuple(flat.shape)}")
        return list(torch.split(flat, [m.scores.numel() for _, m in self.layers]))


def logit(theta, eps: float = EPS):
    """log(theta / (1 - theta)) with theta clipped to [eps, 1 - eps] (float or tensor)."""
    if isinstance(theta, torch.Tensor):
        return torch.logit(theta.clamp(eps, 1 - eps))
    theta = min(max(float(theta), eps), 1 - eps)
    return float(np.log(theta / (1 - theta)))


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
