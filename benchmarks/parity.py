"""Parity on the embedded default: the simulator and a real coordinator with 3 agent processes, same policy,
data split and seeds, must produce the same head and theta bytes after every round (the refit round: its head).

    python benchmarks/parity.py [--rounds 3] [--samples 3000]     # one JSON object on stdout

MobileNetV2 (ImageNet weights, offline copy) on Fashion-MNIST at 64x64, a seeded training subset split
Dir(10) over the 3 devices named client-000..002 (as the simulator names them), the deployed default
head and codec. Every process runs torch on one thread, so that both sides compute alike.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from server import demo  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="mask rounds")
    parser.add_argument("--samples", type=int, default=3000, help="training images split over the 3 devices")
    parser.add_argument("--data-root", default=None)
    args = parser.parse_args(argv)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    os.environ.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")  # the demo's processes inherit it
    started = time.monotonic()
    fleet = []
    with tempfile.TemporaryDirectory(prefix="deltamask-parity-") as tmp:
        code = demo.run(demo.write_configs(Path(tmp), args, names="client-{:03d}"), fleet, out=sys.stderr)
    if code:
        return code
    fleet_s = time.monotonic() - started
    sim_args = ["--clients", "3", "--train-samples", str(args.samples), "--test-samples", "1000",
                "--rounds", str(args.rounds), "--min-quorum", "3", "--alpha", "10"]
    if args.data_root:
        sim_args += ["--data-root", args.data_root]
    out = subprocess.run([sys.executable, "-m", "deltamask.learn.sim", *sim_args], capture_output=True, text=True,
                         cwd=ROOT, env=env)
    if out.returncode:
        print(out.stderr[-3000:], file=sys.stderr)
        return out.returncode
    sim = [json.loads(line) for line in out.stdout.splitlines()][1:]
    closed = [r for r in fleet if r["state"] == "closed"]
    pairs = list(zip(sim, closed))
    key = {"head": "head_sha256", "mask": "theta_sha256", "refit": "head_sha256"}
    same = [a["round"] == b["round"] and a[key[a["phase"]]] == b.get(key[a["phase"]]) for a, b in pairs]
    print(json.dumps({"rounds": len(sim), "identical_rounds": sum(same), "mask_rounds": args.rounds,
                      "fleet_rounds": len(closed), "samples": args.samples,
                      "accuracy_sim": [round(r["accuracy"], 4) for r in sim],
                      "accuracy_fleet": [round(r.get("accuracy", -1), 4) for r in closed],
                      "fleet_s": round(fleet_s, 1), "total_s": round(time.monotonic() - started, 1)}))
    return 0 if all(same) and len(sim) == len(closed) else 1


if __name__ == "__main__":
    sys.exit(main())
