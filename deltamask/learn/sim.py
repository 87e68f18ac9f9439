"""deltamask-sim: the federation in one process, run by the same round policy, aggregator and local learner
as the coordinator and its agents (`deltamask.federation`, `deltamask.learn.learner`).

    deltamask-sim --rounds 20 --clients 10 --codec bfuse8            # one JSON line a round on stdout
    deltamask-sim --rounds 60 ... --checkpoint run.npz >> run.jsonl  # stopped or killed: the same command resumes

A loop over the rounds the policy plans: a head round asks devices for their head share (a linear probe,
or FiT-LDA statistics) and the aggregator combines them into the frozen head; a mask round sends the
global theta (as wire bytes) to the selected devices, each trains and encodes its delta, and the server
side rebuilds every mask (digest checked) into the Beta counts -> theta. Devices are named
`client-000` .. and hold the parts of one Dirichlet split, as a demo fleet's agents do.
"""
import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from deltamask.codecs import MASK as CARRIES_MASK
from deltamask.codecs import WEIGHTS
from deltamask.codecs import decode as decode_payload
from deltamask.codecs import get_codec
from deltamask.codecs.conditional import undecided
from deltamask.errors import CheckpointError, DataError, DeltaMaskError
from deltamask.federation import (HEAD, KEPT_BY, MASK, REFIT, THRESHOLD, VIRTUAL_CLASSES, Aggregator, Kept,
                                  LocalTraining, Policy, device_task, head_bits, keep_round, plan_round, resolved)
from deltamask.headwire import encode_head
from deltamask.learn.masking import IDENTITY
from deltamask.shards import RoundContext, Serial, aggregate
from deltamask.thetawire import decode_theta

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SimConfig(Policy):
    """The round policy (`deltamask.federation.Policy`, shared with the coordinator) plus the simulated
    fleet: backbone, data and how it is split."""

    backbone: str = "mobilenet_v2"
    weights: Optional[str] = "default"
    blocks: int = 5
    image_size: int = 64
    dataset: str = "fashion_mnist"
    data_root: Optional[str] = None
    train_samples: int = 6000  # a training subset, split over the clients
    test_samples: int = 2000
    # validation images: training images outside the federation's subset, scored every round as val_<key>;
    # keep: best chooses by them (never by the test images), so kept_accuracy is a test score of a choice
    # made elsewhere. 0: none (the last round is kept)
    val_samples: int = 0
    clients: int = 10
    alpha: float = 10.0  # Dirichlet concentration over classes (10: IID-like, 0.1: non-IID)
    min_per_client: int = 10
    estimator: str = IDENTITY
    cache_dir: Optional[str] = None  # prefix outputs kept here between runs (as an agent keeps them)
    prefix_runtime: str = "auto"  # auto | onnxruntime | torch, as the agents' (deltamask.learn.onnx_prefix)

    def names(self) -> List[str]:
        return [client_name(k) for k in range(self.clients)]


def client_name(k: int) -> str:
    return f"client-{k:03d}"


def build(c: SimConfig, held_out: bool = True, devices=True):
    """The simulated fleet's parts: the model, every device's learner over its Dirichlet share (prefix outputs
    computed, or read from `cache_dir`; `devices`: True for all, False for none, or the names of some), the
    held-out evaluator, the number of classes."""
    from deltamask.data import device_share, load_dataset, seeded_subset
    from deltamask.learn.learner import Evaluator, LocalLearner, Model

    train, test = load_dataset(c.dataset, "train", c.data_root), load_dataset(c.dataset, "test", c.data_root)
    num_classes = int(max(train.labels.max(), test.labels.max())) + 1
    model = Model(c.backbone, c.weights, c.blocks, c.image_size, num_classes, c.theta0, c.estimator)
    cache = Path(c.cache_dir).expanduser() if c.cache_dir else None
    learners = {}
    wanted = set(c.names()) if devices is True else set(devices or ())
    if wanted - set(c.names()):
        raise DataError(f"no such simulated device: {', '.join(sorted(wanted - set(c.names())))} "
                        f"(the federation has {c.clients})")
    for k, name in enumerate(c.names()):
        if name not in wanted:
            continue
        share = device_share(train.labels, c.train_samples, c.clients, k, c.alpha, c.min_per_client, c.seed)
        inputs = model.prefix(train.images[share], cache=cache, runtime=c.prefix_runtime)
        learners[name] = LocalLearner(model, inputs, train.labels[share])
    evaluate = None
    if held_out:
        held = seeded_subset(len(test.labels), c.test_samples, c.seed + 1)
        evaluate = HeldOut(Evaluator(model, model.prefix(test.images[held], cache=cache, runtime=c.prefix_runtime),
                                     test.labels[held]))
        if c.val_samples:
            val = validation_images(len(train.labels), c)
            evaluate.val = Evaluator(model, model.prefix(train.images[val], cache=cache, runtime=c.prefix_runtime),
                                     train.labels[val])
    return model, learners, evaluate, num_classes


