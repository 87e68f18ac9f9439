"""The edge agent: a thin gRPC layer over `deltamask` that trains masks locally and uploads PNG deltas.

    from edge_client import Agent, load_config
    Agent(load_config("client.yaml")).run()

Runs on Python 3.9+ (the boards); its own dependencies are grpcio, protobuf, psutil and pyyaml.
"""
from edge_client.config import AgentConfig, DataConfig, load_config


def __getattr__(name):  # the agent imports torch-free modules first; Agent itself on demand
    if name == "Agent":
        from edge_client.agent import Agent
        return Agent
    raise AttributeError(name)


__all__ = ["Agent", "AgentConfig", "DataConfig", "load_config"]
