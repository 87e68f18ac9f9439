"""The agent's configuration: one YAML file into frozen dataclasses (see edge_client/example.yaml)."""
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from deltamask.yamlconfig import ConfigError, load_yaml

KINDS = ("rpi4", "jetson-nano", "coral", "laptop", "server")
METERS = ("none", "rapl", "ina219", "ina3221")  # edge_client.energy.METERS, without importing it here


@dataclass(frozen=True)
class DataConfig:
    """This device's local data: a dataset, optionally a subset of it, and its share of a partition.

    Every device of a demo fleet can hold the same files and take part `index` of a Dirichlet split
    over `clients` parts (same seed everywhere, so the parts do not overlap); a real device sets
    clients: 1 and points `root` at its own data.
    """

    dataset: str = "fashion_mnist"
    root: Optional[str] = None
    samples: int = 0  # 0: all of the training split; else a seeded subset of this many
    clients: int = 1
    index: int = 0
    alpha: float = 10.0
    min_per_client: int = 10
    seed: int = 0

    def check(self) -> None:
        if not 0 <= self.index < self.clients:
            raise ValueError(f"data.index must lie in 0..{self.clients - 1}, got {self.index}")


@dataclass(frozen=True)
class EnergyConfig:
    """The board's energy meter: joules per phase of every round go into the update (and a CSV)."""

    meter: str = "none"
    rate_hz: float = 10.0
    csv: Optional[str] = None
    # backend options: ina219 {shunt_ohms, max_current_a, address, bus_number}; ina3221 {rails, root};
    # rapl {domain, root}
    options: Dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        if self.meter not in METERS:
            raise ValueError(f"energy.meter must be one of {', '.join(METERS)}, got {self.meter!r}")
        if self.rate_hz <= 0:
            raise ValueError(f"energy.rate_hz must be positive, got {self.rate_hz}")


@dataclass(frozen=True)
class AgentConfig:
    name: str
    server: str = "localhost:50051"
    kind: str = "laptop"
    codec: str = ""  # preferred codec, a hint to the coordinator
    weights: Optional[str] = "default"  # backbone weights: "default" (offline copy, then download) or a file
    cache_dir: str = "~/.cache/deltamask/prefix"  # prefix outputs, computed once per dataset
    # the frozen prefix's pass over local data: auto (onnxruntime where measured faster, when installed),
    # onnxruntime or torch (docs/results.md, "The prefix on onnxruntime")
    prefix_runtime: str = "auto"
    energy: EnergyConfig = field(default_factory=EnergyConfig)
    task_wait_s: float = 30.0  # long-poll length
    max_backoff_s: float = 60.0
    ca: Optional[str] = None  # the coordinator's CA certificate (PEM); required unless insecure
    insecure: bool = False  # plaintext, for a coordinator started with insecure: true
    client_cert: Optional[str] = None  # mutual TLS (a coordinator with tls.client_ca): this device's certificate
    client_key: Optional[str] = None  # and its key (deltamask-server client-cert makes both)
    enrollment_token: Optional[str] = None  # to enroll (once); or enrollment_token_file
    enrollment_token_file: Optional[str] = None
    credential_file: str = "~/.local/state/deltamask/{name}.credential"  # written at enrollment, mode 0600
    progress: bool = True
    exit_when_done: bool = True
    data: DataConfig = field(default_factory=DataConfig)

    def check(self) -> None:
        if self.prefix_runtime not in ("auto", "onnxruntime", "torch"):
            raise ValueError(f"prefix_runtime must be auto, onnxruntime or torch, got {self.prefix_runtime!r}")
        if not self.name:
            raise ValueError("name must not be empty")
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if bool(self.client_cert) != bool(self.client_key):
            raise ValueError("client_cert and client_key go together (mutual TLS)")
        if not self.ca and not self.insecure:
            raise ValueError("ca: the coordinator's CA certificate file is required (or insecure: true for a "
                             "plaintext coordinator)")
        self.energy.check()
        self.data.check()

    @property
    def credential_path(self) -> str:
        import os

        return os.path.expanduser(self.credential_file.format(name=self.name))

    def token(self) -> str:
        if self.enrollment_token:
            return self.enrollment_token.strip()
        if self.enrollment_token_file:
            import os

            with open(os.path.expanduser(self.enrollment_token_file)) as f:
                return f.read().strip()
        return ""


def load_config(path) -> AgentConfig:
    return load_yaml(AgentConfig, path)


__all__ = ["AgentConfig", "ConfigError", "DataConfig", "EnergyConfig", "load_config"]
