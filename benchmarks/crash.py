"""Crash campaign: SIGKILL a real coordinator process at random points, restart it, and check what it kept.

    python benchmarks/crash.py --runs 100 [--jobs 2] [--seed 0] [--keep DIR]   # one JSON object; exit 1 on a violation

Each run is one federation (4 devices over TLS, d = 4096, no model: a head round then 8 mask rounds, each
device's upload a real reference mask and delta) during which the coordinator is killed `--kills` times
(default 3), each time either after a random delay (mid-upload, mid-poll, mid-close: wherever it is) or at
a named point inside its writes (DELTAMASK_CRASH_AT: half-way through a file, between a file and its row,
between the counts and theta of a close, ...), then started again on the same state; the devices retry as
agents do. After a kill, one time in four, a file is also damaged while the coordinator is down (a counts,
theta or head file zeroed or truncated, or a byte of a stored upload flipped): the restart must rebuild it
or refuse to start with a message naming it. After the last restart the run
finishes, and the state on disk alone is checked, with its own offline re-aggregation (not the
coordinator's code):

    contiguous     rounds 0..n, every one closed or skipped, none twice
    counted once   no (round, device) twice; each closed mask round's mask count is its uploads
    counts         counts-<n>.npy equals the stored uploads aggregated again in order, resets included
    theta          theta-<n+1>.bin equals the thresholds of those counts
    acknowledged   every upload a device got an OK for is stored, with the same SHA-256
    torn files     every damaged file was rebuilt (counts and theta as re-aggregated) or named in a refusal
"""
import argparse
import json
import logging
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deltamask.aggregation import BetaCounts  # noqa: E402
from deltamask.codecs import decode, get_codec  # noqa: E402
from deltamask.headwire import encode_head  # noqa: E402
from deltamask.rounds import client_update, rebuild_client_mask  # noqa: E402
from deltamask.sampling import theta_to_thresholds, thresholds_to_theta  # noqa: E402
from deltamask.thetawire import decode_theta, encode_theta  # noqa: E402
from deltamask.v1 import coordinator_pb2 as pb  # noqa: E402
from edge_client.transport import Backoff, connect, fetch_theta, retrying, submit_update  # noqa: E402
from server.demo import free_port  # noqa: E402

D, CLASSES, DEVICES, ROUNDS = 4096, 3, 4, 8
POINTS = ["write-half", "upload-file", "upload-row", "open-row", "close-counts", "close-theta", "close-row"]
THETA0 = 0.999


class Devices:
    """DEVICES agents in threads: long poll, fetch theta, upload, retry through restarts; every OK recorded."""

    def __init__(self, address: str, ca: str, token: str) -> None:
        self.acks, self.errors, self.stop = [], [], threading.Event()
        self.threads = [threading.Thread(target=self.run, args=(i, address, ca, token), daemon=True)
                        for i in range(DEVICES)]
        for t in self.threads:
            t.start()

    def run(self, i: int, address: str, ca: str, token: str) -> None:
        name, key = f"dev-{i}", {"secret": ""}
        stub = connect(address, ca, lambda: key["secret"], max_backoff_s=0.5)
        backoff = Backoff(base_s=0.05, cap_s=0.5)
        try:
            reply = retrying(lambda: stub.Register(pb.RegisterRequest(name=name, enrollment_token=token), timeout=10,
                                                   wait_for_ready=True), "enroll", backoff, self.stop)
            key["secret"] = reply.credential
            after = -1
            while not self.stop.is_set():
                task = retrying(lambda: stub.GetTask(pb.TaskRequest(after_round=after, wait_s=2), timeout=10,
                                                     wait_for_ready=True), "task", backoff, self.stop)
                if task.phase == pb.DONE:
                    return
                if task.phase == pb.IDLE:
                    continue
                if task.phase in (pb.HEAD, pb.REFIT):  # no model here: the refit's head share needs no theta
                    payload, reference = encode_head(np.zeros((CLASSES, 0)), np.zeros(CLASSES)), ""
                else:
                    try:
                        wire = fetch_theta(stub, "", task.round, 1 << 20, backoff, self.stop)
                    except grpc.RpcError as exc:  # the round closed (or moved on) while it was down
                        if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                            after = task.round
                            continue
                        raise
                    thresholds = decode_theta(wire, D)
                    theta = thresholds_to_theta(thresholds).astype(np.float64)
                    theta[np.random.default_rng(i * 100 + task.round).choice(D, 150, replace=False)] = 0.02
                    up = client_update(thresholds, theta, task.seed, name, task.kappa, get_codec("exact"),
                                       task.reference)
                    payload, reference = up.payload, up.reference_digest
                header = pb.UpdateHeader(round=task.round, reference_digest=reference)
                time.sleep(random.uniform(0.05, 0.3))  # training
                try:
                    submit_update(stub, header, payload, backoff, self.stop)
                    self.acks.append((task.round, name, header.sha256))
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:  # round closed meanwhile: fine
                        raise
                after = task.round
        except grpc.RpcError as exc:
            if not self.stop.is_set():
                self.errors.append(f"{name}: {exc.code().name} {exc.details()}")


