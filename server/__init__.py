"""The coordinator: gRPC service, round state machine, registry, persistence (`deltamask-server`).

    coordinator = Coordinator(load_config("server.yaml"), facts, Store(state_dir))
    Server(coordinator, "[::]:50051").start()

Orchestration only: decode, aggregation and the theta wire are `deltamask`'s.
"""
from server.config import ServerConfig, load_config
from server.coordinator import Coordinator, ModelFacts
from server.store import Store

__all__ = ["Coordinator", "ModelFacts", "ServerConfig", "Store", "load_config"]
