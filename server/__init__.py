"""The coordinator: gRPC service, round state machine, registry, persistence (`deltamask-server`).

    config = load_config("server.yaml")
    coordinator = Coordinator(config, facts, Store(config.state_dir))
    Server(coordinator, "[::]:50051", tls=config.tls).start()     # server.service; TLS unless insecure=True

Orchestration only: decode, aggregation and the theta wire are `deltamask`'s.
"""
from server.config import ServerConfig, load_config
from server.coordinator import Coordinator, ModelFacts
from server.store import Store

__all__ = ["Coordinator", "ModelFacts", "ServerConfig", "Store", "load_config"]
