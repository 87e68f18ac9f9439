"""Why gaussian.py collapses: the squared Mahalanobis distance of the training features to their class mean
(mean over examples) against that of one point, the features' overall mean, to each class mean; and between the
class means. Every mask kept, the full-covariance LDA head round. Run from the repository root; one JSON line."""
import os, sys, json
sys.path.insert(0, os.getcwd()); sys.path.insert(0, "docs/runs/skew-diagnosis-3")
import numpy as np, torch
import gaussian  # keeps means and precision of the head round
from deltamask.federation import HEAD
from deltamask.learn.sim import Federation, SimConfig
from deltamask.learn.masking import FIXED
from deltamask.learn.training import features_of
fed = Federation(SimConfig(clients=30, alpha=0.1, train_samples=12000, test_samples=2000, lda_covariance="full", theta0=0.99, cache_dir=".prefix-cache"))
i = 0
while (plan := fed.plan(i)).phase == HEAD:
    w = fed.open(plan); fed.close(plan, w, fed.fleet.work(w.task, plan.selected, w.head)); i += 1
m = next(iter(fed.fleet.learners.values())).model
m.masks.set_mode(FIXED, np.ones(m.d, dtype=bool))
mu, P = gaussian.STATE["means"], gaussian.STATE["precision"]
x = torch.cat([l.inputs for l in fed.fleet.learners.values()]); y = torch.cat([l.labels for l in fed.fleet.learners.values()])
f = features_of(m.net[0], x)
d = f - mu[y]; within = ((d @ P) * d).sum(1)
g = f.mean(0); collapse = (((g - mu) @ P) * (g - mu)).sum(1)
diff = mu[:, None] - mu[None]; pair = torch.einsum("ijk,kl,ijl->ij", diff, P, diff)
print(json.dumps({"within_class_mahalanobis_sq_mean": round(float(within.mean()), 1),
  "features_all_at_their_mean_mahalanobis_sq_to_class_means": [round(float(v), 1) for v in collapse],
  "between_class_means_mahalanobis_sq_min_median_max": [round(float(v), 1) for v in (pair[pair > 0].min(), pair[pair > 0].median(), pair.max())]}))
