"""The edge agent: register, then wait for selection -> fetch theta -> train -> encode -> upload, forever.

    Agent(load_config("client.yaml")).run()

The learning is the core library's: `deltamask.training.train_mask` (the same function the simulator
runs), `deltamask.rounds.client_update` (reference mask -> own sample -> delta -> KL rank -> encode).
This module only moves bytes and keeps the device alive: heartbeats from a background thread,
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
import numpy as np
import psutil

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
        self.stub = connect(config.server)
        self.stop = threading.Event()
        self.device_id = ""
        self.working_round = -1
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
        request = pb.TaskRequest(device_id=self.device_id, after_round=done, wait_s=self.config.task_wait_s)
        return retrying(lambda: self.stub.GetTask(request, timeout=self.config.task_wait_s + 30, wait_for_ready=True),
                        "wait for a task", self.backoff, self.stop)

    def serve(self, task: pb.Task) -> None:
        """One round: train what the task asks for and upload it."""
        cpu0, started = self._cpu_s(), time.perf_counter()
        log.info("round %d (%s): selected", task.round, pb.Phase.Name(task.phase).lower())
        self.meter.totals(reset=True)
        if task.phase == pb.HEAD:
            payload, reference_digest, extra = self.train_head(task)
        else:
            payload, reference_digest, extra = self.train_mask(task)
        # download + train + encode; the upload's own energy cannot travel in the upload: it is logged
        energy_j = sum(p.joules for p in self.meter.totals().values())
        metrics = pb.Metrics(num_examples=len(self.labels), peak_rss_bytes=_peak_rss_bytes(),
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
        c = self.config
        request = pb.RegisterRequest(name=c.name, kind=KINDS[c.kind], memory_bytes=psutil.virtual_memory().total,
                                     preferred_codec=c.codec, agent_version=VERSION)
        self.registration = retrying(lambda: self.stub.Register(request, timeout=30, wait_for_ready=True),
                                     "register", self.backoff, self.stop)
        self.device_id = self.registration.device_id
        log.info("registered as %s", self.device_id)

    def prepare(self) -> None:
        """Build the backbone the coordinator names, check the layout, and run the prefix over local data once."""
        import torch
        from torch import nn

        from deltamask import prefix_cache
        from deltamask.data import dirichlet_partition, load_dataset, prepare_images
        from deltamask.errors import ModelError
        from deltamask.masking import MaskedModule
        from deltamask.models import load_backbone

        reg, c = self.registration, self.config
        backbone = load_backbone(reg.backbone, weights=c.weights, blocks=reg.blocks, size=reg.image_size)
        self.masks = MaskedModule(backbone.masked)
        self.d = self.masks.d
        if self.d != reg.d or self.masks.layout_digest() != reg.layout_digest:
            raise ModelError(f"{reg.backbone} here masks d = {self.d} weights (layout {self.masks.layout_digest()[:12]}),"
                             f" the coordinator d = {reg.d} (layout {reg.layout_digest[:12]}): versions differ")
        self.head = nn.Linear(backbone.feature_dim, reg.num_classes)
        self.net = nn.Sequential(backbone.masked, self.head)
        data = load_dataset(c.data.dataset, "train", c.data.root)
        images, labels = data.images, data.labels
        if 0 < c.data.samples < len(labels):
            index = np.sort(np.random.default_rng(c.data.seed).permutation(len(labels))[:c.data.samples])
            images, labels = images[index], labels[index]
        if c.data.clients > 1:
            part = dirichlet_partition(labels, c.data.clients, c.data.alpha, c.data.min_per_client,
                                       seed=c.data.seed)[c.data.index]
            images, labels = images[part], labels[part]
        folder = Path(os.path.expanduser(c.cache_dir))
        key = prefix_cache.cache_key(backbone, images, f"{reg.image_size}")
        inputs = prefix_cache.load(folder, key)
        if inputs is None:
            started = time.perf_counter()
            pre = backbone.preprocessing
            tensor = prepare_images(images, reg.image_size, pre.channels, pre.mean, pre.std)
            batches = _progress(torch.split(tensor, 256), c.progress, "prefix", unit="batch")
            inputs = prefix_cache.run_prefix(backbone, batches)
            prefix_cache.save(inputs, folder, key)
            log.info("prefix outputs of %d images computed in %.1f s", len(labels), time.perf_counter() - started)
        self.inputs, self.labels = inputs, torch.as_tensor(labels)
        log.info("%s ready: d = %d, %d local examples", reg.backbone, self.d, len(labels))

    # --- rounds -------------------------------------------------------------------------------------
    def train_head(self, task: pb.Task):
        """The linear-probing round: fit a head on the frozen, unmasked backbone's features."""
        from deltamask.headwire import encode_head
        from deltamask.masking import FIXED
        from deltamask.sampling import sample_seed
        from deltamask.training import features_of, linear_probe

        started = time.perf_counter()
        with self.meter.phase("train"):
            self.masks.set_mode(FIXED, np.ones(self.d, dtype=bool))
            features = features_of(self.net[0], self.inputs)
            self.watchdog.ping()
            head = linear_probe(features, self.labels, task.num_classes, task.epochs or 20,
                                seed=sample_seed(task.seed, self.device_id) % 2 ** 31)
        self.watchdog.ping()
        payload = encode_head(head.weight.detach().numpy(), head.bias.detach().numpy())
        return payload, "", {"train_s": time.perf_counter() - started}

    def train_mask(self, task: pb.Task):
        """A DeltaMask round: theta -> local training -> the KL-ranked delta, encoded."""
        import torch

        from deltamask.codecs import get_codec
        from deltamask.headwire import decode_head
        from deltamask.rounds import client_update
        from deltamask.sampling import sample_seed, thresholds_to_theta
        from deltamask.thetawire import decode_theta, theta_digest
        from deltamask.training import TrainSettings, train_mask

        started = time.perf_counter()
        with self.meter.phase("download"):
            wire = fetch_theta(self.stub, self.device_id, task.round, 4 * self.d + (1 << 20), self.backoff,
                               self.stop)
        if theta_digest(wire) != task.theta_digest:
            raise RuntimeError(f"round {task.round}: theta digest differs from the task's")
        thresholds = decode_theta(wire, self.d)
        weight, bias = decode_head(task.head, task.num_classes, task.feature_dim)
        with torch.no_grad():
            self.head.weight.copy_(torch.from_numpy(weight))
            self.head.bias.copy_(torch.from_numpy(bias))
        for p in self.head.parameters():
            p.requires_grad_(False)
        fetched = time.perf_counter()
        settings = TrainSettings(task.epochs or 1, task.batch_size or 64, task.lr or 0.1,
                                 seed=sample_seed(task.seed, self.device_id) % 2 ** 31)
        bar = _progress(None, self.config.progress, f"round {task.round}", total=settings.epochs * len(self.labels),
                        unit="img")

        def progress(images: int) -> None:  # the watchdog is fed batch by batch: a round may take an hour
            self.watchdog.ping()
            if bar is not None:
                bar.update(images)

        with self.meter.phase("train"):
            theta_k = train_mask(self.net, self.masks, thresholds_to_theta(thresholds), self.inputs, self.labels,
                                 settings, progress=progress)
        if bar is not None:
            bar.close()
        trained = time.perf_counter()
        self.watchdog.ping()
        with self.meter.phase("encode"):
            upload = client_update(thresholds, theta_k, task.seed, self.device_id, task.kappa,
                                   get_codec(task.codec), task.reference)
        extra = {"fetch_s": fetched - started, "train_s": trained - fetched,
                 "encode_s": time.perf_counter() - trained, "delta": upload.delta, "kept": upload.kept}
        return upload.payload, upload.reference_digest, extra

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


__all__ = ["Agent"]
