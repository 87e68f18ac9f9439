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
(`deltamask.rounds`). This module keeps identity, persistence, locking, deadlines and liveness around them.

Two locks. `lock` guards the registry and the open round's bookkeeping and is held for microseconds: every
call takes it (heartbeats, long polls, status). `work` serialises what is slow and changes the arrays:
adding an upload (its fsync, its counts), opening a round (its row), closing one (aggregation, theta
encoding, fsyncs). Nothing slow runs under `lock`; decoding runs under neither, so uploads decode in
parallel. The order is always work, then lock. Long polls never hold a thread: `poll_task` answers at
once and `listeners` hear every change (the asyncio server in `server.service` waits on them).
"""
import logging
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from deltamask.codecs import decode as decode_payload
from deltamask.errors import PayloadError
from deltamask.federation import (HEAD, KEPT_BY, MASK, REFIT, Aggregator, DeviceTask, device_task, eval_seed,
                                  head_bits, keep_round, kept_of, plan_round, resolved)
from deltamask.headwire import encode_head
from deltamask.rounds import rebuild_client_mask
from deltamask.shards import SERIAL, RoundContext, aggregate, make_executor
from deltamask.thetawire import decode_theta, theta_digest
from deltamask.transfer import sha256_hex
from server import recovery
from server.config import ServerConfig
from server.security import digest, matches, new_secret, parse_secret
from server.store import Store, crashpoint

log = logging.getLogger(__name__)
IDLE, DONE = "idle", "done"


class CoordinatorError(Exception):
    """A request the coordinator refuses; `server.service` maps each kind to one gRPC status."""


class UnknownDevice(CoordinatorError):
    """No credential, or one that names no device (or not with this secret)."""


class Unauthenticated(UnknownDevice):
    pass


class PermissionDenied(CoordinatorError):
    """A caller known, but not allowed this: a name enrolled by another device, another device's id."""


class Busy(CoordinatorError):
    """Too much in flight (uploads decoding, calls of one device): retry after a backoff."""


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
    """What every device must agree on: d, the canonical layout digest, the feature size (and, for
    virtual_classes or auto, the size of one example of the masked blocks' inputs; 0 for a text backbone)."""

    d: int
    layout_digest: str
    feature_dim: int
    input_dim: int = 0


@dataclass
class Device:
    device_id: str
    name: str
    kind: str
    memory_bytes: int
    codec: str
    credential_sha256: Optional[str] = None  # the digest of its credential (None: it has none, cannot call)
    told_done: bool = False  # it has been told that training is over (kept across restarts)
    enrolled_with: Optional[str] = None  # the enrollment token's id
    credential_seen: bool = False  # it has called with its credential (so it holds it)
    last_seen: float = 0.0  # the last call from it (any RPC: heartbeats, long polls, uploads)
    ready: bool = False  # it has asked for work since it registered (it is not still loading its model)
    revoked: bool = False  # the operator took its seat (Coordinator.revoke): refused until enrolled anew


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
    thresholds: Optional[np.ndarray] = None  # the theta uploads are rebuilt against (mask rounds)
    closing: bool = False  # the close has begun: no more uploads


NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@:-]{0,63}$")  # device names: printable, no spaces, <= 64
ALIVE_S = 2.0  # how often the rounds thread records that the coordinator is alive (deadlines over restarts)


