"""The edge agent: register, then wait for selection -> fetch theta -> train -> encode -> upload, forever.

    Agent(load_config("client.yaml")).run()

The learning is the core library's local learner (`deltamask.learn.learner.LocalLearner`, the one the
simulator runs: the head share, or train -> reference mask -> own sample -> delta -> KL rank -> encode),
seeded by this device's enrolled name. This module only moves bytes and keeps the device alive: heartbeats from a background thread,
reconnects with backoff, a resumable theta download, psutil figures in every update.
"""
import logging
import os
import resource
import sys
import threading
import time
from pathlib import Path

import grpc
import psutil

from deltamask.errors import PayloadError
from deltamask.transfer import sha256_hex
from deltamask.v1 import coordinator_pb2 as pb
from edge_client.config import AgentConfig
from edge_client.energy import open_meter
from edge_client.sdnotify import Watchdog, notify
from edge_client.transport import Backoff, connect, fetch_theta, retrying, submit_update

log = logging.getLogger(__name__)
KINDS = {"rpi4": pb.RPI4, "jetson-nano": pb.JETSON_NANO, "coral": pb.CORAL, "laptop": pb.LAPTOP,
         "server": pb.SERVER}
VERSION = "0.1.0"


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.credential = _read_secret(config.credential_path)
        self.stub = connect(config.server, config.ca, lambda: self.credential, config.max_backoff_s, config.insecure,
                            config.client_cert, config.client_key)
        self.stop = threading.Event()
        self.device_id = ""
        self.working_round = -1
        self.head = (b"", "")  # the last head received and its digest: tasks leave it out while it is current
        self.process = psutil.Process()
        self.watchdog = Watchdog()
        self.backoff = Backoff(cap_s=config.max_backoff_s, on_wait=self.watchdog.ping)
        e = config.energy
        self.meter = open_meter(e.meter, rate_hz=e.rate_hz, csv_path=e.csv, **e.options)

    # --- the loop -----------------------------------------------------------------------------------
    def run(self) -> int:
        """Serve rounds until the coordinator says training is over (or `stop` is set). Returns 0."""
        self.register()
        self.meter.start()
        threading.Thread(target=self._heartbeats, name="heartbeat", daemon=True).start()
        self.prepare()
        notify("READY=1")
        done = -1
        while not self.stop.is_set():
            self.watchdog.ping()
            notify(f"STATUS=waiting for a task after round {done}")
            try:
                task = self.next_task(done)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.UNAUTHENTICATED:  # the coordinator forgot us: register again
                    log.warning("%s; registering again", exc.details())
                    self.register()
                else:
                    log.warning("waiting for a task: %s %s", exc.code().name, exc.details())
                    self.stop.wait(self.backoff.next_wait())
                continue
            if task.phase == pb.DONE:
                log.info("training is over (last round %d)", task.round)
                if self.config.exit_when_done:
                    break
                self.stop.wait(self.config.task_wait_s)
                continue
            if task.phase == pb.IDLE:
                continue
            self.working_round = task.round
            try:
                self.serve(task)
            except RoundSkipped as exc:
                log.warning("%s", exc)
            except PayloadError as exc:  # a task whose head does not decode: this round only
                log.warning("round %d skipped: %s", task.round, exc)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.UNAUTHENTICATED:  # the coordinator forgot us: register again
                    log.warning("round %d: %s; registering again", task.round, exc.details())
                    self.register()
                else:
                    log.warning("round %d refused: %s %s", task.round, exc.code().name, exc.details())
            done = task.round
        notify("STOPPING=1")
        self.stop.set()
        self.meter.close()
        return 0

    def next_task(self, done: int) -> pb.Task:
        """Long-poll for the next round this device is selected in (IDLE when the wait runs out)."""
        request = pb.TaskRequest(device_id=self.device_id, after_round=done, wait_s=self.config.task_wait_s,
                                 head_sha256=self.head[1])
        return retrying(lambda: self.stub.GetTask(request, timeout=self.config.task_wait_s + 30, wait_for_ready=True),
                        "wait for a task", self.backoff, self.stop)

    def serve(self, task: pb.Task) -> None:
        """One round: train what the task asks for and upload it."""
        cpu0, started = self._cpu_s(), time.perf_counter()
        log.info("round %d (%s): selected", task.round, pb.Phase.Name(task.phase).lower())
        self.meter.totals(reset=True)
        payload, reference_digest, extra = self.work(task)
        # download + train + encode; the upload's own energy cannot travel in the upload: it is logged
        energy_j = sum(p.joules for p in self.meter.totals().values())
        metrics = pb.Metrics(num_examples=self.examples, peak_rss_bytes=_peak_rss_bytes(),
                             cpu_s=self._cpu_s() - cpu0, energy_j=energy_j,
                             energy_meter="" if self.config.energy.meter == "none" else self.config.energy.meter,
                             **extra)
        header = pb.UpdateHeader(device_id=self.device_id, round=task.round, reference_digest=reference_digest,
                                 metrics=metrics)
        with self.meter.phase("upload") as upload:
            reply = submit_update(self.stub, header, payload, self.backoff, self.stop)
        log.info("round %d: uploaded %d bytes (%.4f bpp)%s in %.1f s; %.1f J (upload %.2f J)", task.round,
                 len(payload), 8 * len(payload) / self.d, " (duplicate)" if reply.duplicate else "",
                 time.perf_counter() - started, energy_j, upload.joules)

    # --- set-up -------------------------------------------------------------------------------------
    def register(self) -> None:
        """Register with the stored credential; without one (or when the coordinator no longer knows it),
        enroll with the enrollment token and store the credential it returns (mode 0600)."""
        c = self.config
        request = pb.RegisterRequest(name=c.name, kind=KINDS[c.kind], memory_bytes=psutil.virtual_memory().total,
                                     preferred_codec=c.codec, agent_version=VERSION)
        call = lambda: self.stub.Register(request, timeout=30, wait_for_ready=True)  # noqa: E731
        if self.credential:
            try:
                self.registration = retrying(call, "register", self.backoff, self.stop)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAUTHENTICATED or not c.token():
                    raise
                log.warning("the coordinator refused the stored credential (%s); enrolling again", exc.details())
                self.credential = ""
        if not self.credential:
            if not c.token():
                raise EnrollmentError(f"{c.name} is not enrolled: set enrollment_token (or enrollment_token_file) "
                                      f"to a token from `deltamask-server token`")
            request.enrollment_token = c.token()
            self.registration = retrying(call, "enroll", self.backoff, self.stop)
            self.credential = self.registration.credential
            _write_secret(c.credential_path, self.credential)
            log.info("enrolled; credential stored in %s (mode 0600)", c.credential_path)
        self.device_id = self.registration.device_id
        log.info("registered as %s", self.device_id)

    def prepare(self) -> None:
        """Build the backbone the coordinator names, check the layout, and run the prefix over local data once."""
        from deltamask.data import device_share, load_dataset
        from deltamask.errors import ModelError
        from deltamask.learn.learner import LocalLearner, Model

        reg, c = self.registration, self.config
        model = Model(reg.backbone, c.weights, reg.blocks, reg.image_size, reg.num_classes)
        self.d = model.d
        if self.d != reg.d or model.masks.layout_digest() != reg.layout_digest:
            raise ModelError(f"{reg.backbone} here masks d = {self.d} weights (layout {model.masks.layout_digest()[:12]}),"
                             f" the coordinator d = {reg.d} (layout {reg.layout_digest[:12]}): versions differ")
        data, s = load_dataset(c.data.dataset, "train", c.data.root), c.data
        share = device_share(data.labels, s.samples, s.clients, s.index, s.alpha, s.min_per_client, s.seed)
        images, labels = data.images[share], data.labels[share]
        started = time.perf_counter()
        inputs = model.prefix(images, lambda batches: _progress(batches, c.progress, "prefix", unit="batch"),
                              cache=Path(os.path.expanduser(c.cache_dir)), runtime=c.prefix_runtime)
        log.info("prefix outputs of %d images in %.1f s", len(labels), time.perf_counter() - started)
        self.learner = LocalLearner(model, inputs, labels)
        self.examples = len(labels)
        log.info("%s ready: d = %d, %d local examples", reg.backbone, self.d, len(labels))

    # --- rounds -------------------------------------------------------------------------------------
    def work(self, task: pb.Task):
        """One round's work with the core's local learner: the head share, or theta -> train -> encode."""
        from deltamask.headwire import decode_head
        from deltamask.thetawire import decode_theta

        work = _device_task(task)
        blob = self.head_of(task)
        head = decode_head(blob, task.num_classes, task.feature_dim) if blob else None
        if blob:
            self.head = (blob, task.head_sha256 or sha256_hex(blob))
        on_theta = task.phase in (pb.MASK, pb.REFIT)  # the refit: the head share on theta * w
        if task.phase == pb.MASK and work.local.loss == "virtual_classes" and (head is None or len(head) < 3):
            raise RoundSkipped(f"round {task.round}: the task asks for virtual_classes, but its head carries no "
                               f"class anchors")
        started = time.perf_counter()
        thresholds = None
        if on_theta:
            with self.meter.phase("download"):
                wire = self.fetch_theta(task)
            thresholds = decode_theta(wire, self.d)
        fetched = time.perf_counter()
        bar = _progress(None, self.config.progress, f"round {task.round}",
                        total=work.local.epochs * self.examples, unit="img") if task.phase == pb.MASK else None

        def progress(images: int) -> None:  # the watchdog is fed batch by batch: a round may take an hour
            self.watchdog.ping()
            if bar is not None:
                bar.update(images)

        self.watchdog.ping()
        with self.meter.phase("train"):
            reply = self.learner.work(work, self.config.name, head, thresholds, progress)
        if bar is not None:
            bar.close()
        self.watchdog.ping()
        extra = {"fetch_s": fetched - started, "train_s": time.perf_counter() - fetched, "delta": reply.delta,
                 "kept": reply.kept}
        return reply.payload, reply.reference_digest, extra

    def head_of(self, task: pb.Task) -> bytes:
        """The task's head: sent with it, or (left out) the one this device holds under the digest it names.
        PayloadError when the bytes sent do not match the digest; RoundSkipped when it names a head not held."""
        if task.head:
            if task.head_sha256 and sha256_hex(task.head) != task.head_sha256:
                raise PayloadError("the task's head does not match its digest")
            return task.head
        if task.head_sha256 and task.head_sha256 != self.head[1]:
            raise RoundSkipped(f"round {task.round}: the task names a head this device does not hold")
        return self.head[0] if task.head_sha256 else b""

    def fetch_theta(self, task: pb.Task, attempts: int = 3) -> bytes:
        """The round's theta, whole and with the digest the task names; a corrupt transfer or a digest that
        differs is fetched again, then the round is given up (RoundSkipped), never the agent."""
        from deltamask.thetawire import theta_digest

        for attempt in range(1, attempts + 1):
            try:
                wire = fetch_theta(self.stub, self.device_id, task.round, 4 * self.d + (1 << 20), self.backoff,
                                   self.stop)
            except PayloadError as exc:
                log.warning("round %d: theta transfer %d of %d is corrupt (%s)", task.round, attempt, attempts, exc)
                continue
            if theta_digest(wire) == task.theta_digest:
                return wire
            log.warning("round %d: theta digest %s differs from the task's %s (try %d of %d)", task.round,
                        theta_digest(wire)[:12], task.theta_digest[:12], attempt, attempts)
        raise RoundSkipped(f"round {task.round}: no intact theta after {attempts} tries; skipping the round")

    # --- background ---------------------------------------------------------------------------------
    def _heartbeats(self) -> None:
        interval = max(0.5, self.registration.heartbeat_interval_s)
        while not self.stop.wait(interval):
            try:
                self.stub.Heartbeat(pb.HeartbeatRequest(device_id=self.device_id, round=max(0, self.working_round)),
                                    timeout=interval, wait_for_ready=True)
            except grpc.RpcError as exc:
                log.debug("heartbeat: %s", exc.code().name)

    def _cpu_s(self) -> float:
        t = self.process.cpu_times()
        return t.user + t.system


