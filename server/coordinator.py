"""The coordinator's round state machine: registry, sampling, deadlines, aggregation, persistence.

One round, as the coordinator sees it:

    open:    sample K online devices with the round's seed; serve them theta (wire bytes) and the task
    receive: each upload -> decode -> rebuild the client's mask -> check its reference digest
             -> persist the payload -> add to the Beta counts            (as it arrives, not at close)
    close:   when every selected device has sent, or at the deadline with at least `min_quorum`
             updates: counts -> theta -> wire bytes -> persist -> next round. Below quorum at the
             deadline the round is skipped: the counts go back to what they were, theta stays.

The round policy and the arithmetic are the core library's, the same the simulator runs: whom to ask
(`deltamask.federation.plan_round`, over the devices' enrolled names), how to combine the replies
(`deltamask.federation.Aggregator`: the head phase, Beta counts, theta), how to rebuild a mask
(`deltamask.rounds`). This module keeps persistence, locking, deadlines and liveness around them. All
state changes happen under one condition variable; decoding runs outside it so that uploads decode in
parallel. The gRPC layer is `server.service`.
"""
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Set, Tuple

import numpy as np

from deltamask.codecs import decode as decode_payload
from deltamask.errors import PayloadError
from deltamask.federation import (HEAD, MASK, Aggregator, DeviceTask, Head, device_task, eval_seed, head_bits,
                                  plan_round)
from deltamask.headwire import decode_head, encode_head
from deltamask.rounds import rebuild_client_mask
from deltamask.thetawire import decode_theta, theta_digest
from deltamask.transfer import sha256_hex
from server.config import ServerConfig
from server.store import Store

log = logging.getLogger(__name__)
IDLE, DONE = "idle", "done"


class CoordinatorError(Exception):
    """A request the coordinator refuses; `server.service` maps each kind to one gRPC status."""


class UnknownDevice(CoordinatorError):
    pass


class NotOpen(CoordinatorError):
    """The round is not open, or the device is not selected in it."""


class InvalidUpdate(CoordinatorError):
    pass


class TooLarge(CoordinatorError):
    pass


class Conflict(CoordinatorError):
    """A second, different update for a round the device already sent one for."""


@dataclass(frozen=True)
class ModelFacts:
    """What every device must agree on: d, the canonical layout digest, the feature size."""

    d: int
    layout_digest: str
    feature_dim: int


@dataclass
class Device:
    device_id: str
    name: str
    kind: str
    memory_bytes: int
    codec: str
    last_seen: float = 0.0  # the last call from it (any RPC: heartbeats, long polls, uploads)
    ready: bool = False  # it has asked for work since it registered (it is not still loading its model)


@dataclass(frozen=True)
class Task:
    """A device's answer to its long poll: IDLE, DONE, or the round's work (`work`, the core's DeviceTask)."""

    phase: str
    round: int = 0
    work: Optional[DeviceTask] = None
    deadline: float = 0.0
    theta_digest: str = ""
    theta_bytes: int = 0
    head: bytes = b""  # the current head (wire bytes): frozen in mask rounds, the start of a linear probe


@dataclass
class OpenRound:
    round: int
    phase: str
    seed: int
    kappa: float
    selected: List[str]
    deadline: float
    mask_index: int  # mask rounds closed before this one
    reset: bool  # whether the prior was reset when it opened
    received: Dict[str, str] = field(default_factory=dict)  # device -> payload SHA-256
    nbytes: Dict[str, int] = field(default_factory=dict)
    metrics: Dict[str, Dict] = field(default_factory=dict)
    decode_s: Dict[str, float] = field(default_factory=dict)
    shares: Dict[str, Tuple[object, float]] = field(default_factory=dict)  # head rounds: name -> (share, examples)
    last_upload: float = 0.0
    task: Optional[DeviceTask] = None


