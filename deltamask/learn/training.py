"""Local training on a device: the mask, a linear-probe head or FiT-LDA statistics; and evaluation.

One function trains a client's mask for the simulator and the edge client alike:
`train_mask(net, masks, theta_g, inputs, labels, local, seed) -> theta_k`. `inputs` are whatever the
masked part takes: the frozen prefix's cached outputs (a tensor, or a tuple of tensors for text).
"""
from typing import Callable, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deltamask.federation import AUTO, LOCAL_CLASSES, VIRTUAL_CLASSES, Head, LocalTraining
from deltamask.headwire import LdaStats
from deltamask.learn.masking import EXPECTED, FIXED, SAMPLE, MaskedModule

Inputs = Union[torch.Tensor, Tuple[torch.Tensor, ...]]


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
               local: LocalTraining = LocalTraining(), seed: int = 0,
               progress: Optional[Callable[[int], None]] = None, anchors: Optional[np.ndarray] = None) -> np.ndarray:
    """Start the scores at theta_g, train them on (inputs, labels) with a freshly sampled mask per
    batch, and return theta_k (float32, length d). Only the scores change: frozen weights, the head
    and BatchNorm statistics are left as they were (`net` stays in eval mode). With
    `local.loss == "local_classes"` the softmax runs over the classes present in `labels` only, so that
    a device holding two classes does not learn to silence the other eight (label skew). With
    `local.loss == "virtual_classes"` the softmax runs over every class, and each batch brings as many virtual
    examples of classes the device lacks (`anchors`: the head's class means of these inputs; see `_fit`)."""
    masks.set_theta(theta_g)
    masks.set_mode(SAMPLE)
    masks.generator.manual_seed(seed)
    _fit(net, _adam(masks.scores(), local.lr), inputs, labels, local, seed, progress, anchors)
    return masks.theta()


def train_weights(net: nn.Module, masks: MaskedModule, inputs: Inputs, labels: torch.Tensor,
                  local: LocalTraining = LocalTraining(), seed: int = 0,
                  progress: Optional[Callable[[int], None]] = None) -> np.ndarray:
    """The fine-tuning baselines: train the masked layers' weights themselves (every mask held at one;
    Adam at `local.weight_lr`), from whatever they are set to, with the same batches and loss as
    `train_mask`; the head and BatchNorm statistics stay frozen. Returns the weights (float32, length d)."""
    masks.set_mode(FIXED, np.ones(masks.d, dtype=bool))
    params = masks.weight_tensors()
    for p in params:
        p.requires_grad_(True)
    try:
        _fit(net, torch.optim.Adam(params, lr=local.weight_lr), inputs, labels, local, seed, progress)
    finally:
        for p in params:
            p.requires_grad_(False)
        masks.set_mode(SAMPLE)
    return masks.weights()


def _fit(net: nn.Module, optimizer: torch.optim.Optimizer, inputs: Inputs, labels: torch.Tensor,
         local: LocalTraining, seed: int, progress: Optional[Callable[[int], None]],
         anchors: Optional[np.ndarray] = None) -> None:
    """`local.epochs` over (inputs, labels) in seeded batches, stepping `optimizer` on the local loss.

    virtual_classes: a device that holds only some classes compares its features only among them, and what
    its classes agree to prune costs the others (docs/results.md, label skew). So each real example x of
    class y gets a virtual twin x - m_y + m_c of a class c the device lacks (drawn at random among those
    some device holds; m: `anchors`, the federation's class means of the masked blocks' inputs), which passes
    through the masked blocks like a real example, and the loss is the cross-entropy of both over every class."""
    if num_rows(inputs) == 0:
        raise ValueError("a client with no local data cannot train")
    net.eval()
    order = torch.Generator().manual_seed(seed)
    absent, virtual = None, local.loss == VIRTUAL_CLASSES
    if virtual:
        means, held, lacking = _virtual_classes(inputs, labels, anchors)
        draw = torch.Generator().manual_seed(seed + 1)
    for _ in range(local.epochs):
        for index in batches(num_rows(inputs), local.batch_size, order):
            optimizer.zero_grad(set_to_none=True)
            x, y = take(inputs, index), labels[index]
            logits = net(x)
            if local.loss in (LOCAL_CLASSES, AUTO):  # auto not made concrete (federation.resolved): local classes
                if absent is None:
                    absent = torch.bincount(labels, minlength=logits.shape[1]) == 0
                logits = logits.masked_fill(absent, float("-inf"))
            loss = F.cross_entropy(logits, y)
            if virtual and len(lacking):
                c = lacking[torch.randint(len(lacking), (len(y),), generator=draw)]
                twin = held[y]  # an example of a class the head round did not see has no mean to move from
                if bool(twin.any()):
                    x, y, c = (x, y, c) if bool(twin.all()) else (x[twin], y[twin], c[twin])
                    loss = loss + F.cross_entropy(net(x - means[y] + means[c]), c)
            loss.backward()
            optimizer.step()
            if progress is not None:
                progress(len(index))


