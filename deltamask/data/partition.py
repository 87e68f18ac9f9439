"""Splitting a labelled dataset across clients: Dirichlet label skew, IID, and class coverage.

Partitions are lists of index arrays (int64, sorted), one per client, that cover every sample exactly
once. They are deterministic for a seed under one NumPy version (NumPy does not promise its Generator
streams across versions; nothing here is shared over the wire, unlike the masks of `deltamask.sampling`).
"""
import logging
from typing import List, Optional, Sequence

import numpy as np

from deltamask.errors import DataError

log = logging.getLogger(__name__)


def _check_labels(labels: np.ndarray, num_clients: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise DataError(f"cannot partition {labels.size} labels of shape {labels.shape}: need a non-empty 1-D "
                        f"array")
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
        raise DataError(f"labels must be non-negative integers, got dtype {labels.dtype}")
    if num_clients < 1:
        raise DataError(f"num_clients must be at least 1, got {num_clients}")
    if num_clients > len(labels):
        raise DataError(f"cannot give {num_clients} clients a sample each from only {len(labels)} samples")
    return labels


def iid_partition(labels: np.ndarray, num_clients: int, seed: int = 0) -> List[np.ndarray]:
    """Shuffle all indices and cut them into `num_clients` parts whose sizes differ by at most one."""
    labels = _check_labels(labels, num_clients)
    order = np.random.default_rng(seed).permutation(len(labels))
    return [np.sort(part).astype(np.int64) for part in np.array_split(order, num_clients)]


def dirichlet_partition(labels: np.ndarray, num_clients: int, alpha: float, min_per_client: int = 10,
                        seed: int = 0, balance: bool = True, max_tries: int = 1000) -> List[np.ndarray]:
    """Label-skewed partition by Dirichlet proportions (Li et al. 2021, NIID-Bench; FedLab's "hetero dir").

    One draw, for each class c in turn:
      1. shuffle the indices of class c;
      2. draw proportions p ~ Dir(alpha, ..., alpha) over the clients;
      3. with `balance`, set p_k = 0 for every client that already holds >= N / num_clients samples and
         renormalise (keeps client sizes near N / num_clients; NIID-Bench does this);
      4. cut the shuffled indices at the cumulative proportions, so client k gets about p_k of class c.
    Small alpha gives each client few classes (alpha = 0.1: about 2 of 10), large alpha nearly all.
    The draw is repeated until every client holds at least `min_per_client` samples; after `max_tries`
    draws DataError says that minimum was unreachable. Deterministic for a seed.
    """
    labels = _check_labels(labels, num_clients)
    if not alpha > 0:
        raise DataError(f"alpha must be positive, got {alpha}")
    if min_per_client * num_clients > len(labels):
        raise DataError(f"cannot give {num_clients} clients at least {min_per_client} samples each from "
                        f"{len(labels)} samples")
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    cap = len(labels) / num_clients
    smallest = 0
    for attempt in range(1, max_tries + 1):
        parts: List[List[np.ndarray]] = [[] for _ in range(num_clients)]
        sizes = np.zeros(num_clients, np.int64)
        for idx in by_class:
            idx = rng.permutation(idx)
            p = rng.dirichlet(np.full(num_clients, float(alpha)))
            if balance:
                # some client is always below the mean; its p_k can still underflow to 0 at tiny alpha
                p = p * (sizes < cap) if (p * (sizes < cap)).sum() > 0 else (sizes < cap).astype(float)
            p = p / p.sum()
            cuts = (np.cumsum(p) * len(idx)).astype(np.int64)[:-1]
            for k, piece in enumerate(np.split(idx, cuts)):
                parts[k].append(piece)
                sizes[k] += len(piece)
        smallest = int(sizes.min())
        if smallest >= min_per_client:
            log.debug("Dir(%s) partition over %d clients after %d draws", alpha, num_clients, attempt)
            return [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
    raise DataError(f"min_per_client = {min_per_client} unreachable: in {max_tries} draws of Dir({alpha}) over "
                    f"{num_clients} clients the smallest client last held {smallest} samples; lower "
                    f"min_per_client, raise alpha or use fewer clients")


EFFECTIVE, PRESENT = "effective", "present"


def seeded_subset(n: int, samples: int, seed: int) -> np.ndarray:
    """Indices (sorted) of a seeded subset of `samples` of n examples; all of them when samples is 0 or >= n."""
    if samples <= 0 or samples >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:samples])


def device_share(labels: np.ndarray, samples: int = 0, clients: int = 1, index: int = 0, alpha: float = 10.0,
                 min_per_client: int = 10, seed: int = 0) -> np.ndarray:
    """Indices into `labels` that device `index` of `clients` holds: a seeded subset of `samples` examples
    (0: all), then part `index` of a Dir(alpha) split (same seed everywhere: the parts never overlap).
    The simulator and a demo fleet's agents both take their data from here."""
    if not 0 <= index < clients:
        raise DataError(f"device index {index} is not one of 0..{clients - 1}")
    subset = seeded_subset(len(labels), samples, seed)
    if clients == 1:
        return subset
    return subset[dirichlet_partition(np.asarray(labels)[subset], clients, alpha, min_per_client, seed=seed)[index]]


def class_coverage(labels: np.ndarray, parts: Sequence[np.ndarray], num_classes: Optional[int] = None,
                   measure: str = EFFECTIVE) -> float:
    """C_p: the mean over clients of the fraction of the classes a client holds, in [0, 1].

    measure "effective" (default) counts a client's classes as exp(entropy of its label distribution), the
    effective number of classes; "present" counts every class with at least one sample. Only "effective"
    reproduces the paper's C_p ~ 1.0 at Dir(10) and ~ 0.2 at Dir(0.1): measured here on 60,000 labels of 10
    classes, and on 50,000 of 100, with 10 or 30 clients, it gives 0.94 and 0.17-0.25, while "present" gives
    0.98 and 0.36-0.53 (at alpha = 0.1 most classes leave a few stray samples on most clients).
    num_classes defaults to the number of distinct labels. An empty client counts as 0.
    """
    if measure not in (EFFECTIVE, PRESENT):
        raise ValueError(f"measure must be {EFFECTIVE!r} or {PRESENT!r}, got {measure!r}")
    labels = np.asarray(labels)
    if not len(parts):
        raise DataError("class_coverage needs at least one client")
    total = int(num_classes) if num_classes is not None else len(np.unique(labels))
    if total < 1:
        raise DataError("class_coverage needs at least one class")
    fractions = []
    for part in parts:
        counts = np.bincount(labels[np.asarray(part, np.int64)], minlength=total)
        counts = counts[counts > 0]
        if not len(counts):
            fractions.append(0.0)
        elif measure == PRESENT:
            fractions.append(len(counts) / total)
        else:
            share = counts / counts.sum()
            fractions.append(float(np.exp(-(share * np.log(share)).sum())) / total)
    return float(np.mean(fractions))