class Coordinator:
    def __init__(self, config: ServerConfig, facts: ModelFacts, store: Store,
                 clock: Callable[[], float] = time.time,
                 evaluate: Optional[Callable[[np.ndarray, Optional[bytes]], Dict]] = None,
                 on_round: Optional[Callable[[Dict], None]] = None) -> None:
        config = resolved(config, facts.input_dim, config.num_classes, facts.feature_dim)  # local.loss auto -> a loss
        self.config, self.facts, self.store, self.clock = config, facts, store, clock
        self.evaluate, self.on_round = evaluate, on_round
        self.metrics = None  # server.metrics.Metrics when metrics_listen is set: updates and rounds are counted
        self.d = facts.d
        share = head_bits(config, config.num_classes, facts.feature_dim, facts.input_dim) // 8
        self.max_upload_bytes = config.max_upload_bytes or max(self.d // 8, share) + (1 << 20)
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)
        self.work = threading.Lock()
        self.enrolling = threading.Lock()
        self.listeners: List[Callable[[], None]] = []  # called (from any thread) after every state change
        self.devices: Dict[str, Device] = {}
        self.agg = Aggregator(config, self.d, config.num_classes, facts.feature_dim, facts.input_dim)
        self.counts = self.agg.counts
        a = config.aggregation
        self.shards = None if a.executor == SERIAL else make_executor(a.executor, a.workers, a.address)
        self._round_context: Optional[Tuple[Tuple[int, int], RoundContext]] = None
        self.open: Optional[OpenRound] = None
        self.closed_rounds = -1  # the last closed (or skipped) round
        self.head_rounds = 0  # head rounds closed
        self.mask_rounds = 0  # mask rounds closed
        self.history: List[Dict] = []
        self.kept = None  # the round whose model export bakes (deltamask.federation.keep_round)
        self.done = threading.Event()
        self.done_at_start = False  # training was over before this process started (a restart after the end)
        self._stopping = threading.Event()
        self._alive_at = 0.0
        self._told_unsaved: set = set()
        self._seen_unsaved: set = set()
        self._recover()

    @property
    def thresholds(self) -> np.ndarray:
        """The global theta of the open (or next) round, as wire thresholds: the aggregator's."""
        return self.agg.thresholds

    # --- start-up -----------------------------------------------------------------------------------
    def _recover(self) -> None:
        """Load the registry, history, head, counts and theta (each file checked against the digest its round
        recorded, rebuilt from the stored uploads when it differs); replay the uploads of an open round."""
        s = self.store
        for key, value in (("d", str(self.d)), ("layout_digest", self.facts.layout_digest)):
            stored = s.get_meta(key)
            if stored is None:
                s.set_meta(key, value)
            elif stored != value:
                raise ValueError(f"state in {s.folder} is for {key} = {stored}, this configuration has {value}; "
                                 f"use another state_dir")
        for row in s.devices():
            for flag in ("told_done", "credential_seen", "revoked"):
                row[flag] = bool(row[flag])
            self.devices[row["device_id"]] = Device(**row)
        rows = s.rounds()
        finished = [r for r in rows if r["state"] != "open"]
        self.history = [r["summary"] for r in finished if r["summary"]]
        self.kept = kept_of(self.config, self.history)
        if finished:
            self.closed_rounds = finished[-1]["round"]
            self.head_rounds = sum(1 for r in finished if r["phase"] in (HEAD, REFIT) and r["state"] == "closed")
            self.mask_rounds = sum(1 for r in finished if r["phase"] == MASK and r["state"] == "closed")
            loaded = recovery.load_checked(s, finished, self.d, self.config.num_classes, self.facts.feature_dim)
            if loaded.damaged:
                log.warning("state: %s; rebuilding from the stored uploads", "; ".join(loaded.damaged))
                loaded = recovery.rebuild(s, finished, self.config, self.d, self.facts.feature_dim, self._names(),
                                          input_dim=self.facts.input_dim)
            if loaded.head is not None:
                if self.agg.input_dim and len(loaded.head) < 3:
                    raise recovery.StateError(
                        f"{s.head_path}: the head was built without class anchors, and local.loss is now "
                        f"virtual_classes (it needs them from the head round): keep the loss the federation "
                        f"started with, or start a new one in another state_dir")
                self.agg.head = loaded.head
            self.counts.ones[:] = loaded.ones
            self.counts.masks = loaded.masks
            self.wire = loaded.wire
        else:
            self.wire = self.agg.theta_wire()
            s.save_theta(0, self.wire)
        self.agg.thresholds = decode_theta(self.wire, self.d)
        self.theta_digest = theta_digest(self.wire)
        self.head_wire = encode_head(*self.agg.head) if self.agg.head is not None else b""
        opened = [r for r in rows if r["state"] == "open"]
        if opened:
            self._replay(opened[-1])
        if self.config.finished(self.head_rounds, self.mask_rounds):
            self.done.set()
            self.done_at_start = True
        log.info("state: %d devices, %d rounds closed, %d mask rounds, open round: %s", len(self.devices),
                 self.closed_rounds + 1, self.mask_rounds, self.open.round if self.open else None)

    def _replay(self, row: Dict) -> None:
        r = OpenRound(row["round"], row["phase"], row["seed"], row["kappa"], row["selected"], row["deadline"],
                      row["mask_index"], bool(row["reset"]))
        r.task, r.thresholds = self._work(r), self.agg.thresholds
        if r.reset:
            self.counts.reset()
        for u in self.store.updates(r.round):
            payload = recovery.read_update(self.store, r.round, u)
            self._apply(r, u["device_id"], payload, u["sha256"], self._check(r, u["device_id"], payload), u["metrics"])
        # The round's deadline was set by a clock that kept running while no coordinator served: give the
        # round back the time it was down, so that devices training through the restart are not cut off.
        alive = float(self.store.get_meta("alive_at") or self.clock())
        down = max(0.0, self.clock() - alive)
        if down > 0:
            r.deadline += down
            self.store.set_deadline(r.round, r.deadline)
            log.info("round %d: deadline moved %.0f s later (the time no coordinator served)", r.round, down)
        self.open = r

    # --- identity -----------------------------------------------------------------------------------
    def register(self, name: str, kind: str, memory_bytes: int, codec: str,
                 credential_sha256: Optional[str] = None) -> Device:
        """Add a device under `name`, or mark an existing one as restarted (not ready until it asks for work).
        In-process and trusted: the RPC layer reaches it only through `enroll` or with the device's credential."""
        if not NAME.match(name or ""):
            raise InvalidUpdate(f"device name {name!r}: 1 to 64 letters, digits or ._@:- (starting with a letter "
                                f"or digit)")
        with self.lock:
            device = self._by_name(name)
            if device is not None:
                device.last_seen, device.ready = self.clock(), False
                return device
        device = Device(secrets.token_hex(8), name, kind, int(memory_bytes), codec, credential_sha256,
                        last_seen=self.clock())
        self.store.add_device(device.device_id, name, kind, device.memory_bytes, codec, credential_sha256)
        with self.lock:
            self.devices[device.device_id] = device
            log.info("registered %s (%s) as %s", name, kind, device.device_id)
            self._changed()
        return device

    def enroll(self, token: str, name: str, kind: str, memory_bytes: int, codec: str) -> Tuple[Device, str]:
        """Enroll `name` with an enrollment token; returns the device and its new credential (say it once).

        A fleet token enrolls new names only; a device token (made for one name) enrolls that name, and
        re-enrolls it when it exists (a reinstalled board): the old credential stops working. The token's
        expiry is checked on this clock, its uses are spent in the same transaction that writes the device.
        An enrollment whose reply was lost (the coordinator died after its commit, the network dropped) may be
        repeated with the same token, spent or not, until the device first calls with its credential: it
        gets a new credential and spends nothing."""
        if not NAME.match(name or ""):
            raise InvalidUpdate(f"device name {name!r}: 1 to 64 letters, digits or ._@:- (starting with a letter "
                                f"or digit)")
        try:
            token_id, secret = parse_secret(token, "dme")
        except ValueError:
            raise Unauthenticated("enrolling needs an enrollment token (deltamask-server token), or this device's "
                                  "credential to register again") from None
        with self.enrolling:
            existing = self._by_name(name)
            device_id = existing.device_id if existing else secrets.token_hex(8)
            credential = new_secret("dmc", device_id)
            with self.store.transaction() as db:
                row = db.execute("SELECT secret_sha256, name, expires_at, uses_left FROM tokens WHERE token_id = ?",
                                 (token_id,)).fetchone()
                if row is None or not matches(secret, row[0]):
                    raise Unauthenticated("unknown enrollment token")
                if row[1] is not None and row[1] != name:
                    raise PermissionDenied(f"this enrollment token is for device {row[1]!r}, not {name!r}")
                retry = (existing is not None and existing.enrolled_with == token_id
                         and not existing.credential_seen)
                if not retry:  # a repeated enrollment was admitted the first time: expiry and uses are spent
                    if row[2] <= self.clock():
                        raise Unauthenticated("enrollment token expired; make a new one (deltamask-server token)")
                    if row[3] is not None and row[3] <= 0:
                        raise Unauthenticated("enrollment token already used; make a new one "
                                              "(deltamask-server token)")
                    if existing is not None and row[1] is None:
                        raise PermissionDenied(f"device {name!r} is already enrolled: register with its credential, "
                                               f"or enroll with a token made for this name "
                                               f"(deltamask-server token --name)")
                if existing is not None:
                    db.execute("UPDATE devices SET credential_sha256 = ?, enrolled_with = ?, credential_seen = 0, "
                               "revoked = 0 WHERE device_id = ?", (digest(credential), token_id, device_id))
                else:
                    db.execute("INSERT INTO devices VALUES (?, ?, ?, ?, ?, ?, ?, 0, ?, 0, 0)",
                               (device_id, name, kind, int(memory_bytes), codec, time.time(), digest(credential),
                                token_id))
                if row[3] is not None and not retry:
                    db.execute("UPDATE tokens SET uses_left = uses_left - 1 WHERE token_id = ?", (token_id,))
            with self.lock:
                if existing is not None:
                    existing.credential_sha256, existing.ready = digest(credential), False
                    existing.enrolled_with, existing.credential_seen, existing.revoked = token_id, False, False
                    existing.last_seen = self.clock()
                    device = existing
                else:
                    device = Device(device_id, name, kind, int(memory_bytes), codec, digest(credential),
                                    enrolled_with=token_id, last_seen=self.clock())
                    self.devices[device_id] = device
                self._changed()
        log.info("enrolled %s (%s) as %s%s", name, kind, device_id, " (new credential)" if existing else "")
        return device, credential

    def revoke(self, name: str) -> Tuple[Device, bool]:
        """Take `name`'s seat (a lost or stolen board): its credential stops working at once and after a
        restart (a long poll it holds ends, an upload it is sending is refused), it is not selected again, the
        tokens made for its name are spent, a fleet token cannot enroll the name again and its enrollment cannot
        be repeated; a new token made for the name (deltamask-server token --name) enrolls it anew. What it
        uploaded before stays counted; an open round it was selected in closes without it (at its deadline, on
        min_quorum). Returns the device and whether it had been revoked already."""
        with self.enrolling:
            device = self._by_name(name)
            if device is None:
                raise InvalidUpdate(f"no device is enrolled as {name!r}")
            already = device.revoked
            self.store.revoke_device(device.device_id, name)
            with self.lock:
                device.credential_sha256, device.enrolled_with, device.ready = None, None, False
                device.revoked = True
                self._changed(round_event=True)  # its long polls look again, and end
        log.warning("revoked %s (%s)%s", name, device.device_id, " again" if already else "")
        return device, already

    def authenticate(self, credential: str) -> Device:
        """The device a credential belongs to; Unauthenticated for anything else (the reason stays vague)."""
        try:
            device_id, _ = parse_secret(credential, "dmc")
        except ValueError:
            raise Unauthenticated("this call needs a device credential (metadata authorization: Bearer ...)") \
                from None
        with self.lock:
            device = self.devices.get(device_id)
        if device is None or not matches(credential, device.credential_sha256):
            raise Unauthenticated("unknown or replaced device credential: enroll again with a token")
        if not device.credential_seen:  # from now on its enrollment cannot be repeated (recorded by flush)
            with self.lock:  # unless revoked or enrolled anew since the check above
                if matches(credential, device.credential_sha256):
                    device.credential_seen = True
                    self._seen_unsaved.add(device.device_id)
        return device

    def authorize_operator(self, credential: str) -> None:
        try:
            parse_secret(credential, "dmo")
        except ValueError:
            raise Unauthenticated("this call needs the operator credential (state_dir/operator.credential)") \
                from None
        if not matches(credential, self.store.get_meta("operator_sha256")):
            raise Unauthenticated("wrong operator credential")

    # --- requests -----------------------------------------------------------------------------------
    def heartbeat(self, device_id: str) -> int:
        with self.lock:
            self._device(device_id).last_seen = self.clock()
            return self.open.round if self.open else self.closed_rounds + 1

    def poll_task(self, device_id: str, after_round: int) -> Optional[Task]:
        """The device's answer now: its task when it is selected in an open round after `after_round`, DONE
        when training is over, None when there is nothing yet (ask again after a change)."""
        with self.lock:
            device = self._device(device_id)
            device.last_seen = self.clock()
            if not device.ready:
                device.ready = True
                self._changed()
            if self.done.is_set():
                if not device.told_done:  # kept by flush_told (not here: this runs on the server's event loop)
                    device.told_done = True
                    self._told_unsaved.add(device_id)
                    self._changed()
                return Task(DONE, self.closed_rounds)
            r = self.open
            if (r is not None and not r.closing and r.round > after_round and device_id in r.selected
                    and device_id not in r.received):
                return self._task(r)
            return None

    def idle(self) -> Task:
        with self.lock:
            return Task(IDLE, self.open.round if self.open else self.closed_rounds + 1)

    def get_task(self, device_id: str, after_round: int, wait_s: float) -> Task:
        """Long-poll in the calling thread (in-process use and tests; the RPC waits without a thread)."""
        until = time.monotonic() + max(0.0, min(wait_s, 300.0))
        while True:
            task = self.poll_task(device_id, after_round)
            if task is not None:
                return task
            with self.lock:
                left = until - time.monotonic()
                if left <= 0 or self._stopping.is_set():
                    return self.idle()
                self.cond.wait(min(left, 1.0))

    def theta_for(self, device_id: str, round_index: int) -> bytes:
        """The theta wire bytes of the open round."""
        with self.lock:
            self._device(device_id)
            r = self._open_round(round_index, device_id)
            if r.phase == HEAD:
                raise NotOpen(f"round {round_index} is a head round: no theta to fetch")
            return self.wire

    def check_upload(self, device_id: str, round_index: int, total_length: int, sha: str) -> None:
        """Refuse an upload from its header: unknown device, round not open for it, too large."""
        if total_length > self.max_upload_bytes:
            raise TooLarge(f"update of {total_length} bytes; the limit is {self.max_upload_bytes} bytes")
        with self.lock:
            self._device(device_id)
            if self._duplicate(round_index, device_id, sha):
                return
            self._open_round(round_index, device_id)

    def submit(self, device_id: str, round_index: int, payload: bytes, reference_digest: str,
               metrics: Dict) -> bool:
        """Take one update; returns True when it is a duplicate of one already taken (nothing changes)."""
        sha = sha256_hex(payload)
        if len(payload) > self.max_upload_bytes:
            raise TooLarge(f"update of {len(payload)} bytes; the limit is {self.max_upload_bytes} bytes")
        with self.lock:
            self._device(device_id)
            if self._duplicate(round_index, device_id, sha):
                return True
            r = self._open_round(round_index, device_id)
        started = time.perf_counter()
        checked = self._check(r, device_id, payload, reference_digest)
        decode_s = time.perf_counter() - started
        with self.work:
            with self.lock:
                self._device(device_id)  # revoked while its upload was on the way: refused
                if self._duplicate(round_index, device_id, sha):
                    return True
                if self.open is not r or r.closing:
                    raise NotOpen(f"round {round_index} closed while the update was being decoded")
            self.store.add_update(r.round, device_id, payload, sha, reference_digest, metrics)
            with self.lock:
                self._apply(r, device_id, payload, sha, checked, metrics)
                r.decode_s[device_id] = decode_s
                r.last_upload = time.perf_counter()
                self._changed()
        if self.metrics is not None:
            self.metrics.update_taken(self.devices[device_id].kind, r.phase, len(payload), decode_s, metrics)
        return False

    def status(self) -> Dict:
        with self.lock:
            return {"round": self.open.round if self.open else self.closed_rounds + 1,
                    "phase": DONE if self.done.is_set() else (self.open.phase if self.open else IDLE),
                    "registered": sum(not d.revoked for d in self.devices.values()), "online": len(self._online()),
                    "history": list(self.history)}

    def device_list(self) -> List[Dict]:
        """The enrolled devices, by name, as an operator sees them."""
        with self.lock:
            online, now = set(self._online()), self.clock()
            return [{"device_id": d.device_id, "name": d.name, "kind": d.kind, "online": d.device_id in online,
                     "seen_s_ago": max(0.0, now - d.last_seen) if d.last_seen else -1.0, "codec": d.codec,
                     "told_done": d.told_done, "revoked": d.revoked}
                    for d in sorted(self.devices.values(), key=lambda d: d.name)]

    def update_list(self, first_round: int = 0) -> List[Dict]:
        """Every update taken from `first_round` on, with its round's phase, its device's name and the
        measurements the device sent."""
        phases = {r["round"]: r["phase"] for r in self.store.rounds()}
        with self.lock:
            names = {d.device_id: d.name for d in self.devices.values()}
        return [{**u, "phase": phases.get(u["round"], MASK), "name": names.get(u["device_id"], "")}
                for u in self.store.updates_from(first_round)]

    def flush_told(self) -> None:
        """Record which devices have been told that training is over (a restart tells the others), and which
        have called with their credential (kept off the event loop: the rounds thread and the CLI call this)."""
        with self.lock:
            told, self._told_unsaved = self._told_unsaved, set()
            seen, self._seen_unsaved = self._seen_unsaved, set()
        if told or seen:
            self.store.set_flags(sorted(told), sorted(seen))

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def everyone_told_done(self) -> bool:
        """Whether every device that may still be waiting has been told that training is over: the online
        ones; after a restart past the end, every enrolled one (they cannot be seen until they call)."""
        self.flush_told()
        with self.lock:
            online = set(self._online())
            return all(d.told_done for d in self.devices.values()
                       if not d.revoked and (self.done_at_start or d.device_id in online))

    # --- rounds -------------------------------------------------------------------------------------
    def step(self) -> None:
        """Advance the state machine as far as it can go now (open, or close, a round)."""
        summary = None
        with self.work:
            with self.lock:
                if self.done.is_set():
                    return
                r = self.open
                if r is None:
                    online = self._online()
                    need = self.config.expected_clients if self.closed_rounds < 0 else self.config.min_quorum
                    if len(online) < need:
                        return
                    by_name = {self.devices[i].name: i for i in online}
                elif set(r.selected) <= set(r.received) or self.clock() >= r.deadline:
                    r.closing = True
                else:
                    return
            if r is None:
                self._open(by_name)
                return
            summary = self._close(r)
        self._finish(summary, r.seed)

    def run(self, poll_s: float = 0.2) -> None:
        """Step until done or stopped (the coordinator's background thread)."""
        while not self._stopping.is_set() and not self.done.is_set():
            self.step()
            if time.monotonic() - self._alive_at >= ALIVE_S:
                self.store.set_meta("alive_at", repr(self.clock()))
                self.flush_told()
                self._alive_at = time.monotonic()
            with self.lock:
                if not self.done.is_set():
                    self.cond.wait(poll_s)

    def stop(self) -> None:
        self._stopping.set()
        with self.lock:
            self._changed(round_event=True)
        if self.shards is not None:
            self.shards.close()

    def _open(self, by_name: Dict[str, str]) -> None:
        """Open the next round as the policy plans it, over the online devices' names (under `work`)."""
        c = self.config
        plan = plan_round(c, self.closed_rounds + 1, self.head_rounds, self.mask_rounds, list(by_name))
        if plan is None:
            with self.lock:
                self.done.set()
                self._changed(round_event=True)
            return
        selected = [by_name[name] for name in plan.selected]
        r = OpenRound(plan.index, plan.phase, plan.seed, plan.kappa, selected, self.clock() + c.round_deadline_s,
                      plan.mask_round, plan.reset, task=device_task(c, plan))
        self.store.open_round({k: v for k, v in vars(r).items() if k != "thresholds"})
        crashpoint("open-row")
        if plan.phase == MASK:
            self.agg.open_mask(plan)
        r.thresholds = self.agg.thresholds
        with self.lock:
            self.open = r
            self._changed(round_event=True)
        log.info("round %d (%s) open: %d of %d online devices selected, deadline in %.0f s", plan.index,
                 plan.phase, len(selected), len(by_name), c.round_deadline_s)

    def _close(self, r: OpenRound) -> Dict:
        """Close the open round (under `work`, not `lock`): aggregate, persist, then publish the result."""
        started = time.perf_counter()
        c = self.config
        quorum = min(c.min_quorum, len(r.selected))
        state = "closed" if len(r.received) >= quorum else "skipped"
        wire, head_sha = self.wire, None
        if state == "closed" and r.phase in (HEAD, REFIT):
            head_sha = self.store.save_head(encode_head(*self.agg.close_head(r.shares, r.seed, r.phase)),
                                            refit=r.phase == REFIT)
        elif state == "closed":
            self.agg.close_mask()
            wire = self.agg.theta_wire()
        else:  # skipped: the counts go back to what they were when the round opened
            self._restore_counts(r)
        head_rounds = self.head_rounds + (state == "closed" and r.phase in (HEAD, REFIT))
        mask_rounds = self.mask_rounds + (state == "closed" and r.phase == MASK)
        counts_sha = self.store.save_counts(r.round, self.counts.ones)
        crashpoint("close-counts")
        theta_sha = self.store.save_theta(r.round + 1, wire)
        crashpoint("close-theta")
        up = {dev: 8 * n / self.d for dev, n in r.nbytes.items()}
        summary = {"round": r.round, "phase": r.phase, "state": state, "selected": len(r.selected),
                   "received": len(r.received), "lost": sorted(set(r.selected) - set(r.received)),
                   "uplink_bpp": float(np.mean(list(up.values()))) if up else 0.0, "uplink_bpp_by_device": up,
                   "downlink_bpp": 8 * len(self.wire) / self.d if r.phase != HEAD else 0.0,
                   "decode_s": round(max(r.decode_s.values()), 4) if r.decode_s else 0.0,
                   "counts_masks": self.counts.masks, "head_rounds": head_rounds, "mask_rounds": mask_rounds,
                   "counts_sha256": counts_sha, "next_theta_sha256": theta_sha}
        if r.phase != MASK:
            summary["head"] = c.head
        if state == "closed":  # what the round produced, to compare with the simulator's (parity)
            if r.phase != MASK:
                summary["head_sha256"] = head_sha
            else:
                summary["theta_sha256"] = theta_sha
        summary["close_s"] = round(time.perf_counter() - started, 4)
        if r.last_upload:
            summary["round_close_s"] = round(time.perf_counter() - r.last_upload, 4)
        self.store.close_round(r.round, state, summary)
        crashpoint("close-row")
        self.store.prune(r.round - 1, keep_theta=None if self.kept is None else self.kept.round + 1)
        with self.lock:
            self.wire, self.theta_digest = wire, theta_sha
            if head_sha is not None:
                self.head_wire = encode_head(*self.agg.head)
            self.head_rounds, self.mask_rounds = head_rounds, mask_rounds
            self.closed_rounds, self.open = r.round, None
            self.history.append(summary)
            if c.finished(self.head_rounds, self.mask_rounds):
                self.done.set()
            self._changed(round_event=True)
        log.info("round %d %s: %d of %d updates, %.2f s to close", r.round, state, len(r.received),
                 len(r.selected), summary["close_s"])
        return summary

    def _finish(self, summary: Dict, seed: int) -> None:
        """After a close, outside the locks: score the head or theta on held-out data, report the round."""
        if self.evaluate is not None and summary["state"] == "closed" and self.agg.head is not None:
            mask = summary["phase"] != HEAD  # a mask round, or the refit: the head on theta * w
            scores = self.evaluate(self.agg.head, self.thresholds if mask else None, eval_seed(seed))
            summary.update(scores)
            self.store.close_round(summary["round"], summary["state"], summary)
        if summary["state"] == "closed":
            self.kept = keep_round(self.config, self.kept, summary["round"], summary["phase"],
                                   summary.get(KEPT_BY[summary["phase"]]))
        if self.metrics is not None:
            self.metrics.round_closed(summary)
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
            if r.phase != MASK:
                return self.agg.decode_share(payload, r.phase)
            name = self.devices[device_id].name
            if self.shards is None:
                packed, digest_ = rebuild_client_mask(decode_payload(payload, self.d, r.thresholds), r.thresholds,
                                                      r.seed, name, self.config.reference)
            else:  # the rebuild as shards over index ranges, on the configured pool or Ray cluster
                got = aggregate(self._context(r), [(name, payload)], self.shards)
                if got.errors:
                    raise InvalidUpdate(got.errors[name])
                packed, digest_ = np.packbits(got.ones.astype(bool), bitorder="little"), got.digests[name]
        except PayloadError as exc:
            raise InvalidUpdate(f"corrupt update: {exc}") from None
        if reference_digest is not None and digest_ != reference_digest:
            raise InvalidUpdate("reference mask digest does not match: the device drew its reference from a "
                                "different theta or seed")
        return packed

    def _context(self, r: OpenRound) -> RoundContext:
        """The round's shard context, one object a round (Ray ships it to its object store once)."""
        cached = self._round_context
        if cached is None or cached[0] != (r.round, r.seed) or cached[1].thresholds is not r.thresholds:
            self._round_context = cached = ((r.round, r.seed), RoundContext(r.thresholds, r.seed, self.config.reference))
        return cached[1]

    def _apply(self, r: OpenRound, device_id: str, payload: bytes, sha: str, checked, metrics: Dict) -> None:
        if r.phase != MASK:
            r.shares[self.devices[device_id].name] = (checked, recovery.declared_examples(metrics))
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
    def _changed(self, round_event: bool = False) -> None:
        """Wake whoever waits for a change (under `lock`); `listeners` hear of rounds opening and closing only
        (what a long poll waits for), not of every heartbeat and upload."""
        self.cond.notify_all()
        if round_event:
            for listener in self.listeners:
                listener()

    def _device(self, device_id: str) -> Device:
        device = self.devices.get(device_id)
        if device is None:
            raise UnknownDevice(f"unknown device id {device_id!r}: enroll first")
        if device.revoked:
            raise Unauthenticated("this device was revoked by the operator: enroll again with a token for its name")
        return device

    def _by_name(self, name: str) -> Optional[Device]:
        with self.lock:
            return next((d for d in self.devices.values() if d.name == name), None)

    def _names(self) -> Dict[str, str]:
        return {i: d.name for i, d in self.devices.items()}

    def _open_round(self, round_index: int, device_id: str) -> OpenRound:
        r = self.open
        if r is None or r.round != round_index or r.closing:
            current = r.round if r is not None and not r.closing else None
            raise NotOpen(f"round {round_index} is not open (open round: {current})")
        if device_id not in r.selected:
            raise NotOpen(f"device {device_id} is not selected in round {round_index}")
        return r

    def _online(self) -> List[str]:
        """Devices that may be sampled: ready, and heard from within two heartbeat intervals."""
        horizon = self.clock() - 2 * self.config.heartbeat_interval_s
        return [d.device_id for d in self.devices.values()
                if d.ready and not d.revoked and d.last_seen >= horizon]

    def _task(self, r: OpenRound) -> Task:
        if r.phase == HEAD:
            return Task(HEAD, r.round, r.task, r.deadline, head=self.head_wire)
        return Task(r.phase, r.round, r.task, r.deadline, self.theta_digest, len(self.wire), self.head_wire)

    def _work(self, r: OpenRound) -> DeviceTask:
        """The task of a round opened before a restart (the plan's fields are in its row)."""
        c = self.config
        return DeviceTask(r.phase, r.round, r.seed, r.kappa, c.codec, c.reference, c.head, c.lda_covariance,
                          c.lda_rank, c.local, c.ranking)


__all__ = ["Busy", "Conflict", "Coordinator", "CoordinatorError", "Device", "InvalidUpdate", "ModelFacts",
           "NotOpen", "PermissionDenied", "Task", "TooLarge", "Unauthenticated", "UnknownDevice"]