def reaggregate(state: Path, theta0: float = THETA0):
    """(counts ones, masks, thresholds) after the last finished round, from the database and the stored uploads
    alone: independent of server/ (it reads the tables and files, and re-runs the core's arithmetic)."""
    db = sqlite3.connect(state / "coordinator.db")
    names = dict(db.execute("SELECT device_id, name FROM devices"))
    rows = db.execute("SELECT round, phase, seed, state, reset FROM rounds ORDER BY round").fetchall()
    thresholds = theta_to_thresholds(np.full(D, theta0))
    counts = BetaCounts(D)
    for r, phase, seed, status, reset in rows:
        if status == "open" or phase != "mask":
            continue
        if reset:
            counts.reset()
        if status != "closed":
            continue
        for device, in db.execute("SELECT device_id FROM updates WHERE round = ?", (r,)):
            payload = (state / "updates" / str(r) / f"{device}.bin").read_bytes()
            packed, _ = rebuild_client_mask(decode(payload, D, thresholds), thresholds, int(seed), names[device])
            counts.add_packed(packed)
        thresholds = theta_to_thresholds(counts.theta(previous=thresholds_to_theta(thresholds, np.float64)))
    db.close()
    return counts, thresholds


def check(state: Path, acks) -> list:
    """Violations of the campaign's invariants, read from the persisted state only."""
    bad = []
    db = sqlite3.connect(state / "coordinator.db")
    rows = db.execute("SELECT round, phase, state, summary, reset FROM rounds ORDER BY round").fetchall()
    if [r[0] for r in rows] != list(range(len(rows))):
        bad.append(f"rounds not contiguous: {[r[0] for r in rows]}")
    if any(r[2] not in ("closed", "skipped") for r in rows):
        bad.append(f"a round not finished: {[(r[0], r[2]) for r in rows]}")
    pairs = db.execute("SELECT round, device_id, count(*) FROM updates GROUP BY round, device_id HAVING count(*) > 1")
    bad += [f"round {r} device {d}: {n} updates" for r, d, n in pairs]
    uploads = dict(db.execute("SELECT round, count(*) FROM updates GROUP BY round"))
    masks = 0
    for r, phase, status, summary, reset in rows:
        if phase != "mask" or summary is None:
            continue
        masks = 0 if reset else masks
        masks += uploads.get(r, 0) if status == "closed" else 0
        if json.loads(summary)["counts_masks"] != masks:
            bad.append(f"round {r}: counts_masks {json.loads(summary)['counts_masks']}, its uploads say {masks}")
    names = dict(db.execute("SELECT name, device_id FROM devices"))
    stored = {(r, d): sha for r, d, sha in db.execute("SELECT round, device_id, sha256 FROM updates")}
    for r, name, sha in acks:
        if stored.get((r, names.get(name))) != sha:
            bad.append(f"acknowledged upload of {name} in round {r} is not stored as acknowledged")
    db.close()
    if not rows:
        return bad + ["no round was ever opened"]
    last = rows[-1][0]
    counts, thresholds = reaggregate(state)
    kept = np.load(state / f"counts-{last}.npy")
    if not np.array_equal(kept, counts.ones):
        bad.append(f"counts-{last}.npy differs from the offline re-aggregation")
    if (state / f"theta-{last + 1}.bin").read_bytes() != encode_theta(thresholds):
        bad.append(f"theta-{last + 1}.bin differs from the thresholds of the re-aggregated counts")
    return bad


