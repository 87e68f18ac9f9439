"""Diagnostic driver (not part of the product): the simulator or the mask ceiling with the mask scores'
optimizer set from the environment (Adam's epsilon EPS, or OPT=sgd with momentum MOM at --lr), and
optionally the score gradients' quantiles printed.

    EPS=1e-4 python docs/runs/skew-diagnosis-2/adam_eps.py ceiling --epochs 4 --theta0 0.99 --test-samples 2000
    OPT=sgd MOM=0.9 python docs/runs/skew-diagnosis-2/adam_eps.py ceiling --lr 300 --epochs 3 ...
    EPS=1e-4 python docs/runs/skew-diagnosis-2/adam_eps.py sim --clients 30 --alpha 0.1 --rho 0.2 ...
    PROBE=1 python docs/runs/skew-diagnosis-2/adam_eps.py ceiling --epochs 1 ...   # |grad| quantiles, steps 0 and 50

Run from the repository root. It replaces `deltamask.learn.training._adam` (the scores' optimizer) before the
run starts; everything else is the code as it is.
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.getcwd())
sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
import deltamask.learn.training as training  # noqa: E402

EPS, PROBE = float(os.environ.get("EPS", "1e-8")), os.environ.get("PROBE") == "1"
OPT, MOM = os.environ.get("OPT", "adam"), float(os.environ.get("MOM", "0.9"))


class Probe:
    """Adam that prints the quantiles of |gradient| over the scores at its first and 51st step."""

    def __init__(self, optimizer):
        self.optimizer, self.steps = optimizer, 0

    def zero_grad(self, **kwargs):
        self.optimizer.zero_grad(**kwargs)

    def step(self):
        if self.steps in (0, 50):
            grads = torch.cat([p.grad.abs().flatten() for g in self.optimizer.param_groups for p in g["params"]
                               if p.grad is not None])
            sample = grads[torch.randint(len(grads), (200_000,))]
            q = torch.quantile(sample, torch.tensor([0.5, 0.9, 0.99, 0.999])).tolist()
            print(json.dumps({"step": self.steps, "grad_quantiles_50_90_99_999": q}), flush=True)
        self.steps += 1
        self.optimizer.step()


def adam(params, lr):
    if OPT == "sgd":
        optimizer = torch.optim.SGD(list(params), lr=lr, momentum=MOM)
    else:
        optimizer = torch.optim.Adam(list(params), lr=lr, eps=EPS)
    return Probe(optimizer) if PROBE else optimizer


training._adam = adam

if __name__ == "__main__":
    what, sys.argv = sys.argv[1], [sys.argv[0]] + sys.argv[2:]
    if what == "sim":
        from deltamask.learn import sim
        sys.exit(sim.main())
    import mask_ceiling
    sys.exit(mask_ceiling.main())
