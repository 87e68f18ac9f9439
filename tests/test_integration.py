"""A real coordinator process and real client processes over loopback gRPC, on the tiny model and digits."""
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import yaml

from deltamask.aggregation import BetaCounts, reset_due
from deltamask.codecs import decode
from deltamask.headwire import lda_stats_nbytes
from deltamask.rounds import rebuild_client_mask
from deltamask.sampling import round_seed, theta_to_thresholds, thresholds_to_theta
from deltamask.thetawire import decode_theta
from server.config import ServerConfig
from server.demo import free_port
from tests.wire import server_secrets, tls_config

ROOT = Path(__file__).resolve().parents[1]
D = 6768  # the tiny model's masked weights
SERVER = dict(backbone="tiny", weights=None, blocks=5, image_size=16, num_classes=10, expected_clients=3,
              min_quorum=2, rounds=3, round_deadline_s=60, heartbeat_interval_s=1, exit_when_done=True, seed=5,
              lda_rank=16,  # the tiny model has 32 features
              local={"epochs": 1, "batch_size": 32, "lr": 0.1, "head_epochs": 3})


class Fleet:
    """Config files, processes and logs of one coordinator and its clients under a tmp folder."""

    def __init__(self, folder: Path, clients: int = 3, names: str = "dev-{}", data: Optional[dict] = None,
                 **server) -> None:
        self.folder, self.port = folder, free_port()
        state = folder / "state"
        self.config = {**SERVER, **server, "listen": f"127.0.0.1:{self.port}", "state_dir": str(state),
                       "tls": tls_config(state)}
        (folder / "server.yaml").write_text(yaml.safe_dump(self.config))
        # one torch thread a process: four processes share this machine's cores
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        token = server_secrets(folder / "server.yaml", self.server_python, self.env, ROOT)
        for i in range(clients):
            (folder / f"client{i}.yaml").write_text(yaml.safe_dump({
                "name": names.format(i), "server": f"localhost:{self.port}", "weights": None, "progress": False,
                "cache_dir": str(folder / f"cache{i}"), "task_wait_s": 2, "max_backoff_s": 2,
                "ca": str(state / "tls" / "ca.pem"), "enrollment_token": token,
                "credential_file": str(folder / "credentials" / "{name}"),
                "data": {"dataset": "digits", "clients": clients, "index": i, "min_per_client": 5, **(data or {})}}))
        self.clients = []

    @property
    def server_python(self) -> str:
        # the edge environment (Python 3.9, grpcio 1.70) runs its agents against the main environment's
        # coordinator, as boards do against a newer server
        return os.environ.get("DELTAMASK_SERVER_PYTHON", sys.executable)

    def start_server(self) -> subprocess.Popen:
        self.server = self._spawn("server", "server.cli", self.folder / "server.yaml", self.server_python)
        return self.server

    def start_client(self, i: int) -> subprocess.Popen:
        process = self._spawn(f"client{i}", "edge_client.cli", self.folder / f"client{i}.yaml")
        self.clients.append(process)
        return process

    def _spawn(self, name: str, module: str, config: Path, python: str = sys.executable) -> subprocess.Popen:
        out, err = open(self.folder / f"{name}.out", "ab"), open(self.folder / f"{name}.err", "ab")
        return subprocess.Popen([python, "-m", module, "--config", str(config)], cwd=ROOT, env=self.env,
                                stdout=out, stderr=err)

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.err").read_text()

    def summaries(self):
        return [json.loads(line) for line in (self.folder / "server.out").read_text().splitlines() if line]

    def wait(self, process: subprocess.Popen, timeout: float = 240) -> int:
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"timed out; server log:\n{self.log('server')[-3000:]}")

    def kill(self) -> None:
        for p in [getattr(self, "server", None), *self.clients]:
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture
def fleet(tmp_path):
    made = []

    def make(**kw) -> Fleet:
        made.append(Fleet(tmp_path, **kw))
        return made[-1]

    yield make
    for f in made:
        f.kill()