def validation_images(n: int, c: SimConfig) -> np.ndarray:
    """Indices of `val_samples` training images the federation's subset leaves out (seed + 2)."""
    from deltamask.data import seeded_subset

    rest = np.setdiff1d(np.arange(n), seeded_subset(n, c.train_samples, c.seed))
    if len(rest) < c.val_samples:
        raise DataError(f"val_samples = {c.val_samples}, but the training subset of {c.train_samples} leaves "
                        f"{len(rest)} of the {n} training images out: lower one of them")
    return rest[seeded_subset(len(rest), c.val_samples, c.seed + 2)]


class HeldOut:
    """The simulator's held-out scores: the test images' (`test`), and the validation images' (`val`, when
    there are any) under the same keys prefixed val_."""

    def __init__(self, test, val=None) -> None:
        self.test, self.val = test, val

    def __call__(self, *args, **kwargs) -> Dict:
        scores = self.test(*args, **kwargs)
        if self.val is not None:
            scores.update({f"val_{key}": v for key, v in self.val(*args, **kwargs).items()})
        return scores


class InProcess:
    """The selected devices' local work, one after another in this process."""

    def __init__(self, learners: Dict) -> None:
        self.learners = learners

    def work(self, task, names, head, thresholds=None, offset=None, progress=None) -> Dict[str, Tuple[object, float]]:
        """{name: (reply, seconds of its work)} for the devices `names`."""
        out = {}
        for name in names:
            out[name] = _timed_work(self.learners[name], task, name, head, thresholds, offset)
            if progress is not None:
                progress()
        return out


def _timed_work(learner, task, name, head, thresholds, offset):
    started = time.perf_counter()
    reply = learner.work(task, name, head, thresholds, offset=offset)
    return reply, time.perf_counter() - started


class _FleetActor:
    """A Ray actor holding every simulated device's learner (data and prefix outputs: read from the prefix
    cache, or computed once per actor) on one CPU; it works for whichever device it is asked."""

    def __init__(self, config: SimConfig) -> None:
        import torch

        torch.set_num_threads(1)
        _, self.learners, _, _ = build(config, held_out=False)

    def work(self, task, name, head, thresholds, offset):
        return _timed_work(self.learners[name], task, name, head, thresholds, offset)

    def count(self, ctx, shard):
        from deltamask.shards import count_shard

        return count_shard(ctx, shard)


class _ActorShards:
    """The round's decode and aggregation shards (`deltamask.shards`) on the fleet's own actors: they hold the
    CPUs, so shard tasks of their own would wait for CPUs that never free up."""

    def __init__(self, ray, actors) -> None:
        self.ray, self.actors, self.workers = ray, actors, len(actors)

    def map(self, ctx, shards):
        ref = self.ray.put(ctx)
        return self.ray.get([self.actors[i % self.workers].count.remote(ref, s) for i, s in enumerate(shards)])

    def close(self) -> None:
        pass


