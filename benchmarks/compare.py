"""The results tables: DeltaMask against FedPM, the paper's shared reference and the heads alone, on the
federation engine the coordinator runs (`deltamask-sim`), same data, same training, same head.

    python benchmarks/compare.py --out docs/runs/iid --rounds 25 --train-samples 12000 --test-samples 10000
    python benchmarks/compare.py --out docs/runs/noniid --clients 30 --alpha 0.1 --rho 0.2 --rounds 60 \\
        --train-samples 12000 --test-samples 10000 --runs deltamask-exact fedpm --jobs 2

    python benchmarks/compare.py --experiment experiments/iid.yaml [--jobs 2]     # a whole setting, every seed

Runs (`RUNS`): DeltaMask with each codec and its variants (kappa, ranking, reference), and the paper's
baselines on the same engine: fedpm, fedmask, deepreduce, finetune, eden, linear-probe (docs/design.md,
section 4). `--runs` picks some (with an experiment file: some of the file's); `--seeds` replaces the file's
seeds; a run whose log already holds every round is kept and not run again (`--fresh` runs it again).

Each run writes its JSON lines to OUT/<name>.jsonl (a config line, then a line a round; with several seeds
OUT/<name>-seed<N>.jsonl, which `deltamask-report` groups); the Markdown table is printed at the end and
kept in OUT/table.md. An experiment file (YAML) holds the same arguments: out, runs, seeds, rounds,
train_samples, test_samples, clients, alpha, rho, jobs, set (a mapping of policy keys). `--set key=value` changes the round policy of every
run (e.g. `--set head=linear_probe`); `--jobs 2` runs two configurations at a time, one torch thread each.
Every run starts with the same head phase, whose accuracy is the "head alone" line.
"""
import argparse
import dataclasses
import json
import logging
import multiprocessing
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")

try:
    import deltamask  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from deltamask.federation import LocalTraining  # noqa: E402
from deltamask.learn.sim import SimConfig, run  # noqa: E402

RUNS = {
    "deltamask": dict(codec="bfuse8", reference="per-client"),
    "deltamask-exact": dict(codec="exact", reference="per-client"),
    # conditional codecs: positions ranked within theta_g's undecided set (deltamask/codecs/conditional.py)
    "deltamask-exact-cond": dict(codec="exact-cond", reference="per-client"),
    "deltamask-cond": dict(codec="bfuse8-cond", reference="per-client"),
    "random-kappa": dict(codec="exact-cond", reference="per-client", ranking="random"),  # ablation: no KL rank
    "shared": dict(codec="bfuse8", reference="shared"),
    "fedpm": dict(codec="rawmask", reference="per-client"),
    # the paper's other baselines, on the same engine, data, training code and bit accounting
    "fedmask": dict(codec="bitmask", reference="per-client", mask_rule="threshold"),  # theta_k >= tau, 1 bpp
    # tau 0.5 never fires from theta0 0.999 in one local epoch (the masks stay all ones): a weight dropped
    # once its local theta falls below 0.998 instead (docs/results.md)
    "fedmask-0.998": dict(codec="bitmask", reference="per-client", mask_rule="threshold", tau=0.998),
    "deepreduce": dict(codec="bloom", reference="per-client"),  # Bloom filter of the delta, P0 policy
    "finetune": dict(codec="float32", reference="per-client"),  # the same layers' weights, FedAvg, 32 bpp
    "eden": dict(codec="eden", reference="per-client"),  # their updates through EDEN's 1-bit quantiser
    "linear-probe": dict(codec="exact", reference="per-client", head="linear_probe", head_only=True),
    # DeltaMask's variants (issue: the paper's comparison, item 2)
    "deltamask-bfuse16": dict(codec="bfuse16", reference="per-client"),
    "deltamask-xor8": dict(codec="xor8", reference="per-client"),
    "deltamask-xor16": dict(codec="xor16", reference="per-client"),
    **{f"kappa-{k}": dict(codec="exact-cond", reference="per-client", kappa_start=k, kappa_end=k)
       for k in (0.2, 0.4, 0.6, 0.8, 1.0)},
    # ablations of what the paper leaves open (docs/design.md section 3.4); run them with --runs
    "estimator-fedpm": dict(codec="bfuse8", reference="per-client", estimator="fedpm"),
    "theta0-0.9": dict(codec="bfuse8", reference="per-client", theta0=0.9),
    "mean-formula": dict(codec="bfuse8", reference="per-client", theta_formula="mean"),
}
DEFAULT_RUNS = ["deltamask", "deltamask-exact", "shared", "fedpm"]