def reaggregate(state: Path, config: dict) -> np.ndarray:
    """theta after the last round, recomputed offline from the uploads the coordinator kept."""
    db = sqlite3.connect(state / "coordinator.db")
    rounds = db.execute("SELECT round, phase, state FROM rounds ORDER BY round").fetchall()
    thresholds = theta_to_thresholds(np.full(D, config.get("theta0", ServerConfig.theta0)))
    counts, mask_index = BetaCounts(D), 0
    for r, phase, status in rounds:
        if phase != "mask" or status != "closed":
            continue
        if reset_due(mask_index, 1.0):
            counts.reset()
        seed = round_seed(config["seed"], r)
        for device, name, digest in db.execute("SELECT device_id, name, reference_digest FROM updates "
                                               "JOIN devices USING (device_id) WHERE round = ?", (r,)):
            payload = (state / "updates" / str(r) / f"{device}.bin").read_bytes()
            packed, drawn = rebuild_client_mask(decode(payload, D, thresholds), thresholds, seed, name)  # by name
            assert drawn == digest
            counts.add_packed(packed)
        thresholds = theta_to_thresholds(counts.theta(previous=thresholds_to_theta(thresholds, np.float64)))
        mask_index += 1
    db.close()
    return thresholds


def test_three_clients_three_rounds_match_an_offline_reaggregation(fleet):
    f = fleet()
    f.start_server()
    for i in range(3):
        f.start_client(i)
    assert f.wait(f.server) == 0, f.log("server")[-3000:]
    assert [f.wait(c) for c in f.clients] == [0, 0, 0]
    rows = f.summaries()
    assert [(r["round"], r["phase"], r["state"], r["received"]) for r in rows] == [
        (0, "head", "closed", 3), (1, "mask", "closed", 3), (2, "mask", "closed", 3), (3, "mask", "closed", 3),
        (4, "refit", "closed", 3)]  # the head round again on theta * w (refit: true, the default)
    assert all(0 < r["uplink_bpp"] for r in rows) and all(r["downlink_bpp"] > 0 for r in rows[1:])
    assert all("accuracy" not in r for r in rows)  # no evaluation data configured
    state = f.folder / "state"
    db = sqlite3.connect(state / "coordinator.db")
    metrics = [json.loads(m) for (m,) in db.execute("SELECT metrics FROM updates WHERE round BETWEEN 1 AND 3")]
    assert len(metrics) == 9  # the mask rounds' (a head share can take less CPU than the clock's tick)
    for m in metrics:  # what each agent measured and sent with its update (psutil, timings, the codec)
        assert m["peak_rss_bytes"] > 10 << 20 and m["cpu_s"] > 0 and m["train_s"] > 0 and m["num_examples"] > 0
        assert m["delta"] >= m["kept"] and m["energy_meter"] == "" and m["energy_j"] == 0
    assert sum(m["kept"] for m in metrics) > 0  # at theta0 = 0.999 a device may have nothing to send in a round
    final = decode_theta((state / "theta-4.bin").read_bytes(), D)
    offline = reaggregate(state, f.config)
    assert np.array_equal(final, offline)
    assert not np.array_equal(final, theta_to_thresholds(np.full(D, ServerConfig.theta0)))  # theta moved


def test_a_client_killed_mid_round_is_waited_for_until_the_deadline_only(fleet):
    deadline = 25  # far above a round's few seconds here, so that only the killed client misses it
    f = fleet(rounds=2, round_deadline_s=deadline)
    f.start_server()
    victim = [f.start_client(i) for i in range(3)][2]
    started = time.monotonic()
    while "(mask): selected" not in f.log("client2"):
        assert time.monotonic() - started < 180 and victim.poll() is None, f.log("client2")[-2000:]
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    killed = int(f.log("client2").split("(mask): selected")[0].rsplit("round ", 1)[1].split()[0])
    victim.wait()
    assert f.wait(f.server) == 0, f.log("server")[-3000:]
    assert [f.wait(c) for c in f.clients[:2]] == [0, 0]
    rows = {r["round"]: r for r in f.summaries()}
    cut, after = rows[killed], rows[killed + 1]
    assert cut["state"] == "closed" and (cut["selected"], cut["received"]) == (3, 2) and len(cut["lost"]) == 1
    assert after["state"] == "closed" and (after["selected"], after["received"]) == (2, 2)  # the dead one is offline
    db = sqlite3.connect(f.folder / "state" / "coordinator.db")
    opened, closed, due = db.execute("SELECT opened_at, closed_at, deadline FROM rounds WHERE round = ?",
                                     (killed,)).fetchone()
    assert closed >= due and due - opened == pytest.approx(deadline, abs=0.1)
    last = max(rows)
    assert np.array_equal(decode_theta((f.folder / "state" / f"theta-{last + 1}.bin").read_bytes(), D),
                          reaggregate(f.folder / "state", f.config))


