"""How well the frozen full-covariance LDA head reads virtual.py's virtual examples (every mask kept): the
training examples shifted to another class, x - m_y + m_c, scored as class c; the same with each position's
spread rescaled to class c's (m_c + (x - m_y) s_c / s_y); and the ten class means themselves.

    python docs/runs/skew-diagnosis-3/virtual_check.py      # from the repository root; one JSON line
"""
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.getcwd())
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import virtual  # noqa: E402  (its Federation keeps the class means of the masked blocks' inputs)
from deltamask.federation import HEAD  # noqa: E402
from deltamask.learn.masking import FIXED  # noqa: E402
from deltamask.learn.sim import Federation, SimConfig  # noqa: E402

config = SimConfig(clients=30, alpha=0.1, train_samples=12000, test_samples=2000, lda_covariance="full",
                   theta0=0.99, cache_dir=".prefix-cache")
fed = Federation(config)
index = 0
while (plan := fed.plan(index)).phase == HEAD:
    work = fed.open(plan)
    row = fed.close(plan, work, fed.fleet.work(work.task, plan.selected, work.head))
    index += 1
model = next(iter(fed.fleet.learners.values())).model
model.set_head(fed.agg.head)
model.masks.set_mode(FIXED, np.ones(model.d, dtype=bool))
means = virtual.STATE["means"]
x = torch.cat([learner.inputs for learner in fed.fleet.learners.values()])
y = torch.cat([learner.labels for learner in fed.fleet.learners.values()])
c = (y + torch.randint(1, 10, (len(y),), generator=torch.Generator().manual_seed(0))) % 10  # another class
spread = torch.stack([x[y == k].std(0) for k in range(10)])
with torch.no_grad():
    real = model.net(x).argmax(1)
    shifted = model.net(x - means[y] + means[c]).argmax(1)
    rescaled = model.net(means[c] + (x - means[y]) * spread[c] / spread[y].clamp(min=1e-3)).argmax(1)
    prototypes = model.net(means).argmax(1)
print(json.dumps({"head": row["accuracy"], "train_real_acc": round(float((real == y).float().mean()), 4),
                  "shift_acc_as_c": round(float((shifted == c).float().mean()), 4),
                  "shift_acc_as_y": round(float((shifted == y).float().mean()), 4),
                  "adain_acc_as_c": round(float((rescaled == c).float().mean()), 4),
                  "mean_prototypes_correct": int((prototypes == torch.arange(10)).sum())}))
