"""The results table: DeltaMask against FedPM and the paper's shared reference, same data, same training.

Runs `deltamask-sim` configurations one after another in this process and writes each run's JSON lines
to OUT/<name>.jsonl, then prints a Markdown table (the one in docs/results.md):

    python benchmarks/compare.py --out runs/fmnist --rounds 25 --train-samples 12000

Configurations: deltamask (bfuse8, per-client reference), deltamask-exact (exact codec), shared
(bfuse8, the paper's single shared reference), fedpm (rawmask: the whole mask, DEFLATE). All start from
the same linear-probing round, whose accuracy is the "linear probe alone" line.
"""
import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Dict, List

os.environ.setdefault("HF_HUB_OFFLINE", "1")

try:
    import deltamask  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from deltamask.learn.sim import SimConfig, run

RUNS = {
    "deltamask": dict(codec="bfuse8", reference="per-client"),
    "deltamask-exact": dict(codec="exact", reference="per-client"),
    "shared": dict(codec="bfuse8", reference="shared"),
    "fedpm": dict(codec="rawmask", reference="per-client"),
    # ablations of what the paper leaves open (docs/design.md sections 3.3-3.4); run them with --runs
    "estimator-fedpm": dict(codec="bfuse8", reference="per-client", estimator="fedpm"),
    "theta0-0.9": dict(codec="bfuse8", reference="per-client", theta0=0.9),
    "mean-formula": dict(codec="bfuse8", reference="per-client", theta_formula="mean"),
}
DEFAULT_RUNS = ["deltamask", "deltamask-exact", "shared", "fedpm"]


def summarise(name: str, rows: List[Dict], seconds: float) -> Dict:
    masks = [r for r in rows if r.get("phase") == "mask"]
    head = next(r for r in rows if r.get("phase") == "head")
    last = masks[-1]
    return {"run": name, "linear_probe": head["accuracy"], "final_accuracy": last["accuracy"],
            "final_accuracy_expected": last["accuracy_expected"],
            "best_accuracy": max(r["accuracy"] for r in masks),
            "uplink_bpp": sum(r["uplink_bpp"] for r in masks) / len(masks),
            "downlink_bpp": sum(r["downlink_bpp"] for r in masks) / len(masks),
            "rounds": len(masks), "minutes": seconds / 60}


def table(summaries: List[Dict]) -> str:
    lines = ["| run | codec / reference | accuracy, sampled mask (last round) | expected mask | best | "
             "uplink bpp (mean) | downlink bpp (mean) | minutes |", "|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        spec = RUNS[s["run"]]
        extra = "".join(f", {k} {v}" for k, v in spec.items() if k not in ("codec", "reference"))
        lines.append(f"| {s['run']} | {spec['codec']} / {spec['reference']}{extra} | {s['final_accuracy']:.4f} | "
                     f"{s['final_accuracy_expected']:.4f} | {s['best_accuracy']:.4f} | {s['uplink_bpp']:.4f} | "
                     f"{s['downlink_bpp']:.3f} | {s['minutes']:.1f} |")
    lines.append(f"| linear probe alone | float32 head | {summaries[0]['linear_probe']:.4f} | | | | | |")
    return "\n".join(lines)


def main() -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, choices=list(RUNS))
    for name in ("rounds", "train_samples", "test_samples", "clients", "seed"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(SimConfig, name))
    parser.add_argument("--alpha", type=float, default=SimConfig.alpha)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    common = {k: getattr(args, k) for k in ("rounds", "train_samples", "test_samples", "clients", "seed", "alpha")}
    summaries = []
    for name in args.runs:
        config = SimConfig(**common, **RUNS[name])
        started, rows = time.perf_counter(), []
        with open(args.out / f"{name}.jsonl", "w") as f:
            f.write(json.dumps({"config": dataclasses.asdict(config)}) + "\n")
            for row in run(config, progress=False):
                rows.append(row)
                f.write(json.dumps(row) + "\n")
                f.flush()
                logging.info("%s round %s: accuracy %.4f uplink %.4f bpp", name, row["round"], row["accuracy"],
                             row["uplink_bpp"])
        summaries.append(summarise(name, rows, time.perf_counter() - started))
        (args.out / "summary.json").write_text(json.dumps(summaries, indent=1))
    print(table(summaries))
    return 0


if __name__ == "__main__":
    sys.exit(main())
