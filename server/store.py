"""The coordinator's state on disk: SQLite (WAL) for the registry, rounds and updates; arrays beside it.

    state_dir/coordinator.db        devices, rounds (with their summaries), updates, meta
    state_dir/theta-<r>.bin         the theta served in round r (theta wire format)
    state_dir/counts-<r>.npy        Beta counts after round r closed (ones per position; masks in the db)
    state_dir/head.bin              the averaged classifier head (deltamask.headwire)
    state_dir/head-refit.bin        the head fitted again after the mask rounds (policy key refit)
    state_dir/updates/<r>/<id>.bin  every accepted upload, as received
    state_dir/tls/                  the CA and server certificate `deltamask-server tls` made (keys 0600)
    state_dir/operator.credential   the operator credential (0600); the database keeps its digest only

Every file is written to a temporary name, fsynced and renamed, before the database row that points
to it (and holds its SHA-256) is committed, so a crash at any point leaves either the old state or the
new one, and a file damaged later is found on recovery (server.recovery). Rejected requests write
nothing. Secrets (enrollment tokens, device credentials) are kept as SHA-256 digests only.
"""
import contextlib
import hashlib
import io
import json
import os
import signal
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY, name TEXT UNIQUE NOT NULL, kind TEXT NOT NULL, memory_bytes INTEGER,
    codec TEXT, registered_at REAL NOT NULL, credential_sha256 TEXT, told_done INTEGER NOT NULL DEFAULT 0,
    enrolled_with TEXT, credential_seen INTEGER NOT NULL DEFAULT 0, revoked INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS tokens (
    token_id TEXT PRIMARY KEY, secret_sha256 TEXT NOT NULL, name TEXT, expires_at REAL NOT NULL,
    uses_left INTEGER, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY, phase TEXT NOT NULL, seed TEXT NOT NULL, kappa REAL NOT NULL,
    selected TEXT NOT NULL, deadline REAL NOT NULL, state TEXT NOT NULL, mask_index INTEGER NOT NULL,
    reset INTEGER NOT NULL, opened_at REAL NOT NULL, closed_at REAL, summary TEXT);
CREATE TABLE IF NOT EXISTS updates (
    round INTEGER NOT NULL, device_id TEXT NOT NULL, sha256 TEXT NOT NULL, nbytes INTEGER NOT NULL,
    reference_digest TEXT NOT NULL, metrics TEXT NOT NULL, received_at REAL NOT NULL,
    PRIMARY KEY (round, device_id));