class Coordinator:
    def __init__(self, config: ServerConfig, facts: ModelFacts, store: Store,
                 clock: Callable[[], float] = time.time,
                 evaluate: Optional[Callable[[np.ndarray, Optional[bytes]], Dict]] = None,
                 on_round: Optional[Callable[[Dict], None]] = None) -> None:
        self.config, self.facts, self.store, self.clock = config, facts, store, clock
        self.evaluate, self.on_round = evaluate, on_round
        self.d = facts.d
        share = head_bits(config, config.num_classes, facts.feature_dim) // 8
        self.max_upload_bytes = config.max_upload_bytes or max(self.d // 8, share) + (1 << 20)
        self.cond = threading.Condition()
        self.devices: Dict[str, Device] = {}
        self.agg = Aggregator(config, self.d, config.num_classes, facts.feature_dim)
        self.counts = self.agg.counts
        self.open: Optional[OpenRound] = None
        self.closed_rounds = -1  # the last closed (or skipped) round
        self.head_rounds = 0  # head rounds closed
        self.mask_rounds = 0  # mask rounds closed
        self.history: List[Dict] = []
        self.done = threading.Event()
        self.told_done: Set[str] = set()
        self._stopping = threading.Event()
        self._recover()

    @property
    def thresholds(self) -> np.ndarray:
        """The global theta of the open (or next) round, as wire thresholds: the aggregator's."""
        return self.agg.thresholds

    # --- start-up -----------------------------------------------------------------------------------
    def _recover(self) -> None:
        """Load the registry, history, head, counts and theta; replay the uploads of an open round."""
        s = self.store
        for key, value in (("d", str(self.d)), ("layout_digest", self.facts.layout_digest)):
            stored = s.get_meta(key)
            if stored is None:
                s.set_meta(key, value)
            elif stored != value:
                raise ValueError(f"state in {s.folder} is for {key} = {stored}, this configuration has {value}; "
                                 f"use another state_dir")
        for row in s.devices():
            self.devices[row["device_id"]] = Device(**row)
        head = s.load_head()
        if head is not None:
            self.agg.head = self._decode_head(head)
        rows = s.rounds()
        finished = [r for r in rows if r["state"] != "open"]
        self.history = [r["summary"] for r in finished if r["summary"]]
        if finished:
            self.closed_rounds = finished[-1]["round"]
            self.head_rounds = sum(1 for r in finished if r["phase"] == HEAD and r["state"] == "closed")
            self.mask_rounds = sum(1 for r in finished if r["phase"] == MASK and r["state"] == "closed")
            ones = s.load_counts(self.closed_rounds)
            if ones is not None:
                self.counts.ones[:] = ones
                self.counts.masks = int(finished[-1]["summary"]["counts_masks"])
        theta_round = self.closed_rounds + 1
        try:
            self.wire = s.load_theta(theta_round)
        except FileNotFoundError:
            if finished:
                raise
            self.wire = self.agg.theta_wire()
            s.save_theta(0, self.wire)
        self.agg.thresholds = decode_theta(self.wire, self.d)
        self.theta_digest = theta_digest(self.wire)
        opened = [r for r in rows if r["state"] == "open"]
        if opened:
            self._replay(opened[-1])
        if self.mask_rounds >= self.config.rounds:
            self.done.set()
        log.info("state: %d devices, %d rounds closed, %d mask rounds, open round: %s", len(self.devices),
                 self.closed_rounds + 1, self.mask_rounds, self.open.round if self.open else None)

    def _replay(self, row: Dict) -> None:
        r = OpenRound(row["round"], row["phase"], row["seed"], row["kappa"], row["selected"], row["deadline"],
                      row["mask_index"], bool(row["reset"]))
        r.task = self._work(r)
        if r.reset:
            self.counts.reset()
        for u in self.store.updates(r.round):
            payload = self.store.update_path(r.round, u["device_id"]).read_bytes()
            self._apply(r, u["device_id"], payload, u["sha256"], self._check(r, u["device_id"], payload), u["metrics"])
        self.open = r

    # --- requests -----------------------------------------------------------------------------------
    def register(self, name: str, kind: str, memory_bytes: int, codec: str) -> Device:
        if not name:
            raise InvalidUpdate("a device needs a name")
        with self.cond:
            for device in self.devices.values():
                if device.name == name:  # an agent restarted: it is not ready until it asks for work
                    device.last_seen, device.ready = self.clock(), False
                    return device
            device = Device(secrets.token_hex(8), name, kind, int(memory_bytes), codec, self.clock())
            self.store.add_device(device.device_id, name, kind, device.memory_bytes, codec)
            self.devices[device.device_id] = device
            log.info("registered %s (%s) as %s", name, kind, device.device_id)
            self.cond.notify_all()
            return device

    def heartbeat(self, device_id: str) -> int:
        with self.cond:
            self._device(device_id).last_seen = self.clock()
            self.cond.notify_all()
            return self.open.round if self.open else self.closed_rounds + 1

    def get_task(self, device_id: str, after_round: int, wait_s: float) -> Task:
        """Long-poll: the task of the open round once this device is selected in it, IDLE after wait_s."""
        until = time.monotonic() + max(0.0, min(wait_s, 300.0))
        with self.cond:
            device = self._device(device_id)
            device.ready = True
            self.cond.notify_all()
            while True:
                device.last_seen = self.clock()
                if self.done.is_set():
                    self.told_done.add(device_id)
                    self.cond.notify_all()
                    return Task(DONE, self.closed_rounds)
                r = self.open
                if (r is not None and r.round > after_round and device_id in r.selected
                        and device_id not in r.received):
                    return self._task(r)
                left = until - time.monotonic()
                if left <= 0 or self._stopping.is_set():
                    return Task(IDLE, self.open.round if self.open else self.closed_rounds + 1)
                self.cond.wait(min(left, 1.0))

    def theta_for(self, device_id: str, round_index: int) -> bytes:
        """The theta wire bytes of the open round."""
        with self.cond:
            self._device(device_id)
            r = self._open_round(round_index, device_id)
            if r.phase != MASK:
                raise NotOpen(f"round {round_index} is a head round: no theta to fetch")
            return self.wire

    def check_upload(self, device_id: str, round_index: int, total_length: int, sha: str) -> None:
        """Refuse an upload from its header: unknown device, round not open for it, too large."""
        with self.cond:
            self._device(device_id)
            if not self._duplicate(round_index, device_id, sha):
                self._open_round(round_index, device_id)
        if total_length > self.max_upload_bytes:
            raise TooLarge(f"update of {total_length} bytes; the limit is {self.max_upload_bytes} bytes")

    def submit(self, device_id: str, round_index: int, payload: bytes, reference_digest: str,
               metrics: Dict) -> bool:
        """Take one update; returns True when it is a duplicate of one already taken (nothing changes)."""
        sha = sha256_hex(payload)
        if len(payload) > self.max_upload_bytes:
            raise TooLarge(f"update of {len(payload)} bytes; the limit is {self.max_upload_bytes} bytes")
        with self.cond:
            self._device(device_id)
            if self._duplicate(round_index, device_id, sha):
                return True
            r = self._open_round(round_index, device_id)
        started = time.perf_counter()
        checked = self._check(r, device_id, payload, reference_digest)
        decode_s = time.perf_counter() - started
        with self.cond:
            if self._duplicate(round_index, device_id, sha):
                return True
            if self.open is not r:
                raise NotOpen(f"round {round_index} closed while the update was being decoded")
            self.store.add_update(r.round, device_id, payload, sha, reference_digest, metrics)
            self._apply(r, device_id, payload, sha, checked, metrics)
            r.decode_s[device_id] = decode_s
            r.last_upload = time.perf_counter()
            self.cond.notify_all()
        return False

    def status(self) -> Dict:
        with self.cond:
            return {"round": self.open.round if self.open else self.closed_rounds + 1,
                    "phase": DONE if self.done.is_set() else (self.open.phase if self.open else IDLE),
                    "registered": len(self.devices), "online": len(self._online()),
                    "history": list(self.history)}

    def everyone_told_done(self) -> bool:
        """Whether every online device has been told training is over."""
        with self.cond:
            return set(self._online()) <= self.told_done

    # --- rounds -------------------------------------------------------------------------------------
    def step(self) -> None:
        """Advance the state machine as far as it can go now (open, or close, a round)."""
        summary = None
        with self.cond:
            if self.done.is_set():
                return
            if self.open is None:
                online = self._online()
                need = self.config.expected_clients if self.closed_rounds < 0 else self.config.min_quorum
                if len(online) >= need:
                    self._open(online)
                return
            r = self.open
            if set(r.selected) <= set(r.received) or self.clock() >= r.deadline:
                summary = self._close(r)
        if summary is not None:
            self._finish(summary, r.seed)

    def run(self, poll_s: float = 0.2) -> None:
        """Step until done or stopped (the coordinator's background thread)."""
        while not self._stopping.is_set() and not self.done.is_set():
            self.step()
            with self.cond:
                if not self.done.is_set():
                    self.cond.wait(poll_s)

    def stop(self) -> None:
        self._stopping.set()
        with self.cond:
            self.cond.notify_all()

    def _open(self, online: List[str]) -> None:
        """Open the next round as the policy plans it, over the online devices' names."""
        c = self.config
        by_name = {self.devices[i].name: i for i in online}
        plan = plan_round(c, self.closed_rounds + 1, self.head_rounds, self.mask_rounds, list(by_name))
        if plan is None:
            self.done.set()
            return
        selected = [by_name[name] for name in plan.selected]
        r = OpenRound(plan.index, plan.phase, plan.seed, plan.kappa, selected, self.clock() + c.round_deadline_s,
                      plan.mask_round, plan.reset, task=device_task(c, plan))
        self.store.open_round(vars(r))
        if plan.phase == MASK:
            self.agg.open_mask(plan)
        self.open = r
        log.info("round %d (%s) open: %d of %d online devices selected, deadline in %.0f s", plan.index,
                 plan.phase, len(selected), len(online), c.round_deadline_s)
        self.cond.notify_all()

    def _close(self, r: OpenRound) -> Dict:
        """Close the open round (under the lock): aggregate, persist, and return its summary."""
        started = time.perf_counter()
        c = self.config
        quorum = min(c.min_quorum, len(r.selected))
        state = "closed" if len(r.received) >= quorum else "skipped"
        wire = self.wire
        if state == "closed" and r.phase == HEAD:
            self.store.save_head(encode_head(*self.agg.close_head(r.shares, r.seed)))
            self.head_rounds += 1
        elif state == "closed":
            self.agg.close_mask()
            wire = self.agg.theta_wire()
            self.mask_rounds += 1
        else:  # skipped: the counts go back to what they were when the round opened
            self._restore_counts(r)
        self.store.save_counts(r.round, self.counts.ones)
        self.store.save_theta(r.round + 1, wire)
        up = {dev: 8 * n / self.d for dev, n in r.nbytes.items()}
        summary = {"round": r.round, "phase": r.phase, "state": state, "selected": len(r.selected),
                   "received": len(r.received), "lost": sorted(set(r.selected) - set(r.received)),
                   "uplink_bpp": float(np.mean(list(up.values()))) if up else 0.0, "uplink_bpp_by_device": up,
                   "downlink_bpp": 8 * len(self.wire) / self.d if r.phase == MASK else 0.0,
                   "decode_s": round(max(r.decode_s.values()), 4) if r.decode_s else 0.0,
                   "counts_masks": self.counts.masks, "head_rounds": self.head_rounds,
                   "mask_rounds": self.mask_rounds}
        if r.phase == HEAD:
            summary["head"] = c.head
        self.wire = wire
        self.theta_digest = theta_digest(wire)
        if state == "closed":  # what the round produced, to compare with the simulator's (parity)
            if r.phase == HEAD:
                summary["head_sha256"] = sha256_hex(encode_head(*self.agg.head))
            else:
                summary["theta_sha256"] = self.theta_digest
        summary["close_s"] = round(time.perf_counter() - started, 4)
        if r.last_upload:
            summary["round_close_s"] = round(time.perf_counter() - r.last_upload, 4)
        self.store.close_round(r.round, state, summary)
        self.store.prune(r.round - 1)
        self.closed_rounds, self.open = r.round, None
        self.history.append(summary)
        if self.mask_rounds >= c.rounds:
            self.done.set()
        self.cond.notify_all()
        log.info("round %d %s: %d of %d updates, %.2f s to close", r.round, state, len(r.received),
                 len(r.selected), summary["close_s"])
        return summary

    def _finish(self, summary: Dict, seed: int) -> None:
        """After a close, outside the lock: score the head or theta on held-out data, report the round."""
        if self.evaluate is not None and summary["state"] == "closed" and self.agg.head is not None:
            mask = summary["phase"] == MASK
            scores = self.evaluate(self.agg.head, self.thresholds if mask else None, eval_seed(seed))
            summary.update(scores)
            with self.cond:
                self.store.close_round(summary["round"], summary["state"], summary)
        if self.on_round is not None:
            self.on_round(summary)

    def _restore_counts(self, r: OpenRound) -> None:
        previous = [h for h in self.history if h["round"] == r.round - 1]
        if r.reset or not previous:
            self.counts.reset()
        else:
            self.counts.ones[:] = self.store.load_counts(r.round - 1)
            self.counts.masks = int(previous[0]["counts_masks"])

    # --- updates ------------------------------------------------------------------------------------
    def _check(self, r: OpenRound, device_id: str, payload: bytes, reference_digest: Optional[str] = None):
        """Decode an update against its round; InvalidUpdate for a bad payload or a digest mismatch."""
        try:
            if r.phase == HEAD:
                return self.agg.decode_share(payload)
            packed, digest = rebuild_client_mask(decode_payload(payload, self.d), self.thresholds, r.seed,
                                                 self.devices[device_id].name, self.config.reference)
        except PayloadError as exc:
            raise InvalidUpdate(f"corrupt update: {exc}") from None
        if reference_digest is not None and digest != reference_digest:
            raise InvalidUpdate("reference mask digest does not match: the device drew its reference from a "
                                "different theta or seed")
        return packed

    def _apply(self, r: OpenRound, device_id: str, payload: bytes, sha: str, checked, metrics: Dict) -> None:
        if r.phase == HEAD:
            r.shares[self.devices[device_id].name] = (checked, float(metrics.get("num_examples") or 1))
        else:
            self.counts.add_packed(checked)
        r.received[device_id], r.nbytes[device_id], r.metrics[device_id] = sha, len(payload), metrics

    def _duplicate(self, round_index: int, device_id: str, sha: str) -> bool:
        """Whether this exact update was taken already; Conflict for a different one in the open round."""
        r = self.open
        if r is not None and r.round == round_index:
            taken = r.received.get(device_id)
            if taken is not None and taken != sha:
                raise Conflict(f"device {device_id} already sent a different update for round {round_index}")
            return taken is not None
        return self.store.find_update(round_index, device_id) == sha  # a retry after the round closed

    # --- helpers ------------------------------------------------------------------------------------
    def _device(self, device_id: str) -> Device:
        device = self.devices.get(device_id)
        if device is None:
            raise UnknownDevice(f"unknown device id {device_id!r}: register first")
        return device

    def _open_round(self, round_index: int, device_id: str) -> OpenRound:
        r = self.open
        if r is None or r.round != round_index:
            current = r.round if r is not None else None
            raise NotOpen(f"round {round_index} is not open (open round: {current})")
        if device_id not in r.selected:
            raise NotOpen(f"device {device_id} is not selected in round {round_index}")
        return r

    def _online(self) -> List[str]:
        """Devices that may be sampled: ready, and heard from within two heartbeat intervals."""
        horizon = self.clock() - 2 * self.config.heartbeat_interval_s
        return [d.device_id for d in self.devices.values() if d.ready and d.last_seen >= horizon]

    def _task(self, r: OpenRound) -> Task:
        head = encode_head(*self.agg.head) if self.agg.head is not None else b""
        if r.phase == HEAD:
            return Task(HEAD, r.round, r.task, r.deadline, head=head)
        return Task(MASK, r.round, r.task, r.deadline, self.theta_digest, len(self.wire), head)

    def _work(self, r: OpenRound) -> DeviceTask:
        """The task of a round opened before a restart (the plan's fields are in its row)."""
        c = self.config
        return DeviceTask(r.phase, r.round, r.seed, r.kappa, c.codec, c.reference, c.head, c.lda_covariance,
                          c.lda_rank, c.local)

    def _decode_head(self, data: bytes) -> Head:
        return decode_head(data, self.config.num_classes, self.facts.feature_dim)


__all__ = ["Conflict", "Coordinator", "CoordinatorError", "Device", "InvalidUpdate", "ModelFacts", "NotOpen",
           "Task", "TooLarge", "UnknownDevice"]
