"""Downlink benchmark: the size and speed of the theta message against the empirical entropy.

theta is drawn as the mode formula leaves it after one round with K clients (the fraction of clients
with a one at each position), for positions whose client probabilities follow a scenario:

    early     every position at p = 0.99 (a round after starting at theta0 = 0.99)
    mixed     85% at 0.99, 10% undecided at 0.5, 5% at 0.05
    decided   60% at 0.999, 35% at 0.001, 5% at 0.5 (late training)

Run from the repository root: `python benchmarks/thetawire.py [--quick]`. One JSON object a line:
`scenario`, `d`, `clients`, `levels`, `bytes`, `bpp` (downlink bits per parameter), `entropy_bpp` (the
empirical entropy of the values, the floor for coding them one at a time), `encode_s`, `decode_s`,
and `float32_bpp` (32, what sending theta as floats would cost) for comparison.
"""
import argparse
import json
import os
import sys
import time

import numpy as np

try:
    import deltamask  # noqa: F401
except ImportError:  # run as `python benchmarks/thetawire.py` without the package installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from deltamask.sampling import theta_to_thresholds
from deltamask.thetawire import decode_theta, encode_theta

SCENARIOS = {
    "early": ([0.99], [1.0]),
    "mixed": ([0.99, 0.5, 0.05], [0.85, 0.10, 0.05]),
    "decided": ([0.999, 0.001, 0.5], [0.60, 0.35, 0.05]),
}


def row(scenario: str, d: int, clients: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    probabilities, weights = SCENARIOS[scenario]
    p = rng.choice(np.asarray(probabilities), size=d, p=weights)
    thresholds = theta_to_thresholds(rng.binomial(clients, p) / clients)
    started = time.perf_counter()
    wire = encode_theta(thresholds)
    encoded = time.perf_counter()
    back = decode_theta(wire, d)
    decoded = time.perf_counter()
    if not np.array_equal(back, thresholds):
        raise AssertionError(f"{scenario}: theta did not round-trip")
    _, counts = np.unique(thresholds, return_counts=True)
    freq = counts / d
    return {"scenario": scenario, "d": d, "clients": clients, "levels": len(counts), "bytes": len(wire),
            "bpp": 8 * len(wire) / d, "entropy_bpp": float(-(freq * np.log2(freq)).sum()),
            "encode_s": encoded - started, "decode_s": decoded - encoded, "float32_bpp": 32}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="d = 1,000,000 only")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for d in (1_000_000,) if args.quick else (1_000_000, 35_439_360):
        for scenario in SCENARIOS:
            print(json.dumps(row(scenario, d, args.clients, args.seed)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
