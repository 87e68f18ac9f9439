"""How much can masks add to a frozen head at all? The whole training subset on one device (no federation,
no skew, no aggregation): its head round, then the mask trained epoch after epoch from theta0, scored on the
held-out images after each epoch with a sampled mask, the expected mask theta * w and the mode theta >= 1/2.

    python benchmarks/mask_ceiling.py --train-samples 12000 --test-samples 10000 --epochs 6 \\
        --theta0 0.99 --cache-dir ~/.cache/deltamask/prefix      # one JSON line an epoch; ~75 s each on 2 cores

The head is the simulator's head phase (plan, open, close: the engine's) for `--head`, full-covariance
FiT-LDA by default (the best head alone under label skew, docs/results.md); the mask is trained by the same
`train_mask` the devices run (Adam, batch 64, the softmax over every class: one device holds all of them).
It bounds what a federation of the same masks can reach in as many passes over the data.
"""
import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from deltamask.federation import HEAD, LocalTraining  # noqa: E402
from deltamask.learn.sim import Federation, SimConfig  # noqa: E402
from deltamask.learn.training import train_mask  # noqa: E402
from deltamask.sampling import theta_to_thresholds  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-samples", type=int, default=12000)
    parser.add_argument("--test-samples", type=int, default=10000)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--theta0", type=float, default=0.99)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--head", default="lda")
    parser.add_argument("--lda-covariance", default="full")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args(argv)
    config = SimConfig(clients=1, alpha=100.0, train_samples=args.train_samples, test_samples=args.test_samples,
                       head=args.head, lda_covariance=args.lda_covariance, theta0=args.theta0, seed=args.seed,
                       cache_dir=args.cache_dir, local=LocalTraining(lr=args.lr, loss="cross_entropy"))
    fed = Federation(config)
    (learner,) = fed.fleet.learners.values()
    index = 0
    while (plan := fed.plan(index)).phase == HEAD:  # the head phase, as the simulator runs it
        work = fed.open(plan)
        row = fed.close(plan, work, fed.fleet.work(work.task, plan.selected, work.head))
        index += 1
    head = fed.agg.head
    print(json.dumps({"epoch": 0, "head": args.head, "lda_covariance": args.lda_covariance, "theta0": args.theta0,
                      "lr": args.lr, "samples": args.train_samples, "accuracy": row["accuracy"],
                      "head_uplink_bpp": round(row["uplink_bpp"], 4)}), flush=True)
    theta = np.full(fed.d, args.theta0, dtype=np.float32)
    model = learner.model
    for epoch in range(1, args.epochs + 1):
        started = time.perf_counter()
        model.set_head(head)
        theta = train_mask(model.net, model.masks, theta, learner.inputs, learner.labels, config.local, seed=epoch)
        scores = fed.evaluate(head, theta_to_thresholds(theta), eval_seed=epoch)
        print(json.dumps({"epoch": epoch, **{k: round(v, 4) for k, v in scores.items()},
                          "theta_mean": round(float(theta.mean()), 5), "below_half": int((theta < 0.5).sum()),
                          "seconds": round(time.perf_counter() - started, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
