"""Does a head that moves with the features help? Re-fit the FiT-LDA head on the masked network a federation
reached, and score it on the validation and test images.

    deltamask-sim ... --val-samples 10000 --checkpoint run.npz >> run.jsonl     # copies of run.npz after rounds
    python benchmarks/head_refresh.py snapshots/*.npz                          # one JSON line a checkpoint

Each checkpoint (`deltamask-sim --checkpoint`) holds the run's configuration, its head and the global theta as
it travels. Every simulated device computes its LDA statistics on the features of the expected network
theta * w (what `deltamask-server export` bakes), as a head round computes them on the unmasked one; the
aggregator sums them into a new head (`Aggregator.close_head`: the sums do not depend on the split, so this is
the head the engine's refit round, `refit: true`, gives after that round, at the head round's bits again; tested). The network is scored
with the old head (old_*), the re-fitted one (new_*) and one of the new class means with the old covariance
(means_*).
"""
import argparse
import dataclasses
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from deltamask.federation import (HEAD, REFIT, Aggregator, LocalTraining, RoundPlan,  # noqa: E402
                                  bounded_weights, device_task, eval_seed, lda_head, scale_stats)
from deltamask.headwire import LdaStats  # noqa: E402
from deltamask.learn.sim import SimConfig, build  # noqa: E402
from deltamask.sampling import round_seed  # noqa: E402
from deltamask.thetawire import decode_theta  # noqa: E402


def load(path):
    with np.load(path) as z:
        meta = json.loads(bytes(z["meta"]).decode())
        return meta, z["wire"].tobytes(), (z["head_weight"], z["head_bias"])


def config_of(meta) -> SimConfig:
    plain = dict(meta["config"])
    plain["local"] = LocalTraining(**plain["local"])
    return SimConfig(**plain)


def shares(config: SimConfig, learners, agg: Aggregator, phase: str, thresholds=None):
    """{name: (LDA statistics, examples)} of every device, as its learner sends them in a round of `phase`: HEAD
    on the unmasked network, REFIT on the expected network of `thresholds` (decoded as the aggregator decodes)."""
    plan = RoundPlan(0, phase, 0, tuple(sorted(learners)), len(learners))
    task = device_task(config, plan)
    return {name: (agg.decode_share(learner.work(task, name, None, thresholds).payload, phase), len(learner.labels))
            for name, learner in learners.items()}


def refit_heads(config: SimConfig, model, learners, num_classes: int, thresholds: np.ndarray):
    """(the re-fit, the means-only re-fit). The re-fit: what the engine's refit round (`refit: true`) gives when
    every device takes part, the FiT-LDA head of every device's statistics on the expected network theta * w
    (`thresholds`: the global theta as it travels; W and b, the anchors stay). The means-only re-fit: the class
    means of the expected network with the head round's covariance (what a round that re-sends only the class
    sums and counts would give: 10 x 1,280 float32 for MobileNetV2, 0.25 bpp)."""
    plain = dataclasses.replace(config, local=dataclasses.replace(config.local, loss="local_classes"))
    agg = Aggregator(plain, model.d, num_classes, model.feature_dim)
    new = shares(plain, learners, agg, REFIT, thresholds)
    old = shares(plain, learners, agg, HEAD)

    def summed(replies):  # weighted as close_head weighs them
        ordered = [replies[name] for name in sorted(replies)]
        weights = bounded_weights([n for _, n in ordered])
        stats = [scale_stats(s, w / max(float(s.counts.sum()), 1.0)) for (s, _), w in zip(ordered, weights)]
        sums, counts = sum(s.sums for s in stats), sum(s.counts for s in stats)
        means = sums / np.maximum(counts, 1)[:, None]
        return sums, counts, sum(s.second for s in stats), (means.T * counts) @ means

    _, _, second, between_old = summed(old)
    sums, counts, _, between_new = summed(new)
    means_only = lda_head([LdaStats(sums, counts, second - between_old + between_new)], config.lda_shrinkage)
    return agg.close_head(new, 0, REFIT), means_only


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--cache-dir", default=None, help="the prefix cache (default: the run's)")
    args = parser.parse_args(argv)
    runs = sorted(((p, *load(p)) for p in args.checkpoints), key=lambda run: run[1]["masks_done"])
    config = config_of(runs[0][1])
    if config.lda_covariance != "full" or config.head != "lda":
        raise SystemExit("head_refresh re-fits a full-covariance FiT-LDA head (head: lda, lda_covariance: full)")
    if args.cache_dir:
        config = dataclasses.replace(config, cache_dir=args.cache_dir)
    model, learners, held_out, num_classes = build(config)
    for path, meta, wire, head in runs:
        if config_of(meta).seed != config.seed:
            raise SystemExit(f"{path}: a checkpoint of another run")
        started = time.perf_counter()
        thresholds = decode_theta(wire, model.d)
        new, means = refit_heads(config, model, learners, num_classes, thresholds)
        seed = eval_seed(round_seed(config.seed, meta["next_index"] - 1))  # the sampled mask the run scored
        scores = {**{f"old_{k}": v for k, v in held_out(head, thresholds, seed).items()},
                  **{f"new_{k}": v for k, v in held_out(new, thresholds, seed).items()},
                  **{f"means_{k}": v for k, v in held_out(means, thresholds, seed).items()}}
        print(json.dumps({"checkpoint": os.path.basename(path), "mask_rounds": meta["masks_done"], **scores,
                          "seconds": round(time.perf_counter() - started, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
