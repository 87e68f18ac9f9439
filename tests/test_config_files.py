"""YAML configuration: the examples load; mistakes name the file, the key and what was expected."""
from pathlib import Path

import pytest

from deltamask.yamlconfig import ConfigError
from edge_client.config import load_config as load_agent
from server.config import load_config as load_server

ROOT = Path(__file__).resolve().parents[1]


def test_the_example_files_load():
    server = load_server(ROOT / "server" / "example.yaml")
    assert server.backbone == "mobilenet_v2" and server.local.lr == 0.1 and server.evaluation.samples == 1000
    agent = load_agent(ROOT / "edge_client" / "example.yaml")
    assert agent.kind == "rpi4" and agent.data.clients == 1


@pytest.mark.parametrize("text,words", [
    ("rounds: 5\nroundz: 3\n", ["unknown key 'roundz'"]),
    ("rounds: five\n", ["rounds must be int", "'five'"]),
    ("rho: 2\n", ["rho must lie in (0, 1]"]),
    ("codec: png\n", ["codec 'png'", "bfuse8"]),
    ("local: {epochs: 1, lrate: 0.1}\n", ["unknown key 'local.lrate'"]),
    ("local: 3\n", ["local must be a mapping"]),
    ("rounds: [1\n", ["not valid YAML"]),
])
def test_a_bad_server_config_names_file_key_and_expectation(tmp_path, text, words):
    path = tmp_path / "server.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_server(path)
    assert str(path) in str(info.value)
    for word in words:
        assert word in str(info.value)


def test_a_bad_agent_config_is_refused(tmp_path):
    path = tmp_path / "client.yaml"
    path.write_text("server: x:1\n")
    with pytest.raises(ConfigError, match="missing key 'name'"):
        load_agent(path)
    path.write_text("name: a\nkind: toaster\n")
    with pytest.raises(ConfigError, match="kind must be one of"):
        load_agent(path)
    path.write_text("name: a\ndata: {clients: 3, index: 3}\n")
    with pytest.raises(ConfigError, match="data.index must lie in 0..2"):
        load_agent(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_agent(tmp_path / "missing.yaml")


def test_the_clis_exit_2_with_one_line_for_a_bad_config(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "bad.yaml"
    path.write_text("roundz: 3\n")
    for module in ("server.cli", "edge_client.cli"):
        result = subprocess.run([sys.executable, "-m", module, "--config", str(path)], cwd=ROOT,
                                capture_output=True, text=True)
        assert result.returncode == 2 and "unknown key 'roundz'" in result.stderr
        assert "Traceback" not in result.stderr


def _missing(cls, data, prefix=""):
    """Keys of the dataclass `cls` (nested ones as a.b) that the mapping `data` leaves out."""
    import dataclasses

    out = []
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        if f.name not in data:
            out.append(key)
        elif dataclasses.is_dataclass(f.type) and isinstance(data[f.name], dict):
            out += _missing(f.type, data[f.name], key + ".")
    return out


def test_the_example_files_name_every_key():
    """docker/config/*.yaml send readers to the examples for every key: they must hold them all."""
    import yaml

    from edge_client.config import AgentConfig
    from server.config import ServerConfig

    for cls, path in ((ServerConfig, ROOT / "server" / "example.yaml"),
                      (AgentConfig, ROOT / "edge_client" / "example.yaml")):
        assert _missing(cls, yaml.safe_load(path.read_text())) == [], path