class RayFleet:
    """The selected devices trained in parallel on Ray: `workers` actors of one CPU each (on the cluster at
    `address`, or a local Ray), device i of a round on actor i mod workers. Every device's work depends only
    on the round's task, the head, theta and its own seeds, so the replies are those of the sequential
    simulator run with one torch thread, byte for byte (tests/test_parallel_sim.py); the uploads are then
    decoded and summed as shards (`deltamask.shards`) on the same actors."""

    def __init__(self, config: SimConfig, workers: int, address: Optional[str] = None) -> None:
        if workers < 1:
            raise ValueError(f"Ray workers must be at least 1, got {workers}")
        from deltamask.shards import start_ray

        ray, self._started = start_ray(workers, address)
        self.ray = ray
        actor = ray.remote(num_cpus=1)(_FleetActor)
        self.actors = [actor.remote(config) for _ in range(workers)]
        self.shards = _ActorShards(ray, self.actors)

    def work(self, task, names, head, thresholds=None, offset=None, progress=None) -> Dict[str, Tuple[object, float]]:
        head_ref, theta_ref = self.ray.put(head), self.ray.put(thresholds)
        offset_ref = self.ray.put(offset)
        refs = {name: self.actors[i % len(self.actors)].work.remote(task, name, head_ref, theta_ref, offset_ref)
                for i, name in enumerate(names)}
        out = {}
        for name, ref in refs.items():
            out[name] = self.ray.get(ref)
            if progress is not None:
                progress()
        return out

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
        if self._started:  # a Ray this fleet started; a cluster or a Ray started by the caller stays up
            self.ray.shutdown()


@dataclass(frozen=True)
class Work:
    """What the selected devices of a round receive: the task, the head, and theta (mask rounds, as decoded
    from its wire message) or the global weights' offset (the fine-tuning baselines)."""

    task: object  # deltamask.federation.DeviceTask
    head: Optional[tuple]
    thresholds: Optional[np.ndarray] = None
    offset: Optional[np.ndarray] = None
    theta_wire: Optional[bytes] = None  # theta as it travels (what `thresholds` was decoded from)


