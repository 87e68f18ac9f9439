"""The coordinator's configuration: one YAML file into frozen dataclasses (see server/example.yaml).

The round policy's keys (rounds, rho, head, codec, kappa, theta0, local training, ...) and their defaults
are `deltamask.federation.Policy`'s, the same the simulator runs; this file adds the server's own."""
from dataclasses import dataclass
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
class ServerConfig(Policy):
    listen: str = "[::]:50051"
    state_dir: str = "deltamask-state"
    # the model every client masks; d is counted from it (or given, to run without the model)
    backbone: Optional[str] = "mobilenet_v2"
    weights: Optional[str] = "default"  # for evaluation only: clients load their own copy
    blocks: int = 5
    image_size: int = 64
    d: Optional[int] = None
    num_classes: int = 10
    expected_clients: int = 3  # devices to wait for before the first round
    round_deadline_s: float = 600.0
    heartbeat_interval_s: float = 10.0  # a device missing two is offline
    max_upload_bytes: int = 0  # 0: the larger of d/8 (a raw mask) and a head share, plus 1 MiB
    exit_when_done: bool = False  # stop serving after the last round (demo, tests)
    evaluation: Optional[Evaluation] = None

    def check(self) -> None:
        super().check()
        if self.backbone is None and self.d is None:
            raise ValueError("give backbone or d")
        for key in ("expected_clients", "num_classes"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be at least 1, got {getattr(self, key)}")
        for key in ("round_deadline_s", "heartbeat_interval_s"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key} must be positive, got {getattr(self, key)}")


def load_config(path) -> ServerConfig:
    return load_yaml(ServerConfig, path)


__all__ = ["ConfigError", "Evaluation", "LocalTraining", "ServerConfig", "load_config"]
