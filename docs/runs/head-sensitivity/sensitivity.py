"""How much a head loses to the masks a federation's first round samples: each head built by the engine on one
split, then scored alone, with a mask sampled from a uniform theta (0.99, 0.999; two seeds) and with the expected
mask (every masked weight times theta), on 3,000 test images.

    python docs/runs/head-sensitivity/sensitivity.py 0.1 30 > sensitivity-skew.jsonl   # Dir(0.1), N = 30
    python docs/runs/head-sensitivity/sensitivity.py 10 10 > sensitivity-iid.jsonl     # Dir(10), N = 10
"""
import dataclasses, json, sys, os
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import numpy as np
from deltamask.federation import HEAD, Aggregator, LocalTraining, device_task, plan_round
from deltamask.learn.sim import Federation, SimConfig
from deltamask.sampling import theta_to_thresholds

alpha, clients = float(sys.argv[1]), int(sys.argv[2])
SHRINK = [float(x) for x in sys.argv[3].split(",")] if len(sys.argv) > 3 else (0.01, 0.1, 0.3)
PROBE = len(sys.argv) <= 3  # the one-round linear probe too, unless shrinkages are named
base = SimConfig(head="kaiming", train_samples=12000, test_samples=3000, clients=clients, seed=0, alpha=alpha, cache_dir=".prefix-cache")
fed = Federation(base)
variants = [dict(head="lda", lda_covariance="full", lda_shrinkage=s) for s in SHRINK]
variants += [dict(head="linear_probe", head_rounds=1, local=LocalTraining(head_epochs=20, head_lr=1e-3))] if PROBE else []
for v in variants:
    policy = dataclasses.replace(base, **v)
    agg = Aggregator(policy, fed.d, fed.agg.num_classes, fed.agg.feature_dim)
    index = 0
    while True:
        plan = plan_round(policy, index, index, 0, policy.names())
        if plan.phase != HEAD: break
        task = device_task(policy, plan)
        shares = {n: (agg.decode_share(r.payload), r.examples) for n, (r, _) in fed.fleet.work(task, plan.selected, agg.head).items()}
        agg.close_head(shares, plan.seed); index += 1
    W = agg.head[0]
    out = {"variant": {k: v for k, v in v.items() if k != "local"}, "head": fed.evaluate(agg.head)["accuracy"], "w_norm": float(np.linalg.norm(W))}
    for t in (0.99, 0.999):
        th = theta_to_thresholds(np.full(fed.d, t))
        s = [fed.evaluate(agg.head, th, seed) for seed in (1, 2)]
        out[f"sampled@{t}"] = [x["accuracy"] for x in s]; out[f"expected@{t}"] = s[0]["accuracy_expected"]
    print(json.dumps(out), flush=True)