class EnrollmentError(Exception):
    """The device has no credential and no enrollment token, or the coordinator refused both."""


def _read_secret(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except FileNotFoundError:
        return ""


def _write_secret(path: str, text: str) -> None:
    """Mode 0600 from creation; the folder 0700."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


class RoundSkipped(Exception):
    """This round cannot be served (no intact theta, a task this agent cannot run); wait for the next."""


def _device_task(task: pb.Task):
    """The core's DeviceTask from the gRPC Task (the coordinator's policy, as it sent it)."""
    from deltamask.federation import DeviceTask, LocalTraining

    head = task.phase in (pb.HEAD, pb.REFIT)
    try:
        local = LocalTraining(epochs=1 if head else task.epochs, batch_size=task.batch_size,
                              lr=task.lr, loss=task.loss, head_epochs=task.epochs if head else 1,
                              head_lr=task.lr)
        local.check()
    except ValueError as exc:
        raise RoundSkipped(f"round {task.round}: the task cannot be run: {exc}") from None
    return DeviceTask({pb.HEAD: "head", pb.REFIT: "refit"}.get(task.phase, "mask"), task.round, task.seed, task.kappa, task.codec, task.reference,
                      task.head_kind, task.lda_covariance, task.lda_rank, local, task.ranking or "kl")


def _peak_rss_bytes() -> int:
    """This process's peak resident set size (kilobytes on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _progress(iterable, enabled: bool, desc: str, **kw):
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=desc, file=sys.stderr, mininterval=2.0, **kw)


__all__ = ["Agent", "EnrollmentError", "RoundSkipped"]
