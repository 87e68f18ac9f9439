"""The one-command demo (`make demo`): a coordinator and 3 edge agents as separate processes on localhost.

    python -m server.demo [--rounds 5] [--samples 6000] [--keep DIR]

Embedded default: MobileNetV2 (ImageNet weights, offline copy) on Fashion-MNIST at 64x64; the three
agents split a training subset by Dirichlet(10), the coordinator scores theta on 1,000 held-out
images after every round. Secure as a deployment is: the demo makes a CA and a server certificate, and
one enrollment token for three devices; the agents enroll over TLS and call with their own credentials. Prints one line per round (accuracy, uplink and downlink bits per
parameter) and exits 0 when every process finished cleanly. Logs go to the run folder.
"""
import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import yaml

CLIENTS = 3


def free_port() -> int:
    """A free loopback port below the kernel's ephemeral range, for a coordinator that may be restarted on it:
    a port from that range (what binding port 0 gives) can become the source port of some client's outgoing
    connection while the coordinator is down, and the restart would find it taken."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    draw = random.SystemRandom()
    while True:
        port = draw.randrange(10000, max(10001, low))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue


def write_configs(folder: Path, args, names: str = "demo-{}", policy: Optional[Dict] = None) -> Path:
    """server.yaml and client<i>.yaml in `folder`; `policy` overrides round-policy keys (benchmarks/parity.py)."""
    from server.security import issue_token, make_tls
    from server.store import Store

    port, state = free_port(), folder / "state"
    # TLS and credentials made on the fly, as an operator would with `deltamask-server tls` and `token`
    tls = make_tls(state / "tls", ["localhost", "127.0.0.1"])
    store = Store(state)
    try:
        token = issue_token(store, uses=CLIENTS, ttl_s=3600)
    finally:
        store.close()
    server = {"listen": f"127.0.0.1:{port}", "state_dir": str(state), "backbone": "mobilenet_v2",
              "image_size": 64, "num_classes": 10, "expected_clients": CLIENTS, "min_quorum": CLIENTS,
              "rounds": args.rounds, "round_deadline_s": 900, "heartbeat_interval_s": 5, "exit_when_done": True,
              "tls": {"cert": tls["server_pem"], "key": tls["server_key"]},
              "evaluation": {"dataset": "fashion_mnist", "root": args.data_root, "samples": 1000}, **(policy or {})}
    (folder / "server.yaml").write_text(yaml.safe_dump(server))
    for i in range(CLIENTS):
        client = {"name": names.format(i), "server": f"localhost:{port}", "kind": "laptop",
                  "ca": tls["ca_pem"], "enrollment_token": token,
                  "credential_file": str(folder / "credentials" / "{name}.credential"),
                  "cache_dir": str(folder / "prefix-cache"), "progress": False,
                  "data": {"dataset": "fashion_mnist", "root": args.data_root, "samples": args.samples,
                           "clients": CLIENTS, "index": i, "alpha": 10.0}}
        (folder / f"client{i}.yaml").write_text(yaml.safe_dump(client))
    return folder


def run(folder: Path, rows: Optional[List[Dict]] = None, out=None) -> int:
    """Start the coordinator and the agents from `folder`'s configs, print a line a round (and append each
    round's summary to `rows`) to `out` (stdout); 0 when every process finished cleanly."""
    out = out or sys.stdout
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}  # four processes share the cores

    def spawn(name: str, module: str, stdout=None) -> subprocess.Popen:
        log = open(folder / f"{name}.log", "wb")
        return subprocess.Popen([sys.executable, "-m", module, "--config", str(folder / f"{name}.yaml")],
                                cwd=root, env=env, stdout=stdout or log, stderr=log)

    started = time.monotonic()
    server = spawn("server", "server.cli", stdout=subprocess.PIPE)
    clients = [spawn(f"client{i}", "edge_client.cli") for i in range(CLIENTS)]
    print(f"coordinator and {CLIENTS} edge agents started; logs in {folder}", file=out, flush=True)
    print(f"{'round':>5} {'phase':>5} {'state':>7} {'clients':>7} {'accuracy':>8} {'uplink bpp':>10} "
          f"{'downlink bpp':>12} {'elapsed':>8}", file=out, flush=True)
    accuracies = []
    try:
        for line in server.stdout:
            row = json.loads(line)
            if rows is not None:
                rows.append(row)
            accuracy = row.get("accuracy")
            if accuracy is not None and row["phase"] == "mask":
                accuracies.append(accuracy)
            print(f"{row['round']:>5} {row['phase']:>5} {row['state']:>7} {row['received']:>3}/{row['selected']:<3} "
                  f"{accuracy if accuracy is not None else float('nan'):>8.4f} {row['uplink_bpp']:>10.4f} "
                  f"{row['downlink_bpp']:>12.4f} {time.monotonic() - started:>7.0f}s", file=out, flush=True)
        codes = [server.wait()] + [c.wait(timeout=60) for c in clients]
    finally:
        for p in [server, *clients]:
            if p.poll() is None:
                p.kill()
    if any(codes):
        print(f"demo failed: exit codes {codes} (coordinator, agents); last log lines:", file=sys.stderr)
        for name in ["server"] + [f"client{i}" for i in range(CLIENTS)]:
            tail = (folder / f"{name}.log").read_text(errors="replace").splitlines()[-8:]
            print(f"--- {name}.log\n" + "\n".join(tail), file=sys.stderr)
        return 1
    if len(accuracies) >= 2:
        print(f"accuracy over the mask rounds: {accuracies[0]:.4f} -> {accuracies[-1]:.4f} "
              f"({'rose' if accuracies[-1] > accuracies[0] else 'did not rise'}); "
              f"{time.monotonic() - started:.0f} s in all", file=out)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="mask rounds after the head round")
    parser.add_argument("--samples", type=int, default=6000, help="training images split over the 3 agents")
    parser.add_argument("--data-root", default=None, help="Fashion-MNIST folder (default: the usual places)")
    parser.add_argument("--keep", default=None, help="run folder to keep (default: a temporary one)")
    args = parser.parse_args(argv)
    if args.keep:
        folder = Path(args.keep)
        folder.mkdir(parents=True, exist_ok=True)
        return run(write_configs(folder, args))
    with tempfile.TemporaryDirectory(prefix="deltamask-demo-") as tmp:
        return run(write_configs(Path(tmp), args))


if __name__ == "__main__":
    sys.exit(main())
