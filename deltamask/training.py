"""Local training of a mask, classifier heads (linear probe, FiT-LDA, frozen Kaiming) and evaluation.

One function trains a client's mask for the simulator and the edge client alike:
`train_mask(net, masks, theta_g, inputs, labels, settings) -> theta_k`. `inputs` are whatever the
masked part takes: the frozen prefix's cached outputs (a tensor, or a tuple of tensors for text).
"""
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deltamask.masking import EXPECTED, FIXED, SAMPLE, MaskedModule

Inputs = Union[torch.Tensor, Tuple[torch.Tensor, ...]]


@dataclass(frozen=True)
class TrainSettings:
    """Paper C.1: 1 local epoch, batch 64, Adam, lr 0.1."""

    epochs: int = 1
    batch_size: int = 64
    lr: float = 0.1
    seed: int = 0


def take(inputs: Inputs, index) -> Inputs:
    """Rows `index` of a tensor or of every tensor in a tuple."""
    return tuple(t[index] for t in inputs) if isinstance(inputs, tuple) else inputs[index]


def num_rows(inputs: Inputs) -> int:
    return len(inputs[0]) if isinstance(inputs, tuple) else len(inputs)


def batches(n: int, batch_size: int, generator: Optional[torch.Generator] = None):
    """Index tensors of size batch_size over 0..n-1, shuffled when a generator is given."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for lo in range(0, n, batch_size):
        yield order[lo:lo + batch_size]


def train_mask(net: nn.Module, masks: MaskedModule, theta_g: np.ndarray, inputs: Inputs, labels: torch.Tensor,
               settings: TrainSettings = TrainSettings(),
               progress: Optional[Callable[[int], None]] = None) -> np.ndarray:
    """Start the scores at theta_g, train them on (inputs, labels) with a freshly sampled mask per
    batch, and return theta_k (float32, length d). Only the scores change: frozen weights, the head
    and BatchNorm statistics are left as they were (`net` stays in eval mode)."""
    if num_rows(inputs) == 0:
        raise ValueError("a client with no local data cannot train")
    net.eval()
    masks.set_theta(theta_g)
    masks.set_mode(SAMPLE)
    masks.generator.manual_seed(settings.seed)
    optimizer = _adam(masks.scores(), settings.lr)
    order = torch.Generator().manual_seed(settings.seed)
    for _ in range(settings.epochs):
        for index in batches(num_rows(inputs), settings.batch_size, order):
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(net(take(inputs, index)), labels[index])
            loss.backward()
            optimizer.step()
            if progress is not None:
                progress(len(index))
    return masks.theta()


def _adam(params, lr: float) -> torch.optim.Optimizer:
    """Fused Adam: one pass over the d scores per step instead of ~10 (d is 35M for CLIP ViT-B/32). The
    boards' older torch (< 2.4) has no fused Adam on the CPU: plain Adam there, the same arithmetic."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr)


@torch.no_grad()
def evaluate(net: nn.Module, masks: Optional[MaskedModule], inputs: Inputs, labels: torch.Tensor,
             mask: Optional[np.ndarray] = None, batch_size: int = 256) -> float:
    """Accuracy with a fixed binary mask when `mask` is given, else with the expected mask (theta)."""
    net.eval()
    if masks is not None:
        masks.set_mode(FIXED, mask) if mask is not None else masks.set_mode(EXPECTED)
    correct = 0
    for index in batches(num_rows(inputs), batch_size):
        correct += int((net(take(inputs, index)).argmax(1) == labels[index]).sum())
    if masks is not None:
        masks.set_mode(SAMPLE)
    return correct / max(1, num_rows(inputs))


@torch.no_grad()
def features_of(module: nn.Module, inputs: Inputs, batch_size: int = 256) -> torch.Tensor:
    """module(inputs) batch by batch (the masked part in its current mask mode -> features)."""
    module.eval()
    return torch.cat([module(take(inputs, index)) for index in batches(num_rows(inputs), batch_size)])


def linear_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int, epochs: int = 20,
                 lr: float = 1e-3, batch_size: int = 64, seed: int = 0,
                 init: Optional[nn.Linear] = None) -> nn.Linear:
    """Train a linear head on frozen features (one client's share of the linear-probing round)."""
    torch.manual_seed(seed)
    head = nn.Linear(features.shape[1], num_classes)
    if init is not None:
        head.load_state_dict(init.state_dict())
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    order = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for index in batches(len(features), batch_size, order):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(head(features[index]), labels[index]).backward()
            optimizer.step()
    return head


def average_heads(heads: Sequence[nn.Linear], weights: Sequence[float]) -> nn.Linear:
    """FedAvg of linear heads, weighted by (say) local sample counts."""
    total = float(sum(weights))
    out = nn.Linear(heads[0].in_features, heads[0].out_features)
    with torch.no_grad():
        for name in ("weight", "bias"):
            getattr(out, name).copy_(sum(getattr(h, name) * (w / total) for h, w in zip(heads, weights)))
    return out


def head_bits(head: nn.Linear) -> int:
    """Bits to upload a float32 linear head."""
    return 32 * sum(p.numel() for p in head.parameters())


def lda_statistics(features: torch.Tensor, labels: torch.Tensor, num_classes: int):
    """One client's share of FiT-LDA: per-class sums and counts, and the sum of outer products."""
    f = features.double()
    sums = torch.zeros(num_classes, f.shape[1], dtype=torch.float64).index_add_(0, labels, f)
    counts = torch.bincount(labels, minlength=num_classes).double()
    return sums, counts, f.T @ f


def lda_head(stats, shrinkage: float = 0.1) -> nn.Linear:
    """FiT-LDA (a data-driven Gaussian head): class means and one shared, shrunk covariance, summed
    over clients' `lda_statistics`. W_c = S^-1 mu_c, b_c = -mu_c' S^-1 mu_c / 2 + log prior_c."""
    sums = sum(s[0] for s in stats)
    counts = sum(s[1] for s in stats)
    outer = sum(s[2] for s in stats)
    n = counts.sum()
    means = sums / counts.clamp(min=1)[:, None]
    within = outer - (means.T * counts) @ means  # sum over samples of (x - mu_y)(x - mu_y)'
    cov = within / max(1.0, float(n) - len(counts))
    cov = (1 - shrinkage) * cov + shrinkage * torch.eye(cov.shape[0], dtype=cov.dtype) * cov.diagonal().mean()
    precision_means = torch.linalg.solve(cov, means.T).T  # (C, D)
    head = nn.Linear(means.shape[1], means.shape[0])
    with torch.no_grad():
        head.weight.copy_(precision_means.float())
        prior = (counts / n).clamp(min=1e-12).log()
        head.bias.copy_((-0.5 * (precision_means * means).sum(1) + prior).float())
    return head


def kaiming_head(in_features: int, num_classes: int, seed: int = 0) -> nn.Linear:
    """A frozen, randomly initialised head (Kaiming uniform, from a seed every party knows)."""
    torch.manual_seed(seed)
    head = nn.Linear(in_features, num_classes)
    nn.init.kaiming_uniform_(head.weight, a=math.sqrt(5))
    nn.init.zeros_(head.bias)
    return head
