"""Diagnostic driver (not part of the product): the devices' mask objective replaced by the FiT-LDA head's own
Gaussian likelihood, which is additive over devices whatever the split.

Under label skew the restricted softmax (a device's own classes only) is not the global objective: no device
is ever asked to keep class A apart from class C when none holds both. The head's class-conditional Gaussian
N(f; mu_y, S) is: sum over devices of sum over their examples of -log N(f(x); mu_y, S) is the same sum as on
one device with all the data. So a device minimises the Mahalanobis distance of its features to their class
mean, (f - mu_y)' S^-1 (f - mu_y) / 2, with the head round's global means and (shrunk) covariance. With
W_c = S^-1 mu_c and b_c = -mu_c' S^-1 mu_c / 2 + log prior_c that is f' S^-1 f / 2 - logit_y + const, so a
device needs S^-1 (or f' S^-1 f) besides the head; this driver takes both from the head round in-process.

    GAUSS=1 python docs/runs/skew-diagnosis-3/gaussian.py ceiling --epochs 2 --theta0 0.99 --test-samples 2000
    GAUSS=1 python docs/runs/skew-diagnosis-3/gaussian.py sim --clients 30 --alpha 0.1 --rho 0.2 ...
    GAUSS=1 CE=0.1 ...   # plus 0.1 x the softmax cross-entropy over the device's own classes (its --loss)

Run from the repository root, with --lda-covariance full. It wraps `deltamask.federation.lda_head` (to keep
the means and the precision) and replaces `deltamask.learn.training._fit` (the loss); the rest is the code as
it is.
"""
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.getcwd())
sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
import deltamask.federation as federation  # noqa: E402
import deltamask.learn.training as training  # noqa: E402

CE = float(os.environ.get("CE", "0"))
GAUSS = float(os.environ.get("GAUSS", "1"))
STATE = {}
_lda_head = federation.lda_head


def lda_head(stats, shrinkage=0.1):
    """The engine's head, and the means and S^-1 behind it kept for the devices' objective."""
    sums = sum(np.asarray(s.sums, np.float64) for s in stats)
    counts = sum(np.asarray(s.counts, np.float64) for s in stats)
    second = sum(np.asarray(s.second, np.float64) for s in stats)
    means = sums / np.maximum(counts, 1)[:, None]
    dof = max(1.0, counts.sum() - np.count_nonzero(counts))
    cov = (second - (means.T * counts) @ means) / dof
    cov = (1 - shrinkage) * cov + shrinkage * np.eye(len(cov)) * np.trace(cov) / len(cov)
    STATE["means"] = torch.from_numpy(means.astype(np.float32))
    STATE["precision"] = torch.from_numpy(np.linalg.inv(cov).astype(np.float32))
    return _lda_head(stats, shrinkage)


def fit(net, optimizer, inputs, labels, local, seed, progress):
    """`local.epochs` of seeded batches; loss = GAUSS x Mahalanobis / 2 per example (+ CE x the device's
    softmax loss)."""
    if training.num_rows(inputs) == 0:
        raise ValueError("a client with no local data cannot train")
    net.eval()
    masked, head = net[0], net[1]
    means, precision = STATE["means"], STATE["precision"]
    order = torch.Generator().manual_seed(seed)
    absent = torch.bincount(labels, minlength=len(means)) == 0
    for _ in range(local.epochs):
        for index in training.batches(training.num_rows(inputs), local.batch_size, order):
            optimizer.zero_grad(set_to_none=True)
            f = masked(training.take(inputs, index))
            y = labels[index]
            diff = f - means[y]
            loss = GAUSS * 0.5 * ((diff @ precision) * diff).sum(1).mean()
            if CE:
                logits = head(f)
                if local.loss == federation.LOCAL_CLASSES:
                    logits = logits.masked_fill(absent, float("-inf"))
                loss = loss + CE * F.cross_entropy(logits, y)
            loss.backward()
            optimizer.step()
            if progress is not None:
                progress(len(index))


federation.lda_head = lda_head
training._fit = fit

if __name__ == "__main__":
    what, sys.argv = sys.argv[1], [sys.argv[0]] + sys.argv[2:]
    if what == "sim":
        from deltamask.learn import sim
        sys.exit(sim.main())
    import mask_ceiling
    sys.exit(mask_ceiling.main())
