"""The frozen prefix, run once per local dataset: its outputs are what local training feeds the masked part.

The blocks before the masked ones never change, so every epoch of every round would recompute the same
activations. `run_prefix` computes them once (torch inference mode, batch by batch); `save`/`load`
keep them on disk beside a key that names the backbone, its weights and the data, so an edge client
computes them once per dataset, not once per round.
"""
import hashlib
import logging
import os
import threading
from pathlib import Path
from typing import Iterable, Optional, Tuple, Union

import numpy as np
import torch

from deltamask.learn.models.base import Backbone

log = logging.getLogger(__name__)
Outputs = Union[torch.Tensor, Tuple[torch.Tensor, ...]]


@torch.inference_mode()
def run_prefix(backbone: Backbone, batches: Iterable, runner=None) -> Outputs:
    """Concatenate prefix(batch) over the batches (tensors, or tuples of tensors for text); `runner` (from
    `deltamask.learn.onnx_prefix.prefix_runner`) runs it instead of the torch module when given."""
    backbone.prefix.eval()
    runner = runner or backbone.prefix
    parts = [runner(batch) for batch in batches]
    if not parts:
        raise ValueError("no input batches to run the prefix on")
    if isinstance(parts[0], tuple):
        return tuple(torch.cat([p[i] for p in parts]) for i in range(len(parts[0])))
    return torch.cat(parts)


def cache_key(backbone: Backbone, data: np.ndarray, extra: str = "") -> str:
    """A key naming the backbone, its weights, the split point and the exact input data."""
    digest = hashlib.sha256()
    digest.update(f"{backbone.name}|{backbone.weights}|{backbone.blocks}|{extra}|".encode())
    digest.update(np.ascontiguousarray(data).tobytes())
    return digest.hexdigest()[:24]


def save(outputs: Outputs, folder: Path, key: str) -> Path:
    """Write outputs atomically as `<key>.pt` in `folder`; processes computing the same outputs at once (two
    simulations on one cache) each write their own temporary file, and the last rename wins."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{key}.pt"
    tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
    torch.save(outputs, tmp)
    tmp.replace(path)
    return path


def load(folder: Path, key: str) -> Optional[Outputs]:
    path = folder / f"{key}.pt"
    if not path.exists():
        return None
    log.info("prefix outputs from cache %s", path)
    return torch.load(path, weights_only=True)