"""


# A test hook for the crash campaign (benchmarks/crash.py): DELTAMASK_CRASH_AT="point:n" kills this process
# (SIGKILL, nothing flushed) the n-th time it passes `crashpoint("point")`. Unset, it costs one comparison.
_CRASH_AT = os.environ.get("DELTAMASK_CRASH_AT", "")
_passes: Dict[str, int] = {}


def crashpoint(name: str) -> None:
    if not _CRASH_AT:
        return
    point, _, n = _CRASH_AT.partition(":")
    if point == name:
        _passes[name] = _passes.get(name, 0) + 1
        if _passes[name] >= int(n or 1):
            os.kill(os.getpid(), signal.SIGKILL)


def write_atomic(path: Path, data: bytes) -> None:
    """Write, fsync, rename over `path`, fsync the folder."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data[:len(data) // 2])
        crashpoint("write-half")  # a torn temporary file
        f.write(data[len(data) // 2:])
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Store:
    def __init__(self, folder) -> None:
        self.folder = Path(folder)
        (self.folder / "updates").mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.db = sqlite3.connect(self.folder / "coordinator.db", check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(devices)")}
        for column, kind in (("credential_sha256", "TEXT"), ("told_done", "INTEGER NOT NULL DEFAULT 0"),
                             ("enrolled_with", "TEXT"), ("credential_seen", "INTEGER NOT NULL DEFAULT 0"),
                             ("revoked", "INTEGER NOT NULL DEFAULT 0")):
            if column not in columns:  # state written before devices had credentials (or could be revoked)
                self.db.execute(f"ALTER TABLE devices ADD COLUMN {column} {kind}")

    def close(self) -> None:
        with self._lock:
            self.db.close()

    # --- meta ---------------------------------------------------------------------------------------
    def get_meta(self, key: str) -> Optional[str]:
        row = self._one("SELECT value FROM meta WHERE key = ?", (key,))
        return None if row is None else row[0]

    def set_meta(self, key: str, value: str) -> None:
        self._write([("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))])

    # --- devices ------------------------------------------------------------------------------------
    def add_device(self, device_id: str, name: str, kind: str, memory_bytes: int, codec: str,
                   credential_sha256: Optional[str] = None) -> None:
        self._write([("INSERT INTO devices VALUES (?, ?, ?, ?, ?, ?, ?, 0, NULL, 0, 0)",
                      (device_id, name, kind, memory_bytes, codec, time.time(), credential_sha256))])

    def devices(self) -> List[Dict[str, Any]]:
        keys = ("device_id", "name", "kind", "memory_bytes", "codec", "credential_sha256", "told_done",
                "enrolled_with", "credential_seen", "revoked")
        rows = self._all(f"SELECT {', '.join(keys)} FROM devices ORDER BY registered_at")
        return [dict(zip(keys, r)) for r in rows]

    def set_flags(self, told_done=(), credential_seen=()) -> None:
        """Mark devices as told that training is over, and as having called with their credential."""
        self._write([("UPDATE devices SET told_done = 1 WHERE device_id = ?", (i,)) for i in told_done] +
                    [("UPDATE devices SET credential_seen = 1 WHERE device_id = ?", (i,)) for i in credential_seen])

    # --- enrollment ---------------------------------------------------------------------------------
    def revoke_device(self, device_id: str, name: str) -> None:
        """In one transaction: no credential, no enrollment to repeat, and every token made for the name spent;
        the device cannot call until a new token made for its name enrolls it."""
        self._write([("UPDATE devices SET credential_sha256 = NULL, enrolled_with = NULL, revoked = 1 "
                      "WHERE device_id = ?", (device_id,)),
                     ("UPDATE tokens SET uses_left = 0 WHERE name = ?", (name,))])

    def add_token(self, token_id: str, secret_sha256: str, name: Optional[str], expires_at: float,
                  uses: Optional[int]) -> None:
        self._write([("INSERT INTO tokens VALUES (?, ?, ?, ?, ?, ?)",
                      (token_id, secret_sha256, name, expires_at, uses, time.time()))])

    def tokens(self) -> List[Dict[str, Any]]:
        keys = ("token_id", "name", "expires_at", "uses_left", "created_at")
        return [dict(zip(keys, r)) for r in self._all(f"SELECT {', '.join(keys)} FROM tokens ORDER BY created_at")]

    @contextlib.contextmanager
    def transaction(self):
        """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on any exception): the database cursor, for a few statements
        that must hold together (an enrollment reads its token, spends one use and writes the device)."""
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    # --- rounds -------------------------------------------------------------------------------------
    def open_round(self, r: Dict[str, Any]) -> None:
        self._write([("INSERT OR REPLACE INTO rounds VALUES (?, ?, ?, ?, ?, ?, 'open', ?, ?, ?, NULL, NULL)",
                      (r["round"], r["phase"], str(r["seed"]), r["kappa"], json.dumps(r["selected"]),
                       r["deadline"], r["mask_index"], int(r["reset"]), time.time()))])

    def set_deadline(self, round_index: int, deadline: float) -> None:
        self._write([("UPDATE rounds SET deadline = ? WHERE round = ?", (deadline, round_index))])

    def close_round(self, round_index: int, state: str, summary: Dict[str, Any]) -> None:
        self._write([("UPDATE rounds SET state = ?, closed_at = ?, summary = ? WHERE round = ?",
                      (state, time.time(), json.dumps(summary), round_index))])

    def rounds(self) -> List[Dict[str, Any]]:
        keys = ("round", "phase", "seed", "kappa", "selected", "deadline", "state", "mask_index", "reset",
                "opened_at", "closed_at", "summary")
        out = []
        for row in self._all("SELECT * FROM rounds ORDER BY round"):
            r = dict(zip(keys, row))
            r["seed"], r["selected"] = int(r["seed"]), json.loads(r["selected"])
            r["summary"] = json.loads(r["summary"]) if r["summary"] else None
            out.append(r)
        return out

    # --- updates ------------------------------------------------------------------------------------
    def update_path(self, round_index: int, device_id: str) -> Path:
        return self.folder / "updates" / str(round_index) / f"{device_id}.bin"

    def add_update(self, round_index: int, device_id: str, payload: bytes, sha256: str,
                   reference_digest: str, metrics: Dict[str, Any]) -> None:
        path = self.update_path(round_index, device_id)
        path.parent.mkdir(exist_ok=True)
        write_atomic(path, payload)
        crashpoint("upload-file")
        self._write([("INSERT INTO updates VALUES (?, ?, ?, ?, ?, ?, ?)",
                      (round_index, device_id, sha256, len(payload), reference_digest, json.dumps(metrics),
                       time.time()))])
        crashpoint("upload-row")  # persisted, not yet acknowledged

    def updates(self, round_index: int) -> List[Dict[str, Any]]:
        keys = ("device_id", "sha256", "nbytes", "reference_digest", "metrics")
        rows = self._all("SELECT device_id, sha256, nbytes, reference_digest, metrics FROM updates "
                         "WHERE round = ? ORDER BY received_at", (round_index,))
        out = [dict(zip(keys, r)) for r in rows]
        for u in out:
            u["metrics"] = json.loads(u["metrics"])
        return out

    def updates_from(self, first_round: int) -> List[Dict[str, Any]]:
        """Every update row from round `first_round` on (round, device_id, nbytes, metrics), in order taken."""
        rows = self._all("SELECT round, device_id, nbytes, metrics FROM updates WHERE round >= ? "
                         "ORDER BY round, received_at", (first_round,))
        return [{"round": r, "device_id": d, "nbytes": n, "metrics": json.loads(m)} for r, d, n, m in rows]

    def find_update(self, round_index: int, device_id: str) -> Optional[str]:
        """The SHA-256 of the update a device sent for a round, None if none."""
        row = self._one("SELECT sha256 FROM updates WHERE round = ? AND device_id = ?", (round_index, device_id))
        return None if row is None else row[0]

    # --- arrays: each save returns the file's SHA-256, which the round's row keeps ------------------------
    def theta_path(self, round_index: int) -> Path:
        return self.folder / f"theta-{round_index}.bin"

    def counts_path(self, round_index: int) -> Path:
        return self.folder / f"counts-{round_index}.npy"

    @property
    def head_path(self) -> Path:
        return self.folder / "head.bin"

    def save_theta(self, round_index: int, wire: bytes) -> str:
        write_atomic(self.theta_path(round_index), wire)
        return hashlib.sha256(wire).hexdigest()

    def load_theta(self, round_index: int) -> bytes:
        return self.theta_path(round_index).read_bytes()

    def save_counts(self, round_index: int, ones: np.ndarray) -> str:
        buffer = io.BytesIO()
        np.save(buffer, ones, allow_pickle=False)
        write_atomic(self.counts_path(round_index), buffer.getvalue())
        return hashlib.sha256(buffer.getvalue()).hexdigest()

    def load_counts(self, round_index: int) -> Optional[np.ndarray]:
        path = self.counts_path(round_index)
        return np.load(path, allow_pickle=False) if path.exists() else None

    @property
    def refit_head_path(self) -> Path:
        return self.folder / "head-refit.bin"

    def save_head(self, head: bytes, refit: bool = False) -> str:
        write_atomic(self.refit_head_path if refit else self.head_path, head)
        return hashlib.sha256(head).hexdigest()

    def load_head(self, refit: bool = False) -> Optional[bytes]:
        path = self.refit_head_path if refit else self.head_path
        return path.read_bytes() if path.exists() else None

    def prune(self, keep_from: int, keep_theta: Optional[int] = None) -> None:
        """Delete theta and counts files of rounds before `keep_from` (never read again), but theta-`keep_theta`
        (the kept round's, which `deltamask-server export` reads)."""
        for path in list(self.folder.glob("theta-*.bin")) + list(self.folder.glob("counts-*.npy")):
            index = int(path.stem.split("-")[1])
            if index < keep_from and not (path.suffix == ".bin" and index == keep_theta):
                path.unlink()

    # --- sqlite -------------------------------------------------------------------------------------
    def _write(self, statements) -> None:
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                for sql, args in statements:
                    self.db.execute(sql, args)
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    def _one(self, sql: str, args=()):
        with self._lock:
            return self.db.execute(sql, args).fetchone()

    def _all(self, sql: str, args=()):
        with self._lock:
            return self.db.execute(sql, args).fetchall()
