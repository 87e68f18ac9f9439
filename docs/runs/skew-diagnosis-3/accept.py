"""Diagnostic driver (not part of the product): a mask round's new theta is kept only if the federation's own
training loss says it is better; otherwise the round is undone.

Under label skew what the selected devices agree to prune costs the classes they do not hold, and nobody in the
round can see it. Every device can: the summed cross-entropy of the devices' own examples (softmax over every
class, the frozen head) is the global training loss, additive over devices, two numbers a device. After a round
closes, the candidate theta's mask and the current one are scored that way over all N devices (here in-process
over the whole training subset, which is the same sum); a candidate that raises the loss is dropped, theta and
the Beta counts go back to what they were before the round, and the next round trains from there.

    ACCEPT=mode python docs/runs/skew-diagnosis-3/accept.py sim --clients 30 --alpha 0.1 --rho 0.2 ...
    ACCEPT=expected ...      # score theta * w instead of the mode mask theta >= 1/2
    VIRTUAL=shift ...        # with virtual.py's examples of absent classes in the devices' training

Run from the repository root. It wraps the simulator's Federation (its aggregator's open_mask and close_mask);
the rest is the code as it is. Each row gets "accepted" and the two losses.
"""
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.getcwd())
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import deltamask.learn.sim as sim  # noqa: E402
from deltamask.learn.masking import EXPECTED, FIXED, SAMPLE  # noqa: E402
from deltamask.learn.training import batches  # noqa: E402
from deltamask.sampling import thresholds_to_theta  # noqa: E402

if os.environ.get("VIRTUAL"):
    import virtual  # noqa: E402,F401  (patches the devices' training and Federation.__init__)

ACCEPT = os.environ.get("ACCEPT", "mode")
_init, _close_mask_row = sim.Federation.__init__, sim.Federation._close_mask


@torch.no_grad()
def federated_loss(fed, thresholds) -> float:
    """Sum over the devices of the cross-entropy of their examples under `thresholds` (mean per example)."""
    learners = list(fed.fleet.learners.values())
    m = learners[0].model
    m.set_head(fed.agg.head)
    theta = thresholds_to_theta(thresholds)
    m.masks.set_theta(theta)
    m.masks.set_mode(FIXED, theta >= 0.5) if ACCEPT == "mode" else m.masks.set_mode(EXPECTED)
    total, n = 0.0, 0
    for learner in learners:
        for index in batches(len(learner.labels), 512):
            total += float(F.cross_entropy(m.net(learner.inputs[index]), learner.labels[index], reduction="sum"))
            n += len(index)
    m.masks.set_mode(SAMPLE)
    return total / n


def init(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    agg, open_mask, close_mask = self.agg, self.agg.open_mask, self.agg.close_mask
    self.verdict = {}

    def open_checked(plan):
        self.snapshot = (agg.counts.ones.copy(), agg.counts.masks, agg.thresholds.copy())
        open_mask(plan)

    def close_checked():
        before = self.snapshot[2]
        candidate = close_mask()
        old, new = federated_loss(self, before), federated_loss(self, candidate)
        accepted = new <= old
        self.verdict = {"accepted": accepted, "loss_before": round(old, 5), "loss_candidate": round(new, 5)}
        if not accepted:
            agg.counts.ones[:], agg.counts.masks, agg.thresholds = self.snapshot[0], self.snapshot[1], before
        return agg.thresholds

    agg.open_mask, agg.close_mask = open_checked, close_checked


def close_mask_row(self, plan, work, replies):
    row = _close_mask_row(self, plan, work, replies)
    return {**row, **self.verdict}


sim.Federation.__init__ = init
sim.Federation._close_mask = close_mask_row

if __name__ == "__main__":
    what, sys.argv = sys.argv[1], [sys.argv[0]] + sys.argv[2:]
    sys.exit(sim.main())