def test_sigterm_stops_the_coordinator_and_a_restart_resumes_where_it_was(fleet):
    # min_quorum 3: after the restart no round opens until all three are back. A round of the tiny model
    # closes in milliseconds, and an agent whose call was cut by the stop can take a 30 s call deadline to
    # reach the new process; with 2 of 3 the federation could end without it, and an agent is never told
    # DONE by a coordinator that is gone (the agent-side gap the fleet issue lists).
    f = fleet(rounds=4, min_quorum=3)
    f.start_server()
    for i in range(3):
        f.start_client(i)
    started = time.monotonic()
    while len(f.summaries()) < 2:  # the head round and mask round 1 are closed
        assert time.monotonic() - started < 180 and f.server.poll() is None, f.log("server")[-3000:]
        time.sleep(0.05)
    f.server.send_signal(signal.SIGTERM)
    assert f.wait(f.server, 30) == 0
    assert "stopped" in f.log("server")
    f.start_server()  # the clients reconnect on their own
    assert f.wait(f.server) == 0, f.log("server")[-3000:]
    assert [f.wait(c) for c in f.clients] == [0, 0, 0]
    rounds = [r["round"] for r in f.summaries()]
    assert rounds == sorted(set(rounds)) and rounds[-1] >= 4  # no round twice, none lost
    db = sqlite3.connect(f.folder / "state" / "coordinator.db")
    assert db.execute("SELECT count(*) FROM devices").fetchone()[0] == 3  # the same three, not six
    last = rounds[-1]
    assert np.array_equal(decode_theta((f.folder / "state" / f"theta-{last + 1}.bin").read_bytes(), D),
                          reaggregate(f.folder / "state", f.config))


@pytest.mark.parametrize("loss", ["local_classes", "virtual_classes"])
def test_the_simulator_and_a_real_fleet_produce_identical_heads_and_theta_every_round(fleet, tmp_path, loss):
    """Parity: one round policy, one aggregator, one local learner. The simulator (one process) and a
    coordinator process with 3 agent processes, same policy, data split and seeds, produce the same head
    bytes after the head round, the same theta wire bytes after every mask round, and the same head after the
    refit (every device's head share on theta * w). With virtual_classes the head's bytes include the class
    anchors the agents train their virtual examples from, and the refit keeps them."""
    from deltamask.learn.sim import client_name

    policy = dict(rounds=3, seed=5, rho=1.0, min_quorum=2, codec="exact", head="lda", refit=True,
                  local={"epochs": 1, "batch_size": 32, "lr": 0.1, "loss": loss})
    f = fleet(names="client-{:03d}", data={"seed": 5}, **policy)
    f.start_server()
    for i in range(3):
        f.start_client(i)
    assert f.wait(f.server) == 0, f.log("server")[-3000:]
    fleet_rows = [r for r in f.summaries() if r["state"] == "closed"]
    args = ["--backbone", "tiny", "--weights", "none", "--image-size", "16", "--dataset", "digits",
            "--train-samples", "0", "--test-samples", "200", "--clients", "3", "--min-per-client", "5",
            "--rounds", "3", "--seed", "5", "--rho", "1", "--min-quorum", "2", "--codec", "exact", "--head", "lda",
            "--lda-rank", "16", "--refit", "1",
            "--epochs", "1", "--batch-size", "32", "--lr", "0.1", "--loss", loss]
    out = subprocess.run([sys.executable, "-m", "deltamask.learn.sim", *args], capture_output=True, text=True,
                         cwd=ROOT, env=f.env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    sim_rows = [json.loads(line) for line in out.stdout.splitlines()][1:]
    assert client_name(2) == "client-002"
    assert [(r["round"], r["phase"]) for r in sim_rows] == [(r["round"], r["phase"]) for r in fleet_rows] == [
        (0, "head"), (1, "mask"), (2, "mask"), (3, "mask"), (4, "refit")]
    assert sim_rows[0]["head_sha256"] == fleet_rows[0]["head_sha256"]
    assert [r["theta_sha256"] for r in sim_rows[1:4]] == [r["theta_sha256"] for r in fleet_rows[1:4]]
    assert len({r["theta_sha256"] for r in sim_rows[1:4]}) == 3  # theta moved every round
    assert sim_rows[4]["head_sha256"] == fleet_rows[4]["head_sha256"] != sim_rows[0]["head_sha256"]
    # the head round's uplink and downlink: the class block is there exactly with virtual_classes
    lda_only = 8 * lda_stats_nbytes(10, 32, "full") / D  # the default covariance
    assert (sim_rows[0]["uplink_bpp"] > lda_only) == (loss == "virtual_classes")
