"""Decode + aggregation throughput, 1 worker against 2, in one run (`deltamask.shards`).

    python benchmarks/shards.py [--d 6653440] [--uploads 16] [--codec exact-cond] [--repeats 3] [--ray]

A synthetic round like a late DeltaMask round (theta mostly decided, ~5% undecided; each device's trained
theta a little off it): `uploads` payloads of `codec`, then the round's sums with the serial path, the process
pool at 1 and 2 workers, and (with --ray) Ray at 1 and 2 CPUs, alternating, best of `repeats`. Prints one JSON
object: uploads a second for each, the 2-vs-1 ratios, and the bytes a shard moves. Every executor's counts are
checked equal to the serial ones before a time is kept.
"""
import argparse
import json
import os
import platform
import sys
import time

import numpy as np

from deltamask import client_update, get_codec
from deltamask.sampling import theta_to_thresholds
from deltamask.shards import ProcessPool, RayPool, RoundContext, Serial, aggregate, plan_shards


def make_round(d: int, uploads: int, codec: str, seed: int = 1):
    rng = np.random.default_rng(seed)
    theta = np.where(rng.random(d) < 0.95, rng.choice([0.0, 1.0], d), rng.random(d))
    thresholds = theta_to_thresholds(theta)
    out, digests = [], {}
    for k in range(uploads):
        name = f"device-{k:04d}"
        theta_k = np.clip(theta + rng.normal(0, 0.05, d) * (theta % 1 > 0), 0, 1)
        up = client_update(thresholds, theta_k, seed, name, 1.0, get_codec(codec))
        out.append((name, up.payload))
        digests[name] = up.reference_digest
    return RoundContext(thresholds, seed), out, digests


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=4 * 1_663_360, help="masked parameters (default: 4x MobileNetV2's 5 blocks)")
    p.add_argument("--uploads", type=int, default=16)
    p.add_argument("--codec", default="exact-cond")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ray", action="store_true", help="also Ray (local, 1 and 2 CPUs)")
    args = p.parse_args()
    ctx, uploads, digests = make_round(args.d, args.uploads, args.codec)
    reference = aggregate(ctx, uploads, Serial(), expected=digests).ones
    executors = {"serial": lambda: Serial(), "process-1": lambda: ProcessPool(1), "process-2": lambda: ProcessPool(2)}
    if args.ray:
        executors.update({"ray-1": lambda: RayPool(1), "ray-2": lambda: RayPool(2)})
    best = {name: float("inf") for name in executors}
    for _ in range(args.repeats):
        for name, make in executors.items():
            executor = make()
            try:
                aggregate(ctx, uploads[:2], executor)  # start-up (processes, Ray) is not counted
                started = time.perf_counter()
                result = aggregate(ctx, uploads, executor, expected=digests)
                seconds = time.perf_counter() - started
            finally:
                executor.close()
            if not np.array_equal(result.ones, reference) or result.errors:
                raise SystemExit(f"{name}: counts differ from the serial path")
            best[name] = min(best[name], seconds)
    shards = plan_shards(uploads, args.d, 2)
    report = {
        "d": args.d, "uploads": args.uploads, "codec": args.codec, "repeats": args.repeats,
        "payload_bytes_mean": float(np.mean([len(p) for _, p in uploads])),
        "undecided_fraction": float(np.mean((ctx.thresholds > 0) & (ctx.thresholds < 1 << 24))),
        "seconds": {k: round(v, 4) for k, v in best.items()},
        "uploads_per_s": {k: round(args.uploads / v, 2) for k, v in best.items()},
        "ratio_process_2_vs_1": round(best["process-1"] / best["process-2"], 3),
        "ratio_process_1_vs_serial": round(best["serial"] / best["process-1"], 3),
        "shards_at_2_workers": len(shards),
        "bytes_to_a_shard": {"thresholds": 4 * args.d, "payloads_max": max(sum(len(p) for _, p in s.uploads) for s in shards)},
        "bytes_from_a_shard_max": max(4 * (s.hi - s.lo) + 32 * len(s.uploads) * -(-(s.hi - s.lo) // (1 << 20)) for s in shards),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }
    if args.ray:
        report["ratio_ray_2_vs_1"] = round(best["ray-1"] / best["ray-2"], 3)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
