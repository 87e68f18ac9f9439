"""A linear probe trained on virtual features drawn from the federation's class Gaussians (means and the shared
covariance the FiT-LDA head round sums): its accuracy and what a sampled mask costs it.

    python docs/runs/head-sensitivity/virtual_probe.py 0.1 30 1000 20 0.001 > virtual-probe-skew.jsonl
"""
import json, sys, os
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import numpy as np, torch
from deltamask.learn.sim import Federation, SimConfig
from deltamask.learn.training import features_of, linear_probe
from deltamask.learn.masking import FIXED, SAMPLE
from deltamask.sampling import theta_to_thresholds


def virtual_probe(fed, per_class=1000, epochs=20, lr=1e-3, classes=10):
    """The probe (weight, bias), trained as a device trains its share on `per_class` virtual features a class
    drawn (seed 0) from N(mu_c, S): the class means and the shrunk (0.01) shared covariance of the unmasked
    features of every device, which are the sums the FiT-LDA head round makes."""
    m = fed.model
    m.masks.set_mode(FIXED, np.ones(m.d, bool))
    F = torch.cat([features_of(m.backbone.masked, l.inputs).detach() for l in fed.fleet.learners.values()]).double()
    Y = torch.cat([l.labels for l in fed.fleet.learners.values()])
    m.masks.set_mode(SAMPLE)
    mu = torch.stack([F[Y == c].mean(0) for c in range(classes)])
    R = F - mu[Y]
    S = R.T @ R / len(F)
    S = 0.99 * S + 0.01 * torch.eye(len(S), dtype=S.dtype) * S.diagonal().mean()
    L = torch.linalg.cholesky(S)
    g = torch.Generator().manual_seed(0)
    Z = torch.randn(classes * per_class, len(S), generator=g, dtype=torch.float64)
    labels = torch.arange(classes).repeat_interleave(per_class)
    V = (mu[labels] + Z @ L.T).float()
    return linear_probe(V, labels, classes, epochs=epochs, lr=lr, batch_size=64, seed=0)


if __name__ == "__main__":
    torch.set_num_threads(1)
    alpha, clients = float(sys.argv[1]), int(sys.argv[2])
    per_class, epochs, lr = int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
    fed = Federation(SimConfig(head="lda", train_samples=12000, test_samples=3000, clients=clients, seed=0,
                               alpha=alpha, cache_dir=".prefix-cache"))
    head = virtual_probe(fed, per_class, epochs, lr)
    out = {"per_class": per_class, "epochs": epochs, "lr": lr, "alone": fed.evaluate.test(head)["accuracy"],
           "w_norm": float(np.linalg.norm(head[0])), "bias_absmax": float(np.abs(head[1]).max())}
    for t in (0.99, 0.999):
        th = theta_to_thresholds(np.full(fed.model.d, t))
        s = [fed.evaluate.test(head, th, seed) for seed in (1, 2)]
        out[f"sampled@{t}"] = [round(x["accuracy"], 4) for x in s]
        out[f"expected@{t}"] = round(s[0]["accuracy_expected"], 4)
    print(json.dumps(out), flush=True)
