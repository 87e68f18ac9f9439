"""Diagnostic driver (not part of the product): devices train their mask on their own examples plus virtual
examples of the classes they do not hold, made from the class means of the masked blocks' inputs.
The product has them since as `local.loss: virtual_classes` (`deltamask-sim --loss virtual_classes`; the
means then come from the head round's statistics, weighted as FiT-LDA's are); this driver made the logs beside it.

Under label skew a device compares its features only among its own classes (the restricted softmax): no device
is asked to keep a class it holds apart from one it does not, and the prunes its two classes agree on cost the
others (docs/results.md). A comparison with an absent class is only safe if that class's examples move with
the mask as real ones would, so they must pass through the masked blocks: here a device shifts each of its
examples x (class y) to x - m_y + m_c for an absent class c drawn at random, where m are per-class means of
the prefix's outputs (the masked blocks' inputs) over the whole federation -- sums and counts a head round could
carry like FiT-LDA's -- and trains on the real and the shifted examples with the softmax over every class.

    VIRTUAL=shift python docs/runs/skew-diagnosis-3/virtual.py sim --clients 30 --alpha 0.1 --rho 0.2 ...
    VIRTUAL=shift VWEIGHT=0.5 ...     # the virtual examples' share of the loss (default 1: as much as the real)
    VIRTUAL=mean ...                  # the class mean itself as the virtual example
    VIRTUAL=rescale ...               # x's spread rescaled to class c's too: m_c + (x - m_y) s_c / s_y, s per position
    REAL=local ...                    # the real examples' softmax over the device's own classes only

A long run resumes with deltamask-sim's `--checkpoint FILE` (the same command, the same VIRTUAL: the checkpoint
records the simulator's configuration, not this driver's variables).

Run from the repository root. It computes the means in-process from every device's cached prefix outputs
(their sum, as a federation would add the devices' shares) and replaces `deltamask.learn.training._fit`.
"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.getcwd())
sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
import deltamask.learn.sim as sim  # noqa: E402
import deltamask.learn.training as training  # noqa: E402

VIRTUAL = os.environ.get("VIRTUAL", "shift")
VWEIGHT = float(os.environ.get("VWEIGHT", "1"))
REAL_LOCAL = os.environ.get("REAL") == "local"
STATE = {}
_init = sim.Federation.__init__


def init(self, *args, **kwargs):
    """The simulator's Federation, and the class means of the masked blocks' inputs over all its devices."""
    _init(self, *args, **kwargs)
    sums, squares, counts = None, None, None
    for learner in self.fleet.learners.values():
        x, y = learner.inputs.double(), learner.labels
        if sums is None:
            sums = torch.zeros((self.agg.num_classes,) + tuple(x.shape[1:]), dtype=torch.float64)
            squares = torch.zeros_like(sums)
            counts = torch.zeros(self.agg.num_classes, dtype=torch.float64)
        sums.index_add_(0, y, x)
        squares.index_add_(0, y, x * x)
        counts += torch.bincount(y, minlength=self.agg.num_classes).double()
    shape = (-1,) + (1,) * (sums.dim() - 1)
    n = counts.clamp(min=2).view(shape)
    STATE["means"] = (sums / n).float()
    STATE["spread"] = ((squares - sums * sums / n) / (n - 1)).clamp(min=0).sqrt().float()  # per class and position


def fit(net, optimizer, inputs, labels, local, seed, progress):
    """`local.epochs` of seeded batches; each batch with as many virtual examples of absent classes."""
    if training.num_rows(inputs) == 0:
        raise ValueError("a client with no local data cannot train")
    net.eval()
    means = STATE["means"]
    num_classes = len(means)
    order = torch.Generator().manual_seed(seed)
    draw = torch.Generator().manual_seed(seed + 1)
    absent = (torch.bincount(labels, minlength=num_classes) == 0).nonzero().flatten()
    for _ in range(local.epochs):
        for index in training.batches(training.num_rows(inputs), local.batch_size, order):
            optimizer.zero_grad(set_to_none=True)
            x, y = training.take(inputs, index), labels[index]
            logits = net(x)
            if len(absent) == 0:
                loss = F.cross_entropy(logits, y)
            else:
                c = absent[torch.randint(len(absent), (len(y),), generator=draw)]
                if VIRTUAL == "mean":
                    v = means[c]
                elif VIRTUAL == "rescale":
                    spread = STATE["spread"]
                    v = means[c] + (x - means[y]) * spread[c] / spread[y].clamp(min=1e-3)
                else:
                    v = x - means[y] + means[c]
                real = logits
                if REAL_LOCAL:
                    present = torch.ones(num_classes, dtype=torch.bool)
                    present[absent] = False
                    real = logits.masked_fill(~present, float("-inf"))
                loss = F.cross_entropy(real, y) + VWEIGHT * F.cross_entropy(net(v), c)
            loss.backward()
            optimizer.step()
            if progress is not None:
                progress(len(index))


sim.Federation.__init__ = init
training._fit = fit

if __name__ == "__main__":
    what, sys.argv = sys.argv[1], [sys.argv[0]] + sys.argv[2:]
    sys.exit(sim.main())
