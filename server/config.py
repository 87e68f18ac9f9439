"""The coordinator's configuration: one YAML file into frozen dataclasses (see server/example.yaml).

The round policy's keys (rounds, rho, head, codec, kappa, theta0, local training, ...) and their defaults
are `deltamask.federation.Policy`'s, the same the simulator runs; this file adds the server's own."""
from dataclasses import dataclass, field
from typing import Optional

from deltamask.federation import LocalTraining, Policy
from deltamask.yamlconfig import ConfigError, load_yaml


@dataclass(frozen=True)
class Evaluation:
    """Held-out data the coordinator scores theta on after every round."""

    dataset: str = "fashion_mnist"
    root: Optional[str] = None
    samples: int = 1000
    seed: int = 1


@dataclass(frozen=True)
class Tls:
    """The server's certificate and key (PEM), as `deltamask-server tls` makes them in state_dir/tls."""

    cert: str = ""
    key: str = ""
    client_ca: Optional[str] = None  # mutual TLS: every caller must present a certificate this CA signed

    def check(self) -> None:
        if not self.cert or not self.key:
            raise ValueError("tls needs cert and key (deltamask-server tls --config FILE makes them)")


@dataclass(frozen=True)
class Limits:
    """What one caller, and all of them together, may hold of the coordinator; beyond, a call is refused with
    its status code (RESOURCE_EXHAUSTED, UNAVAILABLE or DEADLINE_EXCEEDED) and a message saying which limit."""

    max_concurrent_rpcs: int = 20_000  # calls in flight on the server; more: RESOURCE_EXHAUSTED
    calls_per_device: int = 8  # calls in flight from one device (a long poll, a heartbeat, a transfer ...)
    first_message_s: float = 10.0  # an upload's header must arrive within this
    chunk_s: float = 60.0  # and each later chunk within this of the one before
    decode_queue: int = 64  # uploads received and waiting to be decoded; more: UNAVAILABLE (retry)
    decode_threads: int = 0  # 0: one per CPU core
    max_connection_age_s: float = 3600.0  # then GOAWAY: clients reconnect (and are authenticated) again
    max_message_bytes: int = 8 << 20

    def check(self) -> None:
        for key in ("max_concurrent_rpcs", "calls_per_device", "decode_queue", "max_message_bytes"):
            if getattr(self, key) < 1:
                raise ValueError(f"limits.{key} must be at least 1, got {getattr(self, key)}")
        for key in ("first_message_s", "chunk_s", "max_connection_age_s"):
            if getattr(self, key) <= 0:
                raise ValueError(f"limits.{key} must be positive, got {getattr(self, key)}")


@dataclass(frozen=True)
class Aggregation:
    """Who rebuilds the uploads' masks (`deltamask.shards`): `serial`, in the coordinator's decode threads (the
    default: at the d of the usual backbones it is the fastest, docs/design.md section 3.14), a local `process`
    pool of `workers`, or `ray`: a local Ray of `workers` CPUs, or the cluster at `address` (needs deltamask[ray])."""

    executor: str = "serial"
    workers: int = 2
    address: Optional[str] = None

    def check(self) -> None:
        from deltamask.shards import EXECUTORS, RAY

        if self.executor not in EXECUTORS:
            raise ValueError(f"aggregation.executor must be one of {', '.join(EXECUTORS)}, got {self.executor!r}")
        if self.workers < 1:
            raise ValueError(f"aggregation.workers must be at least 1, got {self.workers}")
        if self.address is not None and self.executor != RAY:
            raise ValueError("aggregation.address is a Ray cluster's: set executor: ray")


@dataclass(frozen=True)
class ServerConfig(Policy):
    listen: str = "[::]:50051"
    state_dir: str = "deltamask-state"
    # the model every client masks; d is counted from it (or given, to run without the model)
    backbone: Optional[str] = "mobilenet_v2"
    weights: Optional[str] = "default"  # for evaluation and export: clients load their own copy
    blocks: int = 5
    image_size: int = 64
    d: Optional[int] = None
    num_classes: int = 10
    expected_clients: int = 3  # devices to wait for before the first round
    round_deadline_s: float = 600.0
    heartbeat_interval_s: float = 10.0  # a device missing two is offline
    max_upload_bytes: int = 0  # 0: the larger of d/8 (a raw mask) and a head share, plus 1 MiB
    exit_when_done: bool = False  # stop serving after the last round (demo, tests)
    done_grace_s: float = 15.0  # exit_when_done: how long devices get to hear that training is over
    evaluation: Optional[Evaluation] = None
    tls: Optional[Tls] = None  # required unless insecure: true
    insecure: bool = False  # serve plaintext (a laptop demo behind a firewall; never across a network)
    limits: Limits = field(default_factory=Limits)
    # Prometheus metrics over HTTP ("host:port"; server/metrics.py lists them); unauthenticated: keep it on
    # the loopback address or behind the host's firewall. None: not served.
    metrics_listen: Optional[str] = None
    aggregation: Aggregation = field(default_factory=Aggregation)

    def check(self) -> None:
        super().check()
        from deltamask.codecs import WEIGHTS, get_codec
        from deltamask.federation import SAMPLE

        # the baselines that only the simulator runs (benchmarks/compare.py): no agent trains them
        if get_codec(self.codec).carries == WEIGHTS:
            raise ValueError(f"codec {self.codec!r} is a fine-tuning baseline the simulator runs "
                             "(benchmarks/compare.py); the coordinator serves mask codecs")
        if self.mask_rule != SAMPLE:
            raise ValueError(f"mask_rule {self.mask_rule!r} (FedMask) is a baseline the simulator runs; "
                             "the coordinator's devices send sampled masks")
        if self.rounds < 1:
            raise ValueError(f"rounds must be at least 1, got {self.rounds}")
        if self.backbone is None and self.d is None:
            raise ValueError("give backbone or d")
        if self.backbone is None and self.local.loss == "virtual_classes":
            raise ValueError("local.loss virtual_classes needs backbone (the class anchors are as wide as the "
                             "masked blocks' inputs)")
        for key in ("expected_clients", "num_classes"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be at least 1, got {getattr(self, key)}")
        if self.tls is not None:
            self.tls.check()
        self.limits.check()
        self.aggregation.check()
        if self.metrics_listen is not None and not self.metrics_listen.rpartition(":")[2].isdigit():
            raise ValueError(f"metrics_listen must be host:port, got {self.metrics_listen!r}")
        for key in ("round_deadline_s", "heartbeat_interval_s", "done_grace_s"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key} must be positive, got {getattr(self, key)}")


def load_config(path) -> ServerConfig:
    return load_yaml(ServerConfig, path)


__all__ = ["Aggregation", "ConfigError", "Evaluation", "Limits", "LocalTraining", "ServerConfig", "Tls", "load_config"]
