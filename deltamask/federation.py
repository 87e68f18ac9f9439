"""The federation's rules, once: whom to ask and what to send (the round plan), and how to combine the
replies (the aggregator). Arrays in, arrays out: no torch, no gRPC, no files, no clock.

    plan = plan_round(policy, index, heads_done, masks_done, eligible_names)   # who, seeds, kappa, reset
    agg = Aggregator(policy, d, num_classes, feature_dim)
    head phase:  agg.close_head({name: (decode_share(...), examples)})        -> the frozen head
    mask phase:  agg.open_mask(plan); agg.counts.add_packed(rebuilt) ...; agg.close_mask() -> thresholds

The simulator (`deltamask.learn.sim`), the coordinator (`server.coordinator`) and the agent (through
`deltamask.learn.learner`) all take their rounds from here; what differs between them is only transport,
persistence and time. Devices are keyed by a stable name (the enrolled name), never by a random id, so
the same federation seed selects the same devices and draws the same masks everywhere.
"""
import dataclasses
import hashlib
import math
from dataclasses import dataclass, field
from typing import Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from deltamask.aggregation import MEAN, MODE, BetaCounts, reset_due
from deltamask.codecs import CODECS, WEIGHTS
from deltamask.delta import cosine_kappa
from deltamask.rounds import RANKINGS
from deltamask.headwire import (LDA_COVARIANCES, MAX_HEAD_ABS, MAX_HEAD_MESSAGE, LdaStats, class_block_nbytes,
                                decode_head, decode_lda_stats, head_nbytes, lda_stats_nbytes, lda_width)
from deltamask.sampling import PER_CLIENT, SHARED, round_seed, theta_to_thresholds
from deltamask.thetawire import encode_theta

HEAD, MASK, REFIT = "head", "mask", "refit"  # REFIT: the head fitted again on the final network
LINEAR_PROBE, LDA, KAIMING = "linear_probe", "lda", "kaiming"
HEADS = (LINEAR_PROBE, LDA, KAIMING)
SAMPLE, THRESHOLD = "sample", "threshold"
MASK_RULES = (SAMPLE, THRESHOLD)
CROSS_ENTROPY, LOCAL_CLASSES, VIRTUAL_CLASSES, AUTO = "cross_entropy", "local_classes", "virtual_classes", "auto"
LOSSES = (CROSS_ENTROPY, LOCAL_CLASSES, VIRTUAL_CLASSES, AUTO)
LAST, BEST = "last", "best"
KEEPS = (LAST, BEST)
# the held-out reading a round is kept by: what `deltamask-server export` bakes by default after it (the head
# alone after a head round, the expected mask theta * w after a mask round)
KEPT_BY = {HEAD: "accuracy", MASK: "accuracy_expected", REFIT: "accuracy_expected"}
# (weight (classes x features), bias (classes)), float32; with virtual_classes a third element, the anchors:
# the federation's per-class means of the masked blocks' inputs (classes x P, NaN rows for classes nobody holds)
Head = Tuple[np.ndarray, ...]


@dataclass(frozen=True)
class LocalTraining:
    """What a selected device runs (paper C.1 for the mask: 1 epoch, batch 64, Adam, lr 0.1; ten epochs here,
    docs/results.md "The deployed defaults under label skew": what lifts the rounds above the head under Dir(0.1))."""

    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.1
    # local_classes: softmax over the classes the device holds (label skew); cross_entropy: over every class;
    # virtual_classes: every class, with a virtual example of a class the device lacks for each real one
    # (x - m_y + m_c, m the head round's class means of the masked blocks' inputs; needs head: lda);
    # auto: virtual_classes where it can run (head lda, a mask codec, an image backbone), else local_classes
    loss: str = AUTO
    head_epochs: int = 20  # linear probing: local epochs a head round
    head_lr: float = 1e-3
    weight_lr: float = 1e-4  # the fine-tuning baselines (codec float32 / eden): Adam on the masked layers' weights

    def check(self) -> None:
        for key in ("epochs", "batch_size", "head_epochs"):
            if getattr(self, key) < 1:
                raise ValueError(f"local.{key} must be at least 1, got {getattr(self, key)}")
        for key in ("lr", "head_lr", "weight_lr"):
            if getattr(self, key) <= 0:
                raise ValueError(f"local.{key} must be positive, got {getattr(self, key)}")
        if self.loss not in LOSSES:
            raise ValueError(f"local.loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")