def summarise(name: str, rows: List[Dict], seconds: Optional[float]) -> Dict:
    heads = [r for r in rows if r.get("phase") == "head"]
    masks = [r for r in rows if r.get("phase") == "mask"] or heads  # linear probing alone: its head rounds
    refit = [r for r in rows if r.get("phase") == "refit"]  # the head fitted again on theta * w (policy refit)
    last = masks[-1]
    return {"run": name, "head_accuracy": heads[-1]["accuracy"], "head_bpp": sum(r["uplink_bpp"] for r in heads),
            "final_accuracy": last["accuracy"], "final_accuracy_expected": last.get("accuracy_expected", last["accuracy"]),
            "best_accuracy": max(r["accuracy"] for r in masks),
            "uplink_bpp": sum(r["uplink_bpp"] for r in masks) / len(masks),
            "downlink_bpp": sum(r.get("downlink_bpp", 0.0) for r in masks) / len(masks),
            "rounds": len(masks), "minutes": None if seconds is None else seconds / 60,
            **({"refit_accuracy_expected": refit[-1]["accuracy_expected"], "refit_bpp": refit[-1]["uplink_bpp"]}
               if refit else {}),
            # keep: best with validation images (--set val_samples=N): the round kept and its test score
            **({"kept_round": rows[-1]["kept_round"], "kept_accuracy": rows[-1]["kept_accuracy"]}
               if "val_accuracy" in rows[-1] else {})}


def table(summaries: List[Dict], head: str) -> str:
    kept = all("kept_round" in s for s in summaries)
    refit = all("refit_accuracy_expected" in s for s in summaries)
    lines = ["| run | codec / reference | accuracy, sampled mask (last round) | expected mask | best | "
             + ("expected mask, refitted head | " if refit else "")
             + ("kept by validation (round) | " if kept else "") + "uplink bpp (mean) | downlink bpp (mean) | minutes |",
             "|---|---|---|---|---|---|---|---|" + ("---|" if kept else "") + ("---|" if refit else "")]
    for s in summaries:
        spec = RUNS[re.sub(r"-seed\d+$", "", s["run"])]
        extra = "".join(f", {k} {v}" for k, v in spec.items() if k not in ("codec", "reference", "head_only"))
        lines.append(f"| {s['run']} | {spec['codec']} / {spec['reference']}{extra} | {s['final_accuracy']:.4f} | "
                     f"{s['final_accuracy_expected']:.4f} | {s['best_accuracy']:.4f} | "
                     + (f"{s['refit_accuracy_expected']:.4f} | " if refit else "")
                     + (f"{s['kept_accuracy']:.4f} ({s['kept_round']}) | " if kept else "") + f"{s['uplink_bpp']:.4f} | "
                     f"{s['downlink_bpp']:.3f} | " + ("" if s["minutes"] is None else f"{s['minutes']:.1f}") + " |")
    lines.append(f"| {head} head alone | head round: {summaries[0]['head_bpp']:.3f} bpp | "
                 f"{summaries[0]['head_accuracy']:.4f} | | | " + ("| " if kept else "") + ("| " if refit else "")
                 + "| | |")
    return "\n".join(lines)


def one(name: str, config: SimConfig, out: Path, threads: int) -> Dict:
    """Run one configuration, writing its JSON lines as they come; returns its summary."""
    import torch

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    if threads:
        torch.set_num_threads(threads)
    started, rows = time.perf_counter(), []
    with open(out / f"{name}.jsonl", "w") as f:
        f.write(json.dumps({"config": dataclasses.asdict(config)}) + "\n")
        for row in run(config, progress=False):
            rows.append(row)
            f.write(json.dumps(row) + "\n")
            f.flush()
            logging.info("%s round %s: accuracy %.4f uplink %.4f bpp", name, row["round"], row["accuracy"],
                         row["uplink_bpp"])
    return summarise(name, rows, time.perf_counter() - started)


def sim_config(common: Dict, seed: int, spec: Dict, local: Dict) -> SimConfig:
    """One run's configuration: the common arguments, the run's own keys; `head_only` (linear probing
    alone) spends the rounds on federated linear-probe rounds instead of mask rounds."""
    keys = {**common, "seed": seed, **spec}
    if keys.pop("head_only", False):
        keys.update(head_rounds=common["rounds"], rounds=0)
    return SimConfig(**keys, local=LocalTraining(**local))


def finished(path: Path, config: SimConfig):
    """The summary of a complete log of this very configuration at `path` (a stopped matrix goes on where it
    was), else None."""
    if not path.exists():
        return None
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not lines or lines[0].get("config") != json.loads(json.dumps(dataclasses.asdict(config))):
        return None
    rows = lines[1:]
    if len([r for r in rows if r.get("phase") == "mask"]) != config.rounds or \
            len([r for r in rows if r.get("phase") == "head" and r.get("round", 0) >= 0]) != config.head_phase_rounds or \
            len([r for r in rows if r.get("phase") == "refit"]) != config.refits:
        return None
    return summarise(path.stem, rows, None)  # minutes: the earlier summary's (merged), not this reading's