class Federation:
    """The simulated federation: the model, the aggregator and a held-out evaluator, and a fleet that trains
    the selected devices. A round is planned (`plan`), sent (`open`: the Work) and combined (`close`: the
    replies -> the round's summary); `rounds` drives them with the fleet, a Flower strategy
    (`deltamask.flower`) with Flower's messages."""

    def __init__(self, config: SimConfig, fleet=None, shards=None, devices: bool = True) -> None:
        """`fleet`: who trains (in this process by default; a RayFleet); `shards`: who decodes and sums the
        uploads (the fleet's, else serial); devices=False builds no learners (a server whose devices are
        elsewhere)."""
        self.config = c = config
        c.check()
        started = time.perf_counter()
        self.model, learners, self.evaluate, num_classes = build(c, devices=devices and fleet is None)
        self.prefix_s = time.perf_counter() - started
        self.fleet = fleet or InProcess(learners)  # who trains the selected devices: here, or Ray actors
        self.shards = shards or getattr(fleet, "shards", None) or Serial()  # who decodes and sums their uploads
        self.d, input_dim = self.model.d, self.model.input_dim
        self.config = c = resolved(c, input_dim, num_classes, self.model.feature_dim)  # local.loss auto -> a loss
        self.agg = Aggregator(c, self.d, num_classes, self.model.feature_dim,
                              input_dim if c.local.loss == VIRTUAL_CLASSES else 0)
        self.heads_done = self.masks_done = 0
        self.wire = self.agg.theta_wire()  # the global theta as it travels, encoded once a round
        self.kept: Optional[Kept] = None  # the round whose model the federation leaves behind (keep_round)
        self.kept_accuracy: Optional[float] = None  # its test score

    def start(self) -> Optional[Dict]:
        """A seeded Kaiming head is scored before the first round (None for the other heads)."""
        c = self.config
        if c.head_phase_rounds:
            return None
        return {"round": -1, "phase": HEAD, "head": c.head, "clients": 0, "uplink_bpp": 0.0,
                **self.evaluate(self.agg.head)}

    def plan(self, index: int, eligible: Optional[List[str]] = None):
        """Round `index`'s plan over `eligible` device names (every simulated device by default); None when
        the federation is over."""
        return plan_round(self.config, index, self.heads_done, self.masks_done,
                          self.config.names() if eligible is None else eligible)

    def rounds(self, progress=None, index: int = 0, fresh: bool = True) -> Iterator[Dict]:
        """Every round the policy plans from round `index` on, one summary each; a fresh run (not one resumed
        by `restore`) scores a seeded Kaiming head first."""
        first = self.start() if fresh else None
        if first is not None:
            yield first
        while (plan := self.plan(index)) is not None:
            work = self.open(plan)
            started = time.perf_counter()
            replies = self.fleet.work(work.task, plan.selected, work.head, work.thresholds, work.offset,
                                      progress=progress if plan.phase == MASK else None)
            yield self.close(plan, work, replies, time.perf_counter() - started)
            index += 1

    # --- a long run's checkpoint: what the next round needs; every seed derives from the federation seed and
    # the round index, and a device keeps nothing from one round to the next, so a resumed run gives the rows
    # the uninterrupted one would have given
    def save(self, path: Path, next_index: int) -> None:
        """The aggregator's state and the progress, written to `path` atomically (the old file or the new one)."""
        a = self.agg
        meta = {"config": _plain(dataclasses.asdict(self.config)), "next_index": next_index,
                "heads_done": self.heads_done, "masks_done": self.masks_done, "masks": a.counts.masks,
                "head": a.head is not None, "offset": a._offset is not None,
                "kept": None if self.kept is None else [*dataclasses.astuple(self.kept), self.kept_accuracy]}
        empty = np.zeros(0, np.float32)
        arrays = {"meta": np.frombuffer(json.dumps(meta).encode(), np.uint8), "ones": a.counts.ones,
                  "wire": np.frombuffer(self.wire, np.uint8), "offset": empty if a._offset is None else a._offset,
                  "head_weight": empty if a.head is None else a.head[0],
                  "head_bias": empty if a.head is None else a.head[1],
                  "head_anchors": a.head[2] if a.head is not None and len(a.head) > 2 else empty}
        path = Path(path)
        part = path.with_name(path.name + ".part")
        with open(part, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(part, path)

    def restore(self, path: Path) -> int:
        """Load what `save` wrote; returns the index of the next round. CheckpointError when it was written for
        another configuration (only `cache_dir` may differ) or is damaged."""
        try:
            with np.load(path) as z:
                meta = json.loads(bytes(z["meta"]).decode())
                arrays = {key: z[key] for key in ("ones", "wire", "offset", "head_weight", "head_bias")}
                arrays["head_anchors"] = z["head_anchors"] if "head_anchors" in z.files else np.zeros(0, np.float32)
        except (OSError, KeyError, ValueError) as exc:
            raise CheckpointError(f"{path}: not a checkpoint deltamask-sim wrote ({exc})") from None
        ours = _plain(dataclasses.asdict(self.config))
        differ = sorted(k for k in set(ours) | set(meta["config"])
                        if k != "cache_dir" and ours.get(k) != meta["config"].get(k))
        if differ:
            raise CheckpointError(f"{path} is a run of another configuration ({', '.join(differ)} differ): "
                                  f"give the same arguments, or another --checkpoint")
        a = self.agg
        if len(arrays["ones"]) != self.d:
            raise CheckpointError(f"{path}: counts of {len(arrays['ones'])} positions, this model has d = {self.d}")
        a.counts.ones[:] = arrays["ones"]
        a.counts.masks = meta["masks"]
        self.wire = arrays["wire"].tobytes()
        a.thresholds = decode_theta(self.wire, self.d)
        if meta["head"]:
            anchors = arrays["head_anchors"]
            a.head = (arrays["head_weight"], arrays["head_bias"]) + ((anchors,) if anchors.size else ())
        if meta["offset"]:
            a._offset = arrays["offset"]
        self.heads_done, self.masks_done = meta["heads_done"], meta["masks_done"]
        if meta.get("kept"):
            *kept, self.kept_accuracy = meta["kept"]
            self.kept = Kept(*kept)
        return meta["next_index"]

    def open(self, plan) -> Work:
        c = self.config
        if plan.phase == HEAD:
            return Work(device_task(c, plan), self.agg.head)
        if plan.phase == REFIT and get_codec(c.codec).carries != WEIGHTS:  # the head fitted on theta * w
            return Work(device_task(c, plan), self.agg.head, decode_theta(self.wire, self.d), theta_wire=self.wire)
        if get_codec(c.codec).carries == WEIGHTS:
            return Work(device_task(c, plan), self.agg.head, offset=self.agg.offset.copy())
        self.agg.open_mask(plan)  # a mask round
        return Work(device_task(c, plan), self.agg.head, decode_theta(self.wire, self.d), theta_wire=self.wire)

    def close(self, plan, work: Work, replies: Dict[str, Tuple[object, float]], seconds: float = 0.0) -> Dict:
        """Combine {name: (reply, seconds of its work)} (`seconds`: the whole round's wait for them)."""
        if plan.phase != MASK:
            return self._keep(self._close_head(plan, work, replies, seconds))
        row = self._close_weights(plan, replies) if work.offset is not None else self._close_mask(plan, work, replies)
        return self._keep({**row, "fleet_s": round(seconds, 3)})  # fleet_s: the selected devices' wall time

    def _keep(self, row: Dict) -> Dict:
        """The row with the model kept so far (`keep_round` by the validation score): its round and test score."""
        key = KEPT_BY[row["phase"]]
        kept = keep_round(self.config, self.kept, row["round"], row["phase"], row.get("val_" + key))
        if kept is not self.kept:
            self.kept, self.kept_accuracy = kept, row[key]
        return {**row, "kept_round": kept.round, "kept_accuracy": self.kept_accuracy}

    def _close_head(self, plan, work: Work, replies, seconds: float) -> Dict:
        """A head round, or the refit (scored on the final network, as a mask round is)."""
        c, started = self.config, time.perf_counter()
        downlink = 8 * len(encode_head(*work.head)) / self.d if work.head is not None else 0.0  # a probe's start
        if work.theta_wire is not None:  # the refit: theta too
            downlink += 8 * len(work.theta_wire) / self.d
        shares = {name: (self.agg.decode_share(reply.payload, plan.phase), reply.examples)
                  for name, (reply, _) in replies.items()}
        self.agg.close_head(shares, plan.seed, plan.phase)
        self.heads_done += 1
        bits = head_bits(c, self.agg.num_classes, self.agg.feature_dim, self.agg.input_dim, plan.phase)
        if plan.phase == REFIT:
            scores = self.evaluate(self.agg.head, work.thresholds, plan.eval_seed,
                                   c.tau if c.mask_rule == THRESHOLD else None, work.offset)
        else:
            scores = self.evaluate(self.agg.head)
        return {"round": plan.index, "phase": plan.phase, "head": c.head, "clients": len(plan.selected),
                "uplink_bpp": bits / self.d, "downlink_bpp": downlink, "head_sha256": _sha(encode_head(*self.agg.head)),
                **scores, "time_s": round(seconds + time.perf_counter() - started, 3)}

    def _close_mask(self, plan, work: Work, replies) -> Dict:
        c, d = self.config, self.d
        wire, thresholds = self.wire, work.thresholds
        times = {"train_s": 0.0, "encode_s": 0.0, "decode_s": 0.0}
        carries_mask = get_codec(c.codec).carries == CARRIES_MASK
        for reply, seconds in replies.values():
            times["train_s"] += seconds - reply.encode_s
            times["encode_s"] += reply.encode_s
        started = time.perf_counter()
        summed = aggregate(RoundContext(thresholds, plan.seed, c.reference),
                           [(name, reply.payload) for name, (reply, _) in replies.items()], self.shards,
                           expected={name: reply.reference_digest for name, (reply, _) in replies.items()})
        if summed.errors:
            raise RuntimeError(f"uploads refused: {summed.errors}")
        self.agg.counts.add_slice(summed.ones, 0)
        self.agg.counts.count_masks(len(summed.accepted))
        times["decode_s"] = time.perf_counter() - started
        rows = []
        for name, (reply, _) in replies.items():
            applied = summed.applied[name]
            rows.append({"bits": 8 * len(reply.payload), "delta": reply.delta, "kept": reply.kept,
                         "applied": applied, "false": 0 if carries_mask else applied - reply.kept,
                         **(ideal_mask_bits(decode_payload(reply.payload, d).client_mask(np.zeros(d, bool)),
                                            thresholds) if carries_mask else {})})
        thresholds = self.agg.close_mask()
        self.wire = self.agg.theta_wire()
        self.masks_done += 1
        started = time.perf_counter()
        scores = self.evaluate(self.agg.head, thresholds, plan.eval_seed, c.tau if c.mask_rule == THRESHOLD else None)
        return {"round": plan.index, "phase": "mask", "kappa": round(plan.kappa, 4), "clients": len(plan.selected),
                **scores, "uplink_bpp": float(np.mean([x["bits"] for x in rows])) / d,
                "downlink_bpp": 8 * len(wire) / d,
                "delta_fraction": float(np.mean([x["delta"] for x in rows])) / d,
                "undecided_fraction": len(undecided(work.thresholds)) / d,  # of the theta the round served
                "kept": float(np.mean([x["kept"] for x in rows])),
                "flips_applied": float(np.mean([x["applied"] for x in rows])),
                "false_flips": float(np.mean([x["false"] for x in rows])),
                "theta_mean": float(thresholds.mean() / (1 << 24)),
                **({f"ideal_{key[:-5]}_bpp": float(np.mean([x[key] for x in rows])) / d
                    for key in ("entropy_bits", "cross_entropy_bits")} if carries_mask else {}),
                "theta_sha256": _sha(self.wire),
                **{key: round(v, 3) for key, v in times.items()},
                "eval_s": round(time.perf_counter() - started, 3)}

    def _close_weights(self, plan, replies) -> Dict:
        """A fine-tuning baseline's round (codec float32 or eden): the selected devices fine-tuned the masked
        layers' weights from the global ones and uploaded their updates; the aggregator averages them (FedAvg).
        Logged as the plan's mask-phase round, with "update": "weights"; the downlink is the new weights'
        offset in float32 (32 bpp)."""
        d = self.d
        updates, bits, times = {}, [], {"train_s": 0.0, "encode_s": 0.0, "decode_s": 0.0}
        for name, (reply, seconds) in replies.items():
            started = time.perf_counter()
            updates[name] = (decode_payload(reply.payload, d).values, reply.examples)
            times["decode_s"] += time.perf_counter() - started
            times["train_s"] += seconds - reply.encode_s
            times["encode_s"] += reply.encode_s
            bits.append(8 * len(reply.payload))
        offset = self.agg.close_weights(updates)
        self.masks_done += 1
        started = time.perf_counter()
        scores = self.evaluate(self.agg.head, offset=offset)
        return {"round": plan.index, "phase": "mask", "update": "weights", "clients": len(plan.selected), **scores,
                "uplink_bpp": float(np.mean(bits)) / d, "downlink_bpp": 32.0,
                "weights_sha256": _sha(offset.tobytes()), **{key: round(v, 3) for key, v in times.items()},
                "eval_s": round(time.perf_counter() - started, 3)}


def ideal_mask_bits(mask: np.ndarray, thresholds: np.ndarray) -> Dict[str, float]:
    """What an ideal arithmetic coder would spend on a whole mask (FedPM's upload), in bits: with the
    mask's own frequency of ones as its model (d H_b(p), FedPM's estimate), and with the round's theta_g,
    which the server holds, as the model (the mask's cross-entropy under theta_g, probabilities clipped to
    [2^-24, 1 - 2^-24])."""
    d = len(mask)
    p = float(np.count_nonzero(mask)) / d
    entropy = 0.0 if p in (0.0, 1.0) else -d * (p * np.log2(p) + (1 - p) * np.log2(1 - p))
    theta = np.clip(thresholds.astype(np.float64) / (1 << 24), 2.0 ** -24, 1 - 2.0 ** -24)
    cross = float(-np.log2(np.where(mask, theta, 1 - theta)).sum())
    return {"entropy_bits": entropy, "cross_entropy_bits": cross}


def run(config: SimConfig, progress: bool = True, fleet=None, checkpoint: Optional[Path] = None) -> Iterator[Dict]:
    """Yield one dict a round: the head phase, then `config.rounds` mask rounds. `fleet`: who trains the selected
    devices (a RayFleet; in this process by default). `checkpoint`: a file the state is saved to after each round
    (once the round's row is taken) and resumed from when it exists."""
    fed = Federation(config, fleet)
    log.info("d = %d masked parameters; prefix outputs computed once in %.1f s", fed.d, fed.prefix_s)
    from deltamask.federation import clients_per_round

    index, fresh = 0, checkpoint is None or not Path(checkpoint).exists()
    if not fresh:
        index = fed.restore(checkpoint)
        log.info("resuming at round %d from %s (%d mask rounds done)", index, checkpoint, fed.masks_done)
    left = max(0, config.rounds - fed.masks_done)
    bar = _progress(left * clients_per_round(config.rho, config.clients, config.min_quorum), progress)
    first = fresh
    for row in fed.rounds(progress=bar.update if bar else None, index=index, fresh=fresh):
        if first:
            row = {**row, "d": fed.d, "prefix_s": round(fed.prefix_s, 3)}
            first = False
        yield row
        if checkpoint is not None:  # after the row is taken: a crash in between repeats the round, loses none
            fed.save(checkpoint, row["round"] + 1)
    if bar:
        bar.close()


def _plain(value):
    """A configuration as JSON gives it back (tuples as lists), to compare a checkpoint's with ours."""
    return json.loads(json.dumps(value))


def _sha(data: bytes) -> str:
    from deltamask.transfer import sha256_hex

    return sha256_hex(data)


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="client updates", unit="client", file=sys.stderr)


