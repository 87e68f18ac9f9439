"""The head phase alone: accuracy against uplink bits for every head the engine offers, on one split.

    python benchmarks/heads.py --clients 30 --alpha 0.1 --train-samples 12000 --test-samples 10000 \\
        --cache-dir ~/.cache/deltamask/prefix          # one JSON row a head; ~2 min with the cache warm

Each head runs through the federation engine exactly as the coordinator runs it (plan_round over the
devices, the local learner's share, the aggregator's close_head), the backbone unmasked; accuracy is the
head alone on the held-out images. Bits are per device per head round over d, summed over head rounds.
"""
import argparse
import dataclasses
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from deltamask.federation import (HEAD, Aggregator, LocalTraining, device_task, head_bits,  # noqa: E402
                                  plan_round)
from deltamask.learn.sim import Federation, SimConfig  # noqa: E402

HEADS = [dict(head="kaiming")]
HEADS += [dict(head="lda", lda_covariance="full", lda_shrinkage=s) for s in (0.01, 0.1, 0.3)]
HEADS += [dict(head="lda", lda_covariance="diag", lda_shrinkage=s) for s in (0.0, 0.1)]
HEADS += [dict(head="lda", lda_covariance="projected", lda_rank=r, lda_shrinkage=s)
          for r in (64, 128, 256, 384, 512) for s in (0.01, 0.1)]
HEADS += [dict(head="linear_probe", head_rounds=n, head_rho=rho, local=LocalTraining(head_epochs=e, head_lr=lr))
          for n, rho, e, lr in ((1, 1.0, 20, 1e-3), (5, 1.0, 5, 0.01), (20, 1.0, 5, 0.03), (20, 0.2, 5, 0.03))]


def measure(fed: Federation, base: SimConfig, variant: dict) -> dict:
    policy = dataclasses.replace(base, **variant)
    agg = Aggregator(policy, fed.d, fed.agg.num_classes, fed.agg.feature_dim)
    started, index, bits = time.perf_counter(), 0, 0
    while True:
        plan = plan_round(policy, index, index, 0, policy.names())
        if plan.phase != HEAD:
            break
        task = device_task(policy, plan)
        shares = {name: (agg.decode_share(reply.payload), reply.examples)
                  for name, (reply, _) in fed.fleet.work(task, plan.selected, agg.head).items()}
        agg.close_head(shares, plan.seed)
        bits += head_bits(policy, agg.num_classes, agg.feature_dim)
        index += 1
    label = {k: (dataclasses.asdict(v) if k == "local" else v) for k, v in variant.items()}
    return {**label, "accuracy": round(fed.evaluate(agg.head)["accuracy"], 4), "bpp": round(bits / fed.d, 4),
            "head_rounds": index, "seconds": round(time.perf_counter() - started, 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name in ("train_samples", "test_samples", "clients", "seed"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(SimConfig, name))
    parser.add_argument("--alpha", type=float, default=SimConfig.alpha)
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args(argv)
    base = SimConfig(head="kaiming", train_samples=args.train_samples, test_samples=args.test_samples,
                     clients=args.clients, seed=args.seed, alpha=args.alpha, cache_dir=args.cache_dir)
    fed = Federation(base)
    for variant in HEADS:
        print(json.dumps(measure(fed, base, variant)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
