"""Decode and aggregation as a map over shards, for rounds too large for one core.

A shard is (a group of uploads, an index range lo:hi): each upload in it is decoded, its reference mask drawn
over the range, its mask rebuilt there and added up; the shard returns integer counts for the range, the
uploads' reference-mask leaf digests there (`deltamask.sampling.DIGEST_CHUNK`-aligned, so digests combine
without the whole mask in one place) and a few counts per upload. The caller sums. Three executors, the same
counts bit for bit (integer sums do not depend on their order):

    serial     in this process (what the simulator and the coordinator do by default)
    process    a local process pool (`workers` processes; the embedded default for sharding)
    ray        Ray tasks, on a cluster when given its address (`pip install deltamask[ray]`)

    ctx = RoundContext(thresholds, round_seed, "per-client")
    result = aggregate(ctx, [(name, payload), ...], executor, expected={name: reference_digest})
    counts.add_slice(result.ones, 0); counts.count_masks(len(result.accepted))

What a shard moves: the round's thresholds (4 d bytes, once per worker and round with Ray's object store,
with each task for the process pool), the group's payloads, and back 4 (hi - lo) bytes of counts plus 32
bytes a leaf and upload. docs/design.md section 3.14 has the measurements and the scaling arithmetic.
"""
import math
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from deltamask.codecs import decode
from deltamask.errors import PayloadError
from deltamask.sampling import (DIGEST_CHUNK, PER_CLIENT, chunk_digests, combine_digests, reference_mask)

SERIAL, PROCESS, RAY = "serial", "process", "ray"
EXECUTORS = (SERIAL, PROCESS, RAY)
MAX_RANGE = 8 * DIGEST_CHUNK  # positions a shard covers at most (bounds a worker's memory: ~5 bytes each)


@dataclass(frozen=True)
class RoundContext:
    """What every shard of a round needs: the global theta as thresholds, the round seed, the reference mode."""

    thresholds: np.ndarray
    seed: int
    reference: str = PER_CLIENT

    @property
    def d(self) -> int:
        return len(self.thresholds)


@dataclass(frozen=True)
class Shard:
    uploads: Tuple[Tuple[str, bytes], ...]
    lo: int
    hi: int


@dataclass
class ShardResult:
    lo: int
    hi: int
    ones: np.ndarray  # uint32 counts over lo:hi, summed over the shard's decodable uploads
    leaves: Dict[str, List[bytes]]  # each decodable upload's reference leaf digests over lo:hi
    applied: Dict[str, int]  # positions where the rebuilt mask differs from the reference
    errors: Dict[str, str]  # uploads whose payload did not decode


@dataclass
class Aggregate:
    """The summed counts of the accepted uploads and what was learnt on the way."""

    ones: np.ndarray  # uint32, length d
    accepted: List[str]
    digests: Dict[str, str] = field(default_factory=dict)  # reference-mask digest of every decodable upload
    applied: Dict[str, int] = field(default_factory=dict)
    errors: Dict[str, str] = field(default_factory=dict)  # refused: why (bad payload, digest mismatch)


def count_shard(ctx: RoundContext, shard: Shard) -> ShardResult:
    """The work of one shard (runs in whichever process the executor picks)."""
    ones = np.zeros(shard.hi - shard.lo, dtype=np.uint32)
    leaves, applied, errors = {}, {}, {}
    for name, payload in shard.uploads:
        try:
            update = decode(payload, ctx.d, ctx.thresholds)
        except PayloadError as exc:
            errors[name] = f"corrupt update: {exc}"
            continue
        leaves[name], applied[name] = [], 0
        for lo in range(shard.lo, shard.hi, DIGEST_CHUNK):
            hi = min(lo + DIGEST_CHUNK, shard.hi)
            reference = reference_mask(ctx.thresholds, ctx.seed, name, ctx.reference, lo, hi)
            mask = update.client_mask(reference, lo)
            leaves[name] += chunk_digests(reference, lo)
            applied[name] += int(np.count_nonzero(mask != reference))
            ones[lo - shard.lo:hi - shard.lo] += mask
    return ShardResult(shard.lo, shard.hi, ones, leaves, applied, errors)