def damage(state: Path, rng: random.Random) -> str:
    """Zero or truncate one array file of the last finished round, or flip a byte of a stored upload of the
    open round; returns the file's name."""
    db = sqlite3.connect(state / "coordinator.db")
    row = db.execute("SELECT max(round) FROM rounds WHERE state != 'open'").fetchone()
    pending = db.execute("SELECT u.round, u.device_id FROM updates u JOIN rounds r USING (round) "
                         "WHERE r.state = 'open'").fetchall()
    db.close()
    if pending and rng.random() < 0.25:
        r, device = rng.choice(pending)
        path = state / "updates" / str(r) / f"{device}.bin"
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x10
        path.write_bytes(bytes(data))
        return path.name
    if row[0] is None:
        return ""
    candidates = [state / f"counts-{row[0]}.npy", state / f"theta-{row[0] + 1}.bin", state / "head.bin"]
    path = rng.choice([p for p in candidates if p.exists()])
    data = path.read_bytes()
    zeroed = bytes(len(data))
    path.write_bytes(zeroed if rng.random() < 0.5 and zeroed != data else data[:len(data) // 2])
    return path.name


def run_one(index: int, rng: random.Random, folder: Path, kills: int) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    state, port = folder / "state", free_port()
    config = {"listen": f"127.0.0.1:{port}", "state_dir": str(state), "backbone": None, "d": D, "num_classes": CLASSES,
              "expected_clients": DEVICES, "min_quorum": 3, "rho": 1.0, "rounds": ROUNDS, "head": "linear_probe",
              "round_deadline_s": 20, "heartbeat_interval_s": 2, "codec": "exact", "theta0": THETA0,
              "exit_when_done": True, "done_grace_s": 5, "seed": index,
              "tls": {"cert": str(state / "tls" / "server.pem"), "key": str(state / "tls" / "server.key")},
              "local": {"head_epochs": 1}}
    (folder / "server.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cli, conf = [sys.executable, "-m", "server.cli"], ["--config", str(folder / "server.yaml")]
    subprocess.run(cli + ["tls", *conf, "--hosts", "localhost,127.0.0.1"], env=env, check=True, capture_output=True)
    token = subprocess.run(cli + ["token", *conf, "--uses", "0"], env=env, check=True, capture_output=True,
                           text=True).stdout.strip()
    log = open(folder / "server.log", "ab")

    def start(crash_at: str = "") -> subprocess.Popen:
        return subprocess.Popen(cli + conf, env={**env, "DELTAMASK_CRASH_AT": crash_at}, stdout=subprocess.DEVNULL,
                                stderr=log)

    def serving(server: subprocess.Popen, mark: int) -> bool:
        """Wait until it serves (True) or has exited (False)."""
        while server.poll() is None and b"serving on port" not in (folder / "server.log").read_bytes()[mark:]:
            time.sleep(0.05)
        return server.poll() is None

    def tail() -> str:
        return " | ".join((folder / "server.log").read_text(errors="replace").strip().splitlines()[-3:])

    events, damaged, refused = [], [], []
    for _ in range(5):  # another process may take the port first: the coordinator then refuses to start
        server = start()
        if serving(server, 0) or "cannot listen" not in tail():
            break
        port = free_port()
        config["listen"] = f"127.0.0.1:{port}"
        (folder / "server.yaml").write_text(yaml.safe_dump(config))
    devices = Devices(f"localhost:{port}", str(state / "tls" / "ca.pem"), token)
    for k in range(kills):
        if rng.random() < 0.5:
            delay = rng.uniform(0.3, 3.0)
            time.sleep(delay)
            if server.poll() is None:
                server.send_signal(signal.SIGKILL)
            events.append(f"kill after {delay:.2f} s")
        else:
            point = f"{rng.choice(POINTS)}:{rng.randint(1, 6)}"
            server.kill()
            server.wait()
            server = start(point)
            try:
                code = server.wait(timeout=10)
                events.append(f"killed at {point}" if code == -signal.SIGKILL else f"ended ({code}) before {point}")
            except subprocess.TimeoutExpired:
                server.send_signal(signal.SIGKILL)
                events.append(f"{point} not reached in 10 s: killed")
        server.wait()
        if rng.random() < 0.25 / max(1, kills) * kills and not damaged:
            what = damage(state, rng)
            if what:
                damaged.append(what)
        mark = (folder / "server.log").stat().st_size
        server = start()
        if not serving(server, mark):  # refused to start: it must name the damaged file
            refused.append((folder / "server.log").read_text(errors="replace").strip().splitlines()[-1])
            break
    violations = []
    try:
        code = server.wait(timeout=120)
        if code != 0 and not refused:
            violations.append(f"coordinator exited {code}; its log ends: {tail()}")
    except subprocess.TimeoutExpired:
        server.kill()
        violations.append(f"the federation did not finish within 120 s of the last restart; its log ends: {tail()}")
    devices.stop.set()
    for t in devices.threads:
        t.join(timeout=30)
    if refused:
        if not any(name in refused[-1] for name in damaged):
            violations.append(f"refused to start without naming the damaged file: {refused[-1]}")
    else:
        violations += devices.errors
        violations += check(state, devices.acks)
        if damaged and "rebuilding from the stored uploads" not in (folder / "server.log").read_text(errors="replace"):
            violations.append(f"{damaged[0]} was damaged and nothing said so")
    return {"run": index, "events": events, "damaged": damaged, "refused": bool(refused), "acks": len(devices.acks),
            "violations": violations}


def campaign(runs: int, seed: int, folder: Path, kills: int = 3, progress=None, jobs: int = 1) -> dict:
    """`runs` runs, `jobs` at a time; run i draws its kills from its own seeded generator (seed, i)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(i: int) -> dict:
        result = run_one(i, random.Random(seed * 100_003 + i), folder / f"run-{i:03d}", kills)
        if progress:
            progress(result)
        return result

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        results = list(pool.map(one, range(runs)))
    points = {}
    for r in results:
        for e in r["events"]:
            key = e.split(":")[0] if e.startswith("killed at") else " ".join(e.split(" ")[:2])
            points[key] = points.get(key, 0) + 1
    kills = sum(1 for r in results for e in r["events"] if e.startswith("kill"))
    return {"runs": runs, "kills": kills, "by_kind": points,
            "damaged_files": sum(len(r["damaged"]) for r in results),
            "refused_starts": sum(r["refused"] for r in results),
            "acknowledged_uploads": sum(r["acks"] for r in results),
            "violations": [f"run {r['run']}: {v}" for r in results for v in r["violations"]]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--kills", type=int, default=3, help="SIGKILLs per run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (each is its own coordinator)")
    parser.add_argument("--keep", default=None, help="keep every run's folder here")
    args = parser.parse_args(argv)
    logging.getLogger("edge_client").setLevel(logging.ERROR)  # the devices' retries through every restart
    folder = Path(args.keep or tempfile.mkdtemp(prefix="deltamask-crash-"))

    def progress(r):
        print(f"run {r['run']}: {'; '.join(r['events'])}{' damaged ' + r['damaged'][0] if r['damaged'] else ''}"
              f" -> {len(r['violations'])} violations", file=sys.stderr, flush=True)

    summary = campaign(args.runs, args.seed, folder, args.kills, progress, args.jobs)
    print(json.dumps(summary))
    return 1 if summary["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
