"""Does a head that moves with the features help? Re-fit the FiT-LDA head on the masked network a federation
reached, and score it on the validation and test images.

    deltamask-sim ... --val-samples 10000 --checkpoint run.npz >> run.jsonl     # copies of run.npz after rounds
    python benchmarks/head_refresh.py snapshots/*.npz                          # one JSON line a checkpoint

Each checkpoint (`deltamask-sim --checkpoint`) holds the run's configuration, its head and the global theta as
it travels. Every simulated device computes its LDA statistics on the features of the expected network
theta * w (what `deltamask-server export` bakes), as a head round computes them on the unmasked one; the
aggregator sums them into a new head (`Aggregator.close_head`: the sums do not depend on the split, so this is
the head a refresh round of every device would give, at the head round's bits again). The network is scored
with the old head and the new one.
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

from deltamask.federation import Aggregator, LocalTraining, eval_seed  # noqa: E402
from deltamask.headwire import encode_lda_stats  # noqa: E402
from deltamask.learn.masking import EXPECTED  # noqa: E402
from deltamask.learn.sim import SimConfig, build  # noqa: E402
from deltamask.learn.training import features_of, lda_statistics  # noqa: E402
from deltamask.sampling import round_seed, thresholds_to_theta  # noqa: E402
from deltamask.thetawire import decode_theta  # noqa: E402


def load(path):
    with np.load(path) as z:
        meta = json.loads(bytes(z["meta"]).decode())
        return meta, z["wire"].tobytes(), (z["head_weight"], z["head_bias"])


def config_of(meta) -> SimConfig:
    plain = dict(meta["config"])
    plain["local"] = LocalTraining(**plain["local"])
    return SimConfig(**plain)


def refit_head(config: SimConfig, model, learners, num_classes: int, thresholds: np.ndarray):
    """The FiT-LDA head of every device's statistics on the expected network theta * w (`thresholds`: the global
    theta as it travels), combined as the head round combines them (W and b; class anchors are not re-sent)."""
    plain = dataclasses.replace(config, local=dataclasses.replace(config.local, loss="local_classes"))
    model.masks.set_theta(thresholds_to_theta(thresholds))
    model.masks.set_mode(EXPECTED)
    agg, shares = Aggregator(plain, model.d, num_classes, model.feature_dim), {}
    for name, learner in learners.items():  # through the head round's wire format, as a device sends them
        stats = lda_statistics(features_of(model.net[0], learner.inputs), learner.labels, num_classes, "full")
        shares[name] = (agg.decode_share(encode_lda_stats(stats, "full")), len(learner.labels))
    return agg.close_head(shares, 0)


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
        new = refit_head(config, model, learners, num_classes, thresholds)
        seed = eval_seed(round_seed(config.seed, meta["next_index"] - 1))  # the sampled mask the run scored
        scores = {**{f"old_{k}": v for k, v in held_out(head, thresholds, seed).items()},
                  **{f"new_{k}": v for k, v in held_out(new, thresholds, seed).items()}}
        print(json.dumps({"checkpoint": os.path.basename(path), "mask_rounds": meta["masks_done"], **scores,
                          "seconds": round(time.perf_counter() - started, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