def plan_shards(uploads: Sequence[Tuple[str, bytes]], d: int, workers: int,
                max_range: int = MAX_RANGE) -> List[Shard]:
    """Split the round into about 2 x workers shards: index ranges of at most `max_range` positions (a
    multiple of DIGEST_CHUNK), then the uploads into groups, so that every worker has work."""
    if max_range % DIGEST_CHUNK or max_range <= 0:
        raise ValueError(f"max_range must be a positive multiple of {DIGEST_CHUNK}, got {max_range}")
    uploads = tuple(uploads)
    if not uploads:
        return []
    want = 2 * workers  # shards, so that a slow one does not hold up the round
    ranges = max(math.ceil(d / max_range), min(math.ceil(want / len(uploads)), math.ceil(d / DIGEST_CHUNK)))
    step = math.ceil(math.ceil(d / ranges) / DIGEST_CHUNK) * DIGEST_CHUNK
    bounds = [(lo, min(lo + step, d)) for lo in range(0, d, step)]
    groups = max(1, min(len(uploads), math.ceil(want / len(bounds))))
    cuts = [g * len(uploads) // groups for g in range(groups + 1)]
    return [Shard(uploads[a:b], lo, hi) for a, b in zip(cuts, cuts[1:]) for lo, hi in bounds]


class Serial:
    """Shards one after another in this process."""

    workers = 1

    def map(self, ctx: RoundContext, shards: Sequence[Shard]) -> List[ShardResult]:
        return [count_shard(ctx, s) for s in shards]

    def close(self) -> None:
        pass


class ProcessPool:
    """A local process pool (spawned processes: the coordinator has threads, which fork does not copy)."""

    def __init__(self, workers: int) -> None:
        import multiprocessing

        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.workers = workers
        self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))

    def map(self, ctx: RoundContext, shards: Sequence[Shard]) -> List[ShardResult]:
        return list(self.pool.map(count_shard, [ctx] * len(shards), shards))

    def close(self) -> None:
        self.pool.shutdown()


def start_ray(workers: int, address: Optional[str] = None):
    """(the ray module, whether this call started it): connects to the cluster at `address`, or starts a local
    Ray of `workers` CPUs, unless Ray is running in this process already (then it is used as it is)."""
    try:
        import ray
    except ImportError:
        raise RuntimeError("Ray is not installed: pip install 'deltamask[ray]'") from None
    if ray.is_initialized():
        return ray, False
    kwargs = {"address": address} if address else {"num_cpus": max(1, workers)}
    ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR", **kwargs)
    return ray, True


class RayPool:
    """Ray tasks, one CPU each: on the cluster at `address` (e.g. "auto" or "ray://head:10001"), or on a local
    Ray started with `workers` CPUs. The round's context goes into Ray's object store once per round."""

    def __init__(self, workers: int = 0, address: Optional[str] = None) -> None:
        self.ray, self._started = start_ray(workers, address)
        self.workers = workers or int(self.ray.cluster_resources().get("CPU", 1))
        self._remote = self.ray.remote(num_cpus=1)(count_shard)
        self._put: Optional[Tuple[RoundContext, object]] = None  # the last context and its object ref

    def map(self, ctx: RoundContext, shards: Sequence[Shard]) -> List[ShardResult]:
        if self._put is None or self._put[0] is not ctx:  # a caller that keeps one context a round ships it once
            self._put = (ctx, self.ray.put(ctx))
        ref = self._put[1]
        return self.ray.get([self._remote.remote(ref, s) for s in shards])

    def close(self) -> None:
        if self._started:  # a Ray this pool started; a cluster or a Ray started by the caller stays up
            self.ray.shutdown()


def make_executor(kind: str = SERIAL, workers: int = 1, address: Optional[str] = None):
    if kind == SERIAL:
        return Serial()
    if kind == PROCESS:
        return ProcessPool(workers)
    if kind == RAY:
        return RayPool(workers, address)
    raise ValueError(f"executor must be one of {', '.join(EXECUTORS)}, got {kind!r}")


def aggregate(ctx: RoundContext, uploads: Sequence[Tuple[str, bytes]], executor=None,
              expected: Optional[Mapping[str, str]] = None, max_range: int = MAX_RANGE) -> Aggregate:
    """Sum the rebuilt masks of `uploads` ([(device name, payload)], names unique). With `expected` (name ->
    the reference digest the device sent), an upload whose digest differs is refused and taken back out of
    the sums (by rebuilding it once more in this process: a faulty device's cost, not everybody's)."""
    executor = executor or Serial()
    names = [n for n, _ in uploads]
    if len(set(names)) != len(names):
        raise ValueError("one upload per device name")
    results = executor.map(ctx, plan_shards(uploads, ctx.d, executor.workers, max_range))
    out = Aggregate(np.zeros(ctx.d, dtype=np.uint32), [])
    leaves: Dict[str, Dict[int, List[bytes]]] = {}
    for r in results:
        out.ones[r.lo:r.hi] += r.ones
        out.errors.update(r.errors)
        for name, got in r.leaves.items():
            leaves.setdefault(name, {})[r.lo] = got
            out.applied[name] = out.applied.get(name, 0) + r.applied[name]
    for name in names:
        if name in out.errors:
            continue
        out.digests[name] = combine_digests(ctx.d, [x for lo in sorted(leaves[name]) for x in leaves[name][lo]])
        if expected is not None and out.digests[name] != expected.get(name):
            out.errors[name] = ("reference mask digest does not match: the device drew its reference from a "
                                "different theta or seed")
            out.ones -= count_shard(ctx, Shard(((name, dict(uploads)[name]),), 0, ctx.d)).ones
        else:
            out.accepted.append(name)
    return out


__all__ = ["Aggregate", "EXECUTORS", "MAX_RANGE", "PROCESS", "ProcessPool", "RAY", "RayPool", "RoundContext",
           "SERIAL", "Serial", "Shard", "ShardResult", "aggregate", "count_shard", "make_executor", "plan_shards", "start_ray"]
