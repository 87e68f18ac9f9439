"""The same for FiT-LDA (full covariance, shrinkage 0.01) on the features as they are and on the features scaled
to the training set's mean norm (f * r0 / |f|): does a head blind to the features' scale lose less?

    python docs/runs/head-sensitivity/l2norm.py 0.1 30 > l2norm-skew.jsonl
"""
import json, sys, os
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import numpy as np, torch
from torch import nn
from deltamask.federation import lda_head
from deltamask.learn.sim import Federation, SimConfig
from deltamask.learn.training import features_of, lda_statistics
from deltamask.learn.masking import FIXED, SAMPLE
from deltamask.sampling import theta_to_thresholds
torch.set_num_threads(1)
alpha, clients = float(sys.argv[1]), int(sys.argv[2])
base = SimConfig(head="lda", train_samples=12000, test_samples=3000, clients=clients, seed=0, alpha=alpha, cache_dir=".prefix-cache")
fed = Federation(base)
m = fed.model
class Norm(nn.Module):
    def __init__(s, scale): super().__init__(); s.scale = scale
    def forward(s, x): return s.scale * x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
ones = np.ones(m.d, bool)
m.masks.set_mode(FIXED, ones)
feats, labels = [], []
for name, l in fed.fleet.learners.items():
    feats.append(features_of(m.backbone.masked, l.inputs).detach()); labels.append(l.labels)
m.masks.set_mode(SAMPLE)
F, Y = torch.cat(feats), torch.cat(labels)
r0 = float(F.norm(dim=1).mean())
print("mean feature norm", r0, file=sys.stderr)
for label, scale in (("plain", None), ("l2norm", r0)):
    G = F if scale is None else scale * F / F.norm(dim=1, keepdim=True)
    head = lda_head([lda_statistics(G.float(), Y, 10)], 0.01)
    m.net = nn.Sequential(m.backbone.masked, m.head) if scale is None else nn.Sequential(m.backbone.masked, Norm(scale), m.head)
    out = {"head": label, "alone": fed.evaluate.test(head)["accuracy"], "bias_absmax": float(np.abs(head[1]).max())}
    for t in (0.99, 0.999):
        th = theta_to_thresholds(np.full(m.d, t))
        s = [fed.evaluate.test(head, th, seed) for seed in (1, 2, 3)]
        out[f"sampled@{t}"] = [round(x["accuracy"], 4) for x in s]; out[f"expected@{t}"] = round(s[0]["accuracy_expected"], 4)
    print(json.dumps(out), flush=True)