def _virtual_classes(inputs: Inputs, labels: torch.Tensor, anchors: Optional[np.ndarray]):
    """(the class means shaped like one example's inputs, which classes some device holds, the classes the
    device lacks among those)."""
    if anchors is None:
        raise ValueError("local.loss virtual_classes needs the head's class anchors (a head round with head: lda)")
    if isinstance(inputs, tuple):
        raise ValueError("local.loss virtual_classes takes image backbones (one input tensor per example)")
    anchors = torch.from_numpy(np.asarray(anchors, np.float32))
    if anchors.shape[1] != inputs[0].numel():
        raise ValueError(f"class anchors of {anchors.shape[1]} inputs; the masked blocks take {inputs[0].numel()}")
    held = torch.isfinite(anchors).all(1)
    lacking = (held & (torch.bincount(labels, minlength=len(anchors)) == 0)).nonzero().flatten()
    return torch.nan_to_num(anchors).view((len(anchors),) + tuple(inputs.shape[1:])), held, lacking


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
                 init: Optional[Head] = None) -> Head:
    """Train a linear head on frozen features (one device's share of a linear-probing round), from
    `init` (the global head of the previous head round) or nn.Linear's initialisation drawn from `seed`."""
    torch.manual_seed(seed)
    head = nn.Linear(features.shape[1], num_classes)
    if init is not None:
        with torch.no_grad():
            head.weight.copy_(torch.from_numpy(np.asarray(init[0], np.float32)))
            head.bias.copy_(torch.from_numpy(np.asarray(init[1], np.float32)))
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    order = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for index in batches(len(features), batch_size, order):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(head(features[index]), labels[index]).backward()
            optimizer.step()
    return head.weight.detach().numpy().copy(), head.bias.detach().numpy().copy()


def lda_statistics(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                   covariance: str = "full") -> LdaStats:
    """One device's share of FiT-LDA (`deltamask.federation.lda_head` sums them): per-class feature sums and
    counts, and the second moments: sum x x' ("full") or its diagonal ("diag")."""
    f = features.double()
    sums = torch.zeros(num_classes, f.shape[1], dtype=torch.float64).index_add_(0, labels, f)
    counts = torch.bincount(labels, minlength=num_classes).double()
    second = (f * f).sum(0) if covariance == "diag" else f.T @ f
    return LdaStats(sums.numpy(), counts.numpy(), second.numpy())


def class_sums(inputs: Inputs, labels: torch.Tensor, num_classes: int) -> np.ndarray:
    """Per-class sums of the masked blocks' inputs, flattened (classes x P, float64): a device's share of the
    class anchors virtual_classes trains with (`deltamask.federation.class_anchors` sums them)."""
    if isinstance(inputs, tuple):
        raise ValueError("local.loss virtual_classes takes image backbones (one input tensor per example)")
    flat = inputs.reshape(len(inputs), -1)
    sums = torch.zeros(num_classes, flat.shape[1], dtype=torch.float64)
    for index in batches(len(flat), 256):  # float64 a few hundred rows at a time, not the whole set (boards)
        sums.index_add_(0, labels[index], flat[index].double())
    return sums.numpy()
