"""Recovery: the coordinator's arrays as its rounds recorded them, checked, or rebuilt from the stored uploads.

    load_checked(store, finished, ...)   head, counts and theta from their files; `damaged` names every file
                                         whose SHA-256 differs from the one its round's row recorded
    rebuild(store, finished, config, ...) the same arrays from the stored uploads alone: every closed round
                                         aggregated again in order (the offline re-aggregation), each
                                         result checked against the digests the rounds recorded

A file that is missing, torn or zeroed is found by its digest and rebuilt from what can be trusted (the
uploads, each checked against the SHA-256 recorded when it was accepted); when that is impossible the
coordinator refuses to start with a StateError naming the file.
"""
import hashlib
import io
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np

from deltamask.codecs import decode as decode_payload
from deltamask.errors import PayloadError
from deltamask.federation import HEAD, MASK, REFIT, Aggregator, Head, Policy
from deltamask.headwire import decode_head, encode_head
from deltamask.rounds import rebuild_client_mask
from deltamask.thetawire import decode_theta


class StateError(Exception):
    """Persisted state that can neither be trusted nor rebuilt; the message names the file."""


@dataclass
class Loaded:
    ones: np.ndarray
    masks: int
    wire: bytes
    head: Optional[Head] = None
    damaged: List[str] = field(default_factory=list)


def declared_examples(metrics: Dict) -> float:
    """A head share's weight as its device declared it (bounded later by federation.bounded_weights)."""
    return float(metrics.get("num_examples") or 1)


def read_update(store, round_index: int, update: Dict) -> bytes:
    """A stored upload's bytes, checked against the SHA-256 recorded when it was accepted."""
    path = store.update_path(round_index, update["device_id"])
    try:
        payload = path.read_bytes()
    except OSError as exc:
        raise StateError(f"{path}: stored update of round {round_index} cannot be read ({exc.strerror})") from None
    if hashlib.sha256(payload).hexdigest() != update["sha256"]:
        raise StateError(f"{path}: stored update of round {round_index} is damaged (its SHA-256 differs from the "
                         f"one recorded when it was accepted); restore it from a backup, or move the state aside")
    return payload


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _counts_bytes(ones: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, ones, allow_pickle=False)
    return buffer.getvalue()


def load_checked(store, finished: List[Dict], d: int, num_classes: int, feature_dim: int) -> Loaded:
    """The arrays after the last finished round, from their files, each checked against its recorded digest."""
    last = finished[-1]
    summary = last["summary"] or {}
    damaged: List[str] = []

    def read(path, expected: Optional[str]) -> Optional[bytes]:
        try:
            data = path.read_bytes()
        except OSError:
            damaged.append(f"{path.name} is missing")
            return None
        if expected is not None and _sha(data) != expected:
            damaged.append(f"{path.name} differs from the SHA-256 round {last['round']} recorded")
            return None
        return data

    ones = np.zeros(d, dtype=np.uint32)
    data = read(store.counts_path(last["round"]), summary.get("counts_sha256"))
    if data is not None:
        try:
            ones = np.load(io.BytesIO(data), allow_pickle=False)
            if ones.shape != (d,):
                raise ValueError(f"shape {ones.shape}")
        except ValueError as exc:
            damaged.append(f"{store.counts_path(last['round']).name} does not hold d = {d} counts ({exc})")
    wire = read(store.theta_path(last["round"] + 1), summary.get("next_theta_sha256")) or b""
    if wire:
        try:
            decode_theta(wire, d)
        except PayloadError as exc:
            damaged.append(f"{store.theta_path(last['round'] + 1).name} does not decode ({exc})")
    head = None
    for phase, path in ((HEAD, store.head_path), (REFIT, store.refit_head_path)):  # the refit's head, when there
        heads = [r for r in finished if r["phase"] == phase and r["state"] == "closed"]  # is one, is the current
        data = read(path, (heads[-1]["summary"] or {}).get("head_sha256")) if heads else None
        if data is not None:
            try:
                head = decode_head(data, num_classes, feature_dim)
            except PayloadError as exc:
                damaged.append(f"{path.name} does not decode ({exc})")
    return Loaded(ones, int(summary.get("counts_masks", 0)), wire, head, damaged)


def rebuild(store, finished: List[Dict], policy: Policy, d: int, feature_dim: int, names: Dict[str, str],
            write: bool = True, input_dim: int = 0) -> Loaded:
    """Aggregate every finished round again from its stored uploads; check each theta and head against the
    digests recorded at close; with `write`, put the rebuilt files in place. StateError when they differ."""
    agg = Aggregator(policy, d, policy.num_classes, feature_dim, input_dim)
    heads: Dict[str, bytes] = {}  # phase -> the head it closed with
    for row in finished:
        summary, index = row["summary"] or {}, row["round"]
        if row["phase"] != MASK:  # a head round, or the refit
            if row["state"] == "closed":
                shares = {}
                for u in store.updates(index):
                    share = agg.decode_share(read_update(store, index, u), row["phase"])
                    shares[names[u["device_id"]]] = (share, declared_examples(u["metrics"]))
                agg.close_head(shares, row["seed"], row["phase"])
                heads[row["phase"]] = encode_head(*agg.head)
                _expect(store.refit_head_path if row["phase"] == REFIT else store.head_path, heads[row["phase"]],
                        summary.get("head_sha256"), index)
            continue
        if row["reset"] or not any(r["round"] == index - 1 for r in finished):
            agg.counts.reset()
        if row["state"] == "closed":
            for u in store.updates(index):
                update = decode_payload(read_update(store, index, u), d, agg.thresholds)
                packed, _ = rebuild_client_mask(update, agg.thresholds, row["seed"], names[u["device_id"]],
                                                policy.reference)
                agg.counts.add_packed(packed)
            agg.close_mask()
            _expect(store.theta_path(index + 1), agg.theta_wire(), summary.get("theta_sha256"), index)
    last = finished[-1]
    wire = agg.theta_wire()
    _expect(store.counts_path(last["round"]), _counts_bytes(agg.counts.ones),
            (last["summary"] or {}).get("counts_sha256"), last["round"])
    if write:
        store.save_counts(last["round"], agg.counts.ones)
        store.save_theta(last["round"] + 1, wire)
        for phase, head in heads.items():
            store.save_head(head, refit=phase == REFIT)
    return Loaded(agg.counts.ones.copy(), agg.counts.masks, wire, agg.head)


def _expect(path, data: bytes, recorded: Optional[str], round_index: int) -> None:
    if recorded is not None and _sha(data) != recorded:
        raise StateError(f"{path}: cannot be rebuilt: aggregating the stored uploads of round {round_index} again "
                         f"gives other bytes than the round recorded; restore the state from a backup")


__all__ = ["Loaded", "StateError", "declared_examples", "load_checked", "read_update", "rebuild"]
