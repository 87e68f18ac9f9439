"""Run this Flower App on Flower's simulation engine (Ray backend), one virtual node per device, with the run
config of ./pyproject.toml; the round summaries go to its `log` file (rounds.jsonl), one JSON object a round.

    python run.py [--run-config key=value ...]
"""
import argparse
import json
import sys
import tomllib
import warnings
from pathlib import Path

from flwr.simulation import run_simulation

from deltamask.flower import apps, sim_config

HERE = Path(__file__).resolve().parent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-config", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override the pyproject's [tool.flwr.app.config] (values as TOML: rounds=10, codec=\"bfuse8\")")
    args = p.parse_args()
    run_config = tomllib.loads((HERE / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    for item in args.run_config:
        key, _, value = item.partition("=")
        run_config[key] = tomllib.loads(f"v = {value}")["v"]
    try:
        config = sim_config(run_config)
    except ValueError as exc:
        print(f"run.py: error: {exc}", file=sys.stderr)
        return 2
    log = HERE / run_config.get("log", "rounds.jsonl")
    server, client = apps(config, str(log))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        run_simulation(server, client, num_supernodes=config.clients,
                       backend_config={"client_resources": {"num_cpus": 1}})
    for line in log.read_text().splitlines()[1:]:
        row = json.loads(line)
        print(f"round {row['round']:>2} {row['phase']:<4}  accuracy {row['accuracy']:.4f}  "
              f"uplink {row['uplink_bpp']:.4f} bpp")
    return 0


if __name__ == "__main__":
    sys.exit(main())