@dataclass(frozen=True)
class Policy:
    """The round policy: one set of keys and defaults for the simulator and the coordinator (whose
    configurations extend it), so that the same settings run the same federation in both."""

    rounds: int = 20  # mask rounds, after the head phase
    rho: float = 1.0  # fraction of the eligible devices asked each mask round
    min_quorum: int = 1  # replies a round needs at its deadline; also the least K
    head: str = LDA  # linear_probe | lda | kaiming (docs/results.md: the head phase)
    head_rounds: int = 1  # linear probing: FedAvg rounds (lda needs one, kaiming none)
    head_rho: float = 1.0  # fraction of the eligible devices asked each head round
    # LDA second moments sent: full | diag | projected (docs/results.md, "Label skew": full scores 0.856 under
    # Dir(0.1) against the rank-256 projection's 0.817, at 8.1 bits a masked parameter once against 0.37)
    lda_covariance: str = "full"
    lda_rank: int = 256  # projected: the rank of the seeded projection (at most the feature size)
    lda_shrinkage: float = 0.01  # LDA: covariance shrunk towards its mean variance
    # docs/results.md: exact-cond sends exact's positions in 0.57x its bits (the same rounds, byte for byte);
    # BFuse8's false flips keep theta undecided (bfuse8, bfuse8-cond, exact, ... on request)
    codec: str = "exact-cond"
    kappa_start: float = 0.8
    kappa_end: float = 1.0
    ranking: str = "kl"  # how the delta is ordered before the top-kappa cut: kl (the paper) | random
    # the mask a device uploads and the server scores: a Bernoulli sample of theta (DeltaMask, FedPM), or
    # theta >= tau (FedMask's deterministic threshold; with codec bitmask, its 1 bpp upload)
    mask_rule: str = "sample"
    tau: float = 0.5
    reference: str = PER_CLIENT
    theta_formula: str = MODE
    # docs/results.md: with ten epochs of virtual examples and the refit, 0.99 ends above 0.999 under label skew
    theta0: float = 0.99
    lambda0: float = 1.0
    seed: int = 0
    # the model the federation leaves behind: the round that scored best on held-out data so far, the head
    # alone included (`keep_round`; the last round when nothing is scored), or the last round's
    keep: str = BEST
    # after the last mask round, one more head round of every device (head_rho) on the final network (the
    # expected mask theta * w, or the fine-tuned weights): the head fitted to the features the masks learned
    # (docs/results.md, "A head that moves with the features"); lda and linear_probe (a Kaiming head has none)
    refit: bool = True
    local: LocalTraining = field(default_factory=LocalTraining)

    def check(self) -> None:
        if self.codec not in CODECS:
            raise ValueError(f"codec {self.codec!r} is not one of {', '.join(CODECS)}")
        if self.mask_rule not in MASK_RULES:
            raise ValueError(f"mask_rule must be one of {', '.join(MASK_RULES)}, got {self.mask_rule!r}")
        if not 0 <= self.tau <= 1:
            raise ValueError(f"tau must lie in [0, 1], got {self.tau}")
        if self.ranking not in RANKINGS:
            raise ValueError(f"ranking must be one of {', '.join(RANKINGS)}, got {self.ranking!r}")
        if self.reference not in (PER_CLIENT, SHARED):
            raise ValueError(f"reference must be {PER_CLIENT!r} or {SHARED!r}, got {self.reference!r}")
        if self.keep not in KEEPS:
            raise ValueError(f"keep must be {LAST!r} or {BEST!r}, got {self.keep!r}")
        if self.theta_formula not in (MODE, MEAN):
            raise ValueError(f"theta_formula must be {MODE!r} or {MEAN!r}, got {self.theta_formula!r}")
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, got {self.head!r}")
        if self.lda_covariance not in LDA_COVARIANCES:
            raise ValueError(f"lda_covariance must be one of {', '.join(LDA_COVARIANCES)}, "
                             f"got {self.lda_covariance!r}")
        if self.lda_covariance == "projected" and self.lda_rank < 1:
            raise ValueError(f"lda_rank must be at least 1, got {self.lda_rank}")
        if not 0 <= self.lda_shrinkage <= 1:
            raise ValueError(f"lda_shrinkage must lie in [0, 1], got {self.lda_shrinkage}")
        for key in ("rho", "head_rho"):
            if not 0 < getattr(self, key) <= 1:
                raise ValueError(f"{key} must lie in (0, 1], got {getattr(self, key)}")
        if not 0 < self.theta0 < 1:
            raise ValueError(f"theta0 must lie in (0, 1), got {self.theta0}")
        for key in ("min_quorum", "head_rounds"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be at least 1, got {getattr(self, key)}")
        if self.rounds < 0 or (self.rounds == 0 and self.head != LINEAR_PROBE):
            raise ValueError(f"rounds must be at least 1 (0 only for linear probing alone), got {self.rounds}")
        if self.lambda0 <= 0:
            raise ValueError(f"lambda0 must be positive, got {self.lambda0}")
        self.local.check()
        if self.local.loss == VIRTUAL_CLASSES and self.head != LDA:
            raise ValueError("local.loss virtual_classes needs head: lda (its head round gathers the class means)")
        if self.local.loss == VIRTUAL_CLASSES and CODECS[self.codec].carries == WEIGHTS:
            raise ValueError(f"local.loss virtual_classes trains masks; codec {self.codec} fine-tunes weights")

    @property
    def head_phase_rounds(self) -> int:
        """Head rounds before the mask rounds: none for a seeded Kaiming head, one for LDA (its sums are
        exact in one round), `head_rounds` for linear probing."""
        return {KAIMING: 0, LDA: 1}.get(self.head, self.head_rounds)

    @property
    def refits(self) -> int:
        """Head rounds after the mask rounds: one with `refit` (not for a Kaiming head, nor without mask rounds)."""
        return int(self.refit and self.head != KAIMING and self.rounds > 0)

    def finished(self, heads_done: int, masks_done: int) -> bool:
        """Whether a federation that closed these rounds is over (head rounds count the refit)."""
        return masks_done >= self.rounds and heads_done >= self.head_phase_rounds + self.refits


def resolved(policy: Policy, input_dim: int, num_classes: int, feature_dim: int) -> Policy:
    """The policy with `local.loss: auto` made concrete for a model (`input_dim`: numbers in one example of the
    masked blocks' inputs, 0 for a text backbone): virtual_classes where it can run (head lda, a codec that
    trains masks, an image backbone, anchors that fit a task's head message), else local_classes."""
    if policy.local.loss != AUTO:
        return policy
    fits = head_nbytes(num_classes, feature_dim) + class_block_nbytes(num_classes, input_dim, True) <= MAX_HEAD_MESSAGE
    can = policy.head == LDA and CODECS[policy.codec].carries != WEIGHTS and input_dim > 0 and fits
    return dataclasses.replace(policy, local=dataclasses.replace(policy.local,
                                                                 loss=VIRTUAL_CLASSES if can else LOCAL_CLASSES))


def clients_per_round(rho: float, eligible: int, min_quorum: int = 1) -> int:
    """K: round(rho * eligible), at least min_quorum, at most the eligible devices."""
    return min(eligible, max(min_quorum, int(round(rho * eligible))))


def derived_seed(tag: str, seed: int, key: str = "") -> int:
    """A 63-bit seed for one purpose (`tag`) of one round or device: the first 8 bytes of
    SHA-256("deltamask/<tag>/v1|seed|key"), top bit cleared (torch and NumPy take it as it is)."""
    digest = hashlib.sha256(f"deltamask/{tag}/v1|{int(seed)}|{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass(frozen=True)
class RoundPlan:
    """One round as the policy decides it: what every party derives from (federation seed, round index,
    progress so far, eligible names)."""

    index: int  # the round's number: head rounds first, skipped rounds count too
    phase: str  # HEAD, MASK or REFIT
    seed: int  # the round's public seed (reference masks, own samples)
    selected: Tuple[str, ...]  # device names, sorted
    eligible: int
    kappa: float = 0.0  # MASK: fraction of the KL-ranked delta sent
    reset: bool = False  # MASK: the Beta counts go back to the prior before this round's masks
    mask_round: int = 0  # mask rounds closed before this one
    head_round: int = 0  # head rounds closed before this one

    @property
    def eval_seed(self) -> int:
        return eval_seed(self.seed)


@dataclass(frozen=True)
class DeviceTask:
    """What a selected device is told (the gRPC Task carries the same fields)."""

    phase: str
    round: int
    seed: int  # the round's public seed
    kappa: float = 0.0
    codec: str = "bfuse8"
    reference: str = PER_CLIENT
    head: str = LDA
    lda_covariance: str = "projected"
    lda_rank: int = 256
    local: LocalTraining = field(default_factory=LocalTraining)
    ranking: str = "kl"
    mask_rule: str = SAMPLE
    tau: float = 0.5


def device_task(policy: Policy, plan: RoundPlan) -> DeviceTask:
    return DeviceTask(plan.phase, plan.index, plan.seed, plan.kappa, policy.codec, policy.reference, policy.head,
                      policy.lda_covariance, policy.lda_rank, policy.local, policy.ranking, policy.mask_rule,
                      policy.tau)


def eval_seed(round_seed: int) -> int:
    """The seed of the mask sampled from theta to score it on held-out data after a round."""
    return derived_seed("eval", round_seed)


def train_seed(round_seed: int, name: str) -> int:
    """The seed of a device's local training in a round (batch order, per-batch masks, head init)."""
    return derived_seed("train", round_seed, name)


def plan_round(policy: Policy, index: int, heads_done: int, masks_done: int,
               eligible: Sequence[str]) -> Optional[RoundPlan]:
    """Round `index`, after `heads_done` head rounds (the refit counts as one) and `masks_done` mask rounds
    closed; None when the federation is over. K devices are drawn with the round's seed from the eligible
    names in sorted order."""
    if policy.finished(heads_done, masks_done):
        return None
    phase = HEAD if heads_done < policy.head_phase_rounds else MASK if masks_done < policy.rounds else REFIT
    names = sorted(set(eligible))
    k = clients_per_round(policy.rho if phase == MASK else policy.head_rho, len(names), policy.min_quorum)
    seed = round_seed(policy.seed, index)
    chosen = np.random.default_rng(seed).choice(len(names), size=k, replace=False) if k else []
    selected = tuple(sorted(names[i] for i in chosen))
    if phase != MASK:
        return RoundPlan(index, phase, seed, selected, len(names), head_round=heads_done, mask_round=masks_done)
    kappa = cosine_kappa(masks_done, policy.rounds, policy.kappa_start, policy.kappa_end)
    return RoundPlan(index, MASK, seed, selected, len(names), kappa, reset_due(masks_done, policy.rho),
                     masks_done, heads_done)


@dataclass(frozen=True)
class Kept:
    """The round whose model the federation leaves behind, and its held-out score (None: not scored)."""

    round: int
    phase: str
    score: Optional[float] = None


def keep_round(policy: Policy, kept: Optional[Kept], index: int, phase: str, score: Optional[float]) -> Kept:
    """What the federation keeps once round `index` closed with held-out `score` (its `KEPT_BY` reading; None
    when nobody scores): with keep: best the round that scored highest so far (the earlier on a tie), so that
    rounds which lose accuracy, as mask rounds on a strong head under label skew do (docs/results.md), never
    replace a better model (a round left unscored, by a crash before its scoring, replaces no scored one); with
    keep: last, or while nothing has been scored, the latest round."""
    if policy.keep == LAST or kept is None or kept.score is None or (score is not None and score > kept.score):
        return Kept(int(index), phase, None if score is None else float(score))
    return kept


def kept_of(policy: Policy, summaries: Iterable[Mapping]) -> Optional[Kept]:
    """`keep_round` over round summaries in order (round, phase, the `KEPT_BY` score; a skipped round, state
    "skipped", is no candidate): what a coordinator restarting, or exporting, finds kept."""
    kept = None
    for row in summaries:
        if row.get("state", "closed") == "closed":
            kept = keep_round(policy, kept, row["round"], row["phase"], row.get(KEPT_BY[row["phase"]]))
    return kept


class Aggregator:
    """How the replies combine: the head phase, the Beta counts, theta and its wire message."""

    def __init__(self, policy: Policy, d: int, num_classes: int, feature_dim: int, input_dim: int = 0) -> None:
        """`input_dim`: numbers in one example of the masked blocks' inputs (needed by virtual_classes)."""
        self.policy, self.d, self.num_classes, self.feature_dim = policy, int(d), num_classes, feature_dim
        self.input_dim = int(input_dim) if policy.local.loss == VIRTUAL_CLASSES else 0
        if policy.local.loss == VIRTUAL_CLASSES and self.input_dim < 1:
            raise ValueError("local.loss virtual_classes needs the size of the masked blocks' inputs (an image "
                             "backbone)")
        down = head_nbytes(num_classes, feature_dim) + class_block_nbytes(num_classes, self.input_dim, True)
        if self.input_dim and down > MAX_HEAD_MESSAGE:
            raise ValueError(f"local.loss virtual_classes: the head with its class anchors ({num_classes} classes x "
                             f"{self.input_dim} inputs) would be {down} bytes, more than the {MAX_HEAD_MESSAGE} a "
                             f"task carries; mask fewer blocks or use local_classes")
        self.counts = BetaCounts(self.d, policy.lambda0)
        self.thresholds = theta_to_thresholds(np.full(self.d, policy.theta0))
        self.head: Optional[Head] = kaiming_head(feature_dim, num_classes, policy.seed) \
            if policy.head == KAIMING else None
        self._offset: Optional[np.ndarray] = None

    # --- head phase ---------------------------------------------------------------------------------
    def decode_share(self, payload: bytes, phase: str = HEAD):
        """A device's head-round reply, checked: a linear head, or LDA statistics (PayloadError if bad); in the
        refit round (`phase` REFIT) without the class sums of the masked blocks' inputs (the anchors stay)."""
        p = self.policy
        if p.head == LDA:
            return decode_lda_stats(payload, self.num_classes, self.feature_dim, p.lda_covariance, p.lda_rank,
                                    0 if phase == REFIT else self.input_dim)
        return decode_head(payload, self.num_classes, self.feature_dim, MAX_HEAD_ABS)

    def close_head(self, shares: Mapping[str, Tuple[object, float]], round_seed: int, phase: str = HEAD) -> Head:
        """Combine {name: (share, examples)} in name order: FedAvg of linear heads weighted by examples,
        or the LDA head from the summed statistics (`round_seed`: the head round's, for the projection). The
        refit round (`phase` REFIT) replaces W and b and keeps the head round's class anchors."""
        ordered = [shares[name] for name in sorted(shares)]
        p = self.policy
        weights = bounded_weights([n for _, n in ordered])
        anchors = tuple(self.head[2:]) if phase == REFIT and self.head is not None else ()
        if p.head == LDA:
            stats = [scale_stats(s, w / max(float(s.counts.sum()), 1.0)) for (s, _), w in zip(ordered, weights)]
            weight, bias = lda_head(stats, p.lda_shrinkage)
            if p.lda_covariance == "projected":  # a head over P'x is the head W P' over x
                rank = lda_width(self.feature_dim, p.lda_covariance, p.lda_rank)
                weight = (weight.astype(np.float64) @ lda_projection(self.feature_dim, rank, round_seed).T)
            if self.input_dim and phase != REFIT:
                anchors = (class_anchors(stats),)
            self.head = (weight.astype(np.float32), bias) + anchors
        else:
            self.head = average_heads([s for s, _ in ordered], weights) + anchors
        return self.head

    # --- mask phase ---------------------------------------------------------------------------------
    def open_mask(self, plan: RoundPlan) -> None:
        if plan.reset:
            self.counts.reset()

    def close_mask(self) -> np.ndarray:
        """theta (wire thresholds) from the counts; it becomes the next round's global theta."""
        self.thresholds = self.counts.thresholds(self.policy.theta_formula, previous=self.thresholds)
        return self.thresholds

    def theta_wire(self) -> bytes:
        return encode_theta(self.thresholds)

    # --- the fine-tuning baselines (codec float32 / eden): FedAvg of dense weight updates ----------------
    @property
    def offset(self) -> np.ndarray:
        """w_g - w_pretrained of the d masked weights (float32; zeros until a weight round closes)."""
        if self._offset is None:
            self._offset = np.zeros(self.d, dtype=np.float32)
        return self._offset

    def close_weights(self, updates: Mapping[str, Tuple[np.ndarray, float]]) -> np.ndarray:
        """FedAvg of {name: (w_k - w_g, examples)} (bounded weights, name order, float64 sums) onto the offset."""
        ordered = [updates[name] for name in sorted(updates)]
        weights = np.asarray(bounded_weights([n for _, n in ordered]))
        if weights.sum() <= 0:
            raise ValueError("weight updates of no examples")
        total = np.zeros(self.d, dtype=np.float64)
        for (update, _), w in zip(ordered, weights / weights.sum()):
            total += w * np.asarray(update, np.float64)
        self._offset = (self.offset + total).astype(np.float32)
        return self._offset


INFLUENCE_CAP = 4.0  # no device weighs more than this many times the round's median device


def bounded_weights(examples: Sequence[float], cap: float = INFLUENCE_CAP) -> List[float]:
    """Each device's weight in a head round: its example count (what it declares, for a linear head; what
    its LDA statistics count), at most `cap` times the median of the round. A device that declares 10^9
    examples weighs as much as `cap` ordinary ones, not the whole federation; honest devices within `cap`
    of the median keep FedAvg's weights exactly."""
    counts = np.maximum(np.asarray(examples, dtype=np.float64), 0.0)
    if len(counts) == 0:
        return []
    limit = cap * float(np.median(counts))
    return [float(min(n, limit)) for n in counts]


def scale_stats(stats: LdaStats, factor: float) -> LdaStats:
    """LDA statistics weighted by `factor` (<= 1 shrinks a device's say; its means stay the same)."""
    if factor >= 1.0:
        return stats
    inputs = None if stats.inputs is None else stats.inputs * factor
    return LdaStats(stats.sums * factor, stats.counts * factor, stats.second * factor, inputs)


def average_heads(heads: Sequence[Head], weights: Sequence[float]) -> Head:
    """FedAvg of linear heads, weighted by (say) local examples; float64 sums, float32 result."""
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("head weights must add up to a positive number")
    weight = sum(np.asarray(w, np.float64) * (n / total) for (w, _), n in zip(heads, weights))
    bias = sum(np.asarray(b, np.float64) * (n / total) for (_, b), n in zip(heads, weights))
    return weight.astype(np.float32), bias.astype(np.float32)


def class_anchors(stats: Sequence[LdaStats]) -> np.ndarray:
    """The federation's per-class means of the masked blocks' inputs from the devices' summed class sums
    (float32, classes x P; a row of NaN for a class no device holds)."""
    sums = sum(np.asarray(s.inputs, np.float64) for s in stats)
    counts = sum(np.asarray(s.counts, np.float64) for s in stats)
    means = sums / np.maximum(counts, 1e-12)[:, None]
    means[counts <= 0] = np.nan
    return means.astype(np.float32)


def lda_head(stats: Sequence[LdaStats], shrinkage: float = 0.1) -> Head:
    """FiT-LDA (a Gaussian head with one shared covariance) from devices' summed statistics: per-class
    feature sums and counts, and the second moments (full, or their diagonal). Summing first makes the
    result independent of how the data are split. W_c = S^-1 mu_c, b_c = -mu_c' S^-1 mu_c / 2 + log prior_c,
    S shrunk towards its mean variance."""
    sums = sum(np.asarray(s.sums, np.float64) for s in stats)
    counts = sum(np.asarray(s.counts, np.float64) for s in stats)
    second = sum(np.asarray(s.second, np.float64) for s in stats)
    n = counts.sum()
    if n <= 0:
        raise ValueError("LDA statistics of no examples")
    means = sums / np.maximum(counts, 1)[:, None]
    dof = max(1.0, n - np.count_nonzero(counts))
    if second.ndim == 1:  # diagonal: per-feature sums of squares
        var = (second - (counts[:, None] * means ** 2).sum(0)) / dof
        var = (1 - shrinkage) * var + shrinkage * var.mean()
        precision_means = means / np.maximum(var, 1e-12)
    else:
        cov = (second - (means.T * counts) @ means) / dof
        cov = (1 - shrinkage) * cov + shrinkage * np.eye(len(cov)) * np.trace(cov) / len(cov)
        precision_means = np.linalg.solve(cov, means.T).T
    prior = np.log(np.maximum(counts / n, 1e-12))
    bias = -0.5 * (precision_means * means).sum(1) + prior
    return precision_means.astype(np.float32), bias.astype(np.float32)


def lda_projection(feature_dim: int, rank: int, round_seed: int) -> np.ndarray:
    """P (features x rank, float64): the seeded Gaussian projection every party of a head round draws for
    projected LDA, entries N(0, 1/rank)."""
    rng = np.random.default_rng(derived_seed("lda-projection", round_seed))
    return rng.standard_normal((feature_dim, rank)) / np.sqrt(rank)


def kaiming_head(feature_dim: int, num_classes: int, seed: int = 0) -> Head:
    """A frozen random head every party derives from the federation seed: weights uniform in
    +-1/sqrt(features) (Kaiming uniform with a = sqrt(5), torch's nn.Linear default), zero bias."""
    bound = 1.0 / math.sqrt(feature_dim)
    rng = np.random.default_rng(derived_seed("kaiming-head", seed))
    weight = rng.uniform(-bound, bound, size=(num_classes, feature_dim)).astype(np.float32)
    return weight, np.zeros(num_classes, dtype=np.float32)


def head_bits(policy: Policy, num_classes: int, feature_dim: int, input_dim: int = 0, phase: str = HEAD) -> int:
    """Bits one device uploads in a head round (`input_dim`: with virtual_classes, its class sums too, which
    the refit round does not send again)."""
    if policy.head == LDA:
        extra = class_block_nbytes(num_classes, input_dim) if policy.local.loss == VIRTUAL_CLASSES and phase == HEAD \
            else 0
        return 8 * (lda_stats_nbytes(num_classes, feature_dim, policy.lda_covariance, policy.lda_rank) + extra)
    return 0 if policy.head == KAIMING else 8 * head_nbytes(num_classes, feature_dim)


__all__ = ["AUTO", "Aggregator", "BEST", "CROSS_ENTROPY", "HEAD", "HEADS", "Head", "KAIMING", "KEEPS", "KEPT_BY", "Kept",
           "LAST", "LDA", "LINEAR_PROBE",
           "LOCAL_CLASSES", "LOSSES", "LocalTraining", "MASK", "MASK_RULES", "REFIT", "SAMPLE", "THRESHOLD", "VIRTUAL_CLASSES",
           "DeviceTask", "Policy", "RoundPlan", "average_heads", "bounded_weights", "class_anchors",
           "clients_per_round", "derived_seed", "device_task", "eval_seed", "head_bits", "kaiming_head",
           "keep_round", "kept_of", "lda_head",
           "lda_projection", "plan_round", "resolved",
           "scale_stats", "train_seed"]
