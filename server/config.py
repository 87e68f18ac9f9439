"""The coordinator's configuration: one YAML file into frozen dataclasses (see server/example.yaml)."""
from dataclasses import dataclass, field
from typing import Optional

from deltamask.aggregation import MEAN, MODE
from deltamask.codecs import CODECS
from deltamask.sampling import PER_CLIENT, SHARED
from deltamask.yamlconfig import ConfigError, load_yaml


@dataclass(frozen=True)
class LocalTraining:
    """What selected clients run each round (paper C.1: 1 epoch, batch 64, Adam lr 0.1)."""

    epochs: int = 1
    batch_size: int = 64
    lr: float = 0.1
    head_epochs: int = 20  # linear-probing epochs in the head round


@dataclass(frozen=True)
class Evaluation:
    """Held-out data the coordinator scores theta on after every round."""

    dataset: str = "fashion_mnist"
    root: Optional[str] = None
    samples: int = 1000
    seed: int = 1


@dataclass(frozen=True)
class ServerConfig:
    listen: str = "[::]:50051"
    state_dir: str = "deltamask-state"
    # the model every client masks; d is counted from it (or given, to run without the model)
    backbone: Optional[str] = "mobilenet_v2"
    weights: Optional[str] = "default"  # for evaluation only: clients load their own copy
    blocks: int = 5
    image_size: int = 64
    d: Optional[int] = None
    num_classes: int = 10
    # the federation
    expected_clients: int = 3  # devices to wait for before the first round
    min_quorum: int = 1  # updates a round needs to count at its deadline
    rho: float = 1.0  # fraction of online devices sampled each round
    rounds: int = 5  # mask rounds, after the linear-probing round
    round_deadline_s: float = 600.0
    heartbeat_interval_s: float = 10.0  # a device missing two heartbeats is offline
    codec: str = "bfuse8"
    kappa_start: float = 0.8
    kappa_end: float = 1.0
    reference: str = PER_CLIENT
    theta_formula: str = MODE
    theta0: float = 0.99
    lambda0: float = 1.0
    max_upload_bytes: int = 0  # 0: d/8 + 1 MiB, enough for a raw mask
    seed: int = 0
    exit_when_done: bool = False  # stop serving after the last round (demo, tests)
    local: LocalTraining = field(default_factory=LocalTraining)
    evaluation: Optional[Evaluation] = None

    def check(self) -> None:
        if self.backbone is None and self.d is None:
            raise ValueError("give backbone or d")
        if self.codec not in CODECS:
            raise ValueError(f"codec {self.codec!r} is not one of {', '.join(CODECS)}")
        if self.reference not in (PER_CLIENT, SHARED):
            raise ValueError(f"reference must be {PER_CLIENT!r} or {SHARED!r}, got {self.reference!r}")
        if self.theta_formula not in (MODE, MEAN):
            raise ValueError(f"theta_formula must be {MODE!r} or {MEAN!r}, got {self.theta_formula!r}")
        if not 0 < self.rho <= 1:
            raise ValueError(f"rho must lie in (0, 1], got {self.rho}")
        if not 0 < self.theta0 < 1:
            raise ValueError(f"theta0 must lie in (0, 1), got {self.theta0}")
        for key in ("expected_clients", "min_quorum", "rounds", "num_classes"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be at least 1, got {getattr(self, key)}")
        for key in ("round_deadline_s", "heartbeat_interval_s", "lambda0"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key} must be positive, got {getattr(self, key)}")


def load_config(path) -> ServerConfig:
    return load_yaml(ServerConfig, path)


__all__ = ["ConfigError", "Evaluation", "LocalTraining", "ServerConfig", "load_config"]
