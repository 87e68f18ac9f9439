"""Driver: the federation with its FiT-LDA head round, then the head replaced by a linear probe trained on
virtual features drawn from the same class Gaussians (the statistics the head round sums), and mask rounds on it
(N = 30, Dir(0.1), rho 0.2, 10,000 test and 10,000 validation images; stopped at round 24).

    python docs/runs/head-sensitivity/virtual_probe_federation.py 0.99 60 > virtual-probe-t99.jsonl
"""
import json, sys, os, dataclasses
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import numpy as np, torch
from deltamask.learn.sim import Federation, SimConfig
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from virtual_probe import virtual_probe  # noqa: E402
torch.set_num_threads(1)
theta0, rounds = float(sys.argv[1]), int(sys.argv[2])
config = SimConfig(head="lda", lda_covariance="full", train_samples=12000, test_samples=10000, val_samples=10000,
                   clients=30, alpha=0.1, rho=0.2, rounds=rounds, seed=0, theta0=theta0, cache_dir=".prefix-cache")
print(json.dumps({"config": dataclasses.asdict(config), "driver": "ccvr linear probe, 1000 a class, 20 epochs, lr 1e-3"}), flush=True)
fed = Federation(config)
probe = virtual_probe(fed, 1000, 20, 1e-3)
for row in fed.rounds(progress=None):
    print(json.dumps(row), flush=True)
    if row["phase"] == "head":
        fed.agg.head = tuple(np.asarray(x, np.float32) for x in probe)
        print(json.dumps({"round": row["round"], "phase": "head", "head": "ccvr-probe", "clients": 0, "uplink_bpp": 0.0,
                          **fed.evaluate(fed.agg.head)}), flush=True)
        fed.kept = None