LOCAL_FLAGS = {f.name: f.name for f in dataclasses.fields(LocalTraining)}  # --epochs, --lr, ... set `local`


def _flag(text: str) -> bool:
    """A yes/no setting on the command line: 1/0, true/false, yes/no, on/off."""
    words = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}
    if text.lower() not in words:
        raise argparse.ArgumentTypeError(f"expected 1/0, true/false, yes/no or on/off, got {text!r}")
    return words[text.lower()]


def parse_args(argv: Optional[List[str]] = None) -> Tuple[SimConfig, argparse.Namespace]:
    """The federation's configuration, and how to run it (--ray-workers, --ray-address: not part of the
    configuration, since they do not change a result)."""
    parser = argparse.ArgumentParser(prog="deltamask-sim", description=__doc__.split("\n")[0])
    parser.add_argument("--ray-workers", type=int, default=0,
                        help="train the selected devices on this many Ray actors (one CPU each; needs deltamask[ray]); "
                             "0: one after another in this process")
    parser.add_argument("--ray-address", default=None, help="a Ray cluster to use (e.g. auto); default: a local Ray")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="save the federation's state here after every round, and resume from it when it exists "
                             "(the same arguments; append the output: >> run.jsonl)")
    defaults = SimConfig()
    fields = [f for f in dataclasses.fields(SimConfig) if f.name != "local"] + list(dataclasses.fields(LocalTraining))
    for f in fields:
        default = getattr(defaults.local if f.name in LOCAL_FLAGS else defaults, f.name)
        kind = {int: int, float: float, bool: _flag}.get(type(default), str)
        parser.add_argument("--" + f.name.replace("_", "-"), type=kind, default=default, help=f"default: {default}")
    args = vars(parser.parse_args(argv))
    if args["weights"] in ("none", "None", ""):
        args["weights"] = None
    how = argparse.Namespace(ray_workers=args.pop("ray_workers"), ray_address=args.pop("ray_address"),
                             checkpoint=args.pop("checkpoint"))
    if how.ray_workers < 0:
        raise ValueError(f"--ray-workers must be 0 or more, got {how.ray_workers}")
    local = LocalTraining(**{k: args.pop(k) for k in LOCAL_FLAGS})
    return SimConfig(**args, local=local), how


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    try:
        config, how = parse_args(argv)
        config.check()
    except ValueError as exc:
        print(f"deltamask-sim: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"config": dataclasses.asdict(config)}), flush=True)
    fleet = None
    try:
        if how.ray_workers:
            try:
                fleet = RayFleet(config, how.ray_workers, how.ray_address)
            except RuntimeError as exc:  # Ray not installed
                raise DeltaMaskError(str(exc)) from None
        for row in run(config, fleet=fleet, checkpoint=how.checkpoint):
            print(json.dumps(row), flush=True)
    except DeltaMaskError as exc:  # a missing dataset or weight file, an empty client, no Ray, another checkpoint
        print(f"deltamask-sim: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if fleet is not None:
            fleet.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
