"""server.healthcheck against a real coordinator on a loopback socket: 0 when SERVING, 1 otherwise."""
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from server import healthcheck
from server.service import SERVICE_NAME
from tests.test_server_rpc import start

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def served(tmp_path, monkeypatch):
    coordinator, server, channel = start(tmp_path)
    channel.close()
    monkeypatch.setenv("DELTAMASK_CA", str(tmp_path / "tls" / "ca.pem"))  # the coordinator speaks TLS only
    yield server
    server.stop(0)
    coordinator.store.close()


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_default_service_is_the_coordinators():
    assert healthcheck.DEFAULT_SERVICE == SERVICE_NAME


def test_serving_exits_0(served, capsys, tmp_path):
    address = f"127.0.0.1:{served.port}"
    assert healthcheck.check(address, ca=str(tmp_path / "tls" / "ca.pem")) == "SERVING"
    assert healthcheck.check(address) == "UNAVAILABLE"  # plaintext to the TLS port: no answer
    assert healthcheck.main([address]) == 0
    assert healthcheck.main([address, "--service", ""]) == 0
    assert "SERVING" in capsys.readouterr().out


def test_unknown_service_exits_1(served, capsys):
    address = f"127.0.0.1:{served.port}"
    assert healthcheck.main([address, "--service", "no.such.Service", "-q"]) == 1
    assert healthcheck.main([address, "--service", "no.such.Service"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err


def test_stopping_server_exits_1(served):
    address = f"127.0.0.1:{served.port}"
    served._call(served.health.enter_graceful_shutdown())  # what Server.stop (SIGTERM) does first
    assert healthcheck.main([address, "-q"]) == 1


def test_nothing_listening_exits_1(capsys):
    assert healthcheck.main([f"127.0.0.1:{unused_port()}", "--timeout", "1"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_as_a_module(served):
    """`python -m server.healthcheck ADDRESS`: the form the containers' health checks run."""
    run = [sys.executable, "-m", "server.healthcheck", "--timeout", "5"]
    ok = subprocess.run(run + [f"127.0.0.1:{served.port}"], capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(run + [f"127.0.0.1:{unused_port()}"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 1