def merged(path: Path, summaries: List[Dict]) -> List[Dict]:
    """The summaries already at `path` (a JSON list), those of the same runs replaced by `summaries`, then the
    new ones."""
    new = {s["run"]: s for s in summaries}
    old = json.loads(path.read_text()) if path.exists() else []
    kept = [_with_minutes(new.pop(s["run"]), s) if s["run"] in new else s for s in old]
    return kept + [s for s in summaries if s["run"] in new]


def _with_minutes(summary: Dict, earlier: Dict) -> Dict:
    """A summary read back from a finished log keeps the minutes the run took when it ran."""
    return {**summary, "minutes": earlier.get("minutes")} if summary["minutes"] is None else summary


def parse_value(text: str):
    if text.lower() in ("true", "false"):  # refit=true
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return None if text in ("none", "null") else text


EXPERIMENT_KEYS = {"out", "runs", "seeds", "rounds", "train_samples", "test_samples", "clients", "alpha", "rho",
                   "jobs", "set"}


def experiment(path: Path, args) -> None:
    """Fill `args` from an experiment file; ValueError naming the file and the key for anything unknown."""
    import yaml

    data = yaml.safe_load(path.read_text()) or {}
    unknown = set(data) - EXPERIMENT_KEYS
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; expected some of {sorted(EXPERIMENT_KEYS)}")
    for key, value in data.items():
        if key == "set":
            args.set = [f"{k}={v}" for k, v in (value or {}).items()] + list(args.set or [])  # the command line wins
        elif key == "out":
            args.out = Path(value)
        elif key == "runs":  # a list, or a mapping of run -> its own seeds (null: the file's seeds)
            bad = [r for r in value if r not in RUNS]
            if bad:
                raise ValueError(f"{path}: runs {bad} are not among {sorted(RUNS)}")
            args.runs = list(value)
            args.run_seeds = {k: v for k, v in value.items() if v} if isinstance(value, dict) else {}
        else:
            setattr(args, key, value)


def main() -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experiment", type=Path, default=None, help="an experiment file (YAML); see experiments/")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="run every configuration with each seed")
    parser.add_argument("--runs", nargs="+", default=None, choices=list(RUNS),
                        help=f"default: {' '.join(DEFAULT_RUNS)}; with --experiment, only these of the file's runs")
    for name in ("rounds", "train_samples", "test_samples", "clients", "seed"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(SimConfig, name))
    parser.add_argument("--alpha", type=float, default=SimConfig.alpha)
    parser.add_argument("--rho", type=float, default=SimConfig.rho)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="policy keys for every run (local training: local.KEY=VALUE)")
    parser.add_argument("--jobs", type=int, default=1, help="configurations run at a time (one torch thread each)")
    parser.add_argument("--fresh", action="store_true", help="run again the runs whose logs are complete already")
    args = parser.parse_args()
    only, seeds = args.runs, args.seeds
    if args.experiment is not None:
        experiment(args.experiment, args)
        if only:  # in the command line's order
            args.runs = [r for r in only if r in args.runs]
        if seeds:  # the command line's seeds for every run
            args.seeds, args.run_seeds = seeds, {}
    args.runs = args.runs or DEFAULT_RUNS
    if args.out is None:
        parser.error("--out (or an experiment file's out:) is required")
    args.out.mkdir(parents=True, exist_ok=True)
    common = {k: getattr(args, k) for k in ("rounds", "train_samples", "test_samples", "clients", "seed", "alpha",
                                            "rho")}
    local = {}
    for item in args.set:
        key, _, value = item.partition("=")
        if key.startswith("local."):
            local[key[6:]] = parse_value(value)
        else:
            common[key] = parse_value(value)
    seeds = args.seeds or [args.seed]
    run_seeds = {name: getattr(args, "run_seeds", {}).get(name) or seeds for name in args.runs}
    suffix = any(len(v) > 1 for v in run_seeds.values())
    configs = {(f"{name}-seed{seed}" if suffix else name): sim_config(common, seed, RUNS[name], local)
               for name in args.runs for seed in run_seeds[name]}
    for config in configs.values():
        config.check()
    threads = 1 if args.jobs > 1 else 0
    done = {} if args.fresh else {name: finished(args.out / f"{name}.jsonl", config) for name, config in configs.items()}
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {name: pool.submit(one, name, config, args.out, threads) for name, config in configs.items()
                   if not done.get(name)}
        for name in done:
            if done[name]:
                logging.info("%s: its log holds every round already (kept; --fresh runs it again)", name)
        summaries = [done[name] if done.get(name) else futures[name].result() for name in configs]
    summaries = merged(args.out / "summary.json", summaries)  # a run of some of a file's runs keeps the others
    (args.out / "summary.json").write_text(json.dumps(summaries, indent=1))
    head = next(iter(configs.values())).head
    text = table(summaries, head)
    (args.out / "table.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
