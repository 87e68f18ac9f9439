"""Prefix-cache benchmark: a local epoch of mask training with and without the frozen prefix cached.

Without the cache every batch runs the whole backbone (prefix under no_grad, then the masked blocks);
with it, the prefix's outputs are computed once per local dataset and each epoch runs only the masked
part. Same process, same batches, same seeds; the outputs of both paths are compared too.

    python benchmarks/prefix_cache.py                    # CLIP ViT-B/32 (random weights), 256 images
    python benchmarks/prefix_cache.py --backbone mobilenet_v2 --images 512 --size 64

Prints one JSON object: backbone, d, images, batch_size, epoch_uncached_s, epoch_cached_s,
prefix_once_s (building the cache), speedup (= epoch_uncached_s / epoch_cached_s), max_abs_diff
(features through the cached vs the uncached path).
"""
import argparse
import json
import statistics
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from torch import nn

try:
    import deltamask  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from deltamask.learn.masking import EXPECTED, MaskedModule
from deltamask.learn.models import load_backbone
from deltamask.learn.prefix_cache import run_prefix
from deltamask.federation import LocalTraining
from deltamask.learn.training import batches, train_mask


class Uncached(nn.Module):
    """The whole backbone per batch: frozen prefix (no grad) then the masked part and the head."""

    def __init__(self, prefix: nn.Module, rest: nn.Module) -> None:
        super().__init__()
        self.prefix, self.rest = prefix, rest

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            hidden = self.prefix(x)
        return self.rest(hidden)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="clip_vit_b32")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", type=int, default=None, help="input side (default: the backbone's)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=4, help="timed epochs per path, alternating (median)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    backbone = load_backbone(args.backbone, weights=None, **({"size": args.size} if args.size else {}))
    pre = backbone.preprocessing
    size = pre.size
    x = torch.randn(args.images, pre.channels, size, size)
    y = torch.randint(0, 10, (args.images,))
    head = nn.Linear(backbone.feature_dim, 10)
    masks = MaskedModule(backbone.masked, theta0=0.99)
    rest = nn.Sequential(backbone.masked, head)
    theta0 = np.full(masks.d, 0.99, dtype=np.float32)
    settings = LocalTraining(epochs=1, batch_size=args.batch_size, lr=0.1)

    started = time.perf_counter()
    cached = run_prefix(backbone, torch.split(x, args.batch_size))
    prefix_once = time.perf_counter() - started

    uncached = Uncached(backbone.prefix, rest)
    # warm-up: one untimed step through each path (first-touch allocations, Adam state)
    warm = torch.arange(min(args.batch_size, args.images))
    train_mask(rest, masks, theta0, cached[warm], y[warm], settings)
    train_mask(uncached, masks, theta0, x[warm], y[warm], settings)
    times = {"cached": [], "uncached": []}
    for _ in range(args.repeats):  # alternate the paths so that drift in machine load hits both
        started = time.perf_counter()
        theta_cached = train_mask(rest, masks, theta0, cached, y, settings)
        times["cached"].append(time.perf_counter() - started)
        started = time.perf_counter()
        theta_uncached = train_mask(uncached, masks, theta0, x, y, settings)
        times["uncached"].append(time.perf_counter() - started)
    epoch_cached, epoch_uncached = statistics.median(times["cached"]), statistics.median(times["uncached"])

    masks.set_theta(theta0)
    masks.set_mode(EXPECTED)
    with torch.no_grad():
        index = next(iter(batches(args.images, min(16, args.images))))
        diff = float((rest(cached[index]) - rest(backbone.prefix(x[index]))).abs().max())
    print(json.dumps({
        "backbone": args.backbone, "d": masks.d, "images": args.images, "size": size,
        "batch_size": args.batch_size, "threads": torch.get_num_threads(), "repeats": args.repeats,
        "epoch_uncached_s": round(epoch_uncached, 3), "epoch_cached_s": round(epoch_cached, 3),
        "prefix_once_s": round(prefix_once, 3), "speedup": round(epoch_uncached / epoch_cached, 3),
        "max_abs_diff": diff, "theta_max_abs_diff": float(np.abs(theta_cached - theta_uncached).max()),
        "cache_bytes_per_input": int(sum(t.element_size() * t[0].numel() for t in
                                         (cached if isinstance(cached, tuple) else (cached,)))),
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
