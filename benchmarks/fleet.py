"""A fleet of N simulated devices against a real coordinator process, over loopback TLS: one JSON object.

    python benchmarks/fleet.py --devices 2000 [--rounds 3] [--rho 0.05] [--heartbeat 10] [--d 4096]

The coordinator is `deltamask-server` as a user starts it (TLS from `deltamask-server tls`, a fleet token from
`deltamask-server token`), on a small d with no model. Each device enrolls with the token over its own TLS
channel, heartbeats at the configured interval, long-polls for tasks, fetches theta and uploads a valid update
(a real reference mask and delta, exact codec) after "training" for --train-s when selected, until the coordinator says DONE. Printed:
`devices`, `rounds`, `errors` (by status code, every failed call), `false_offline` (the most devices that
were heartbeating but which the coordinator counted offline, sampled every second once all had asked for
work), p50/p99 latency of Heartbeat, of task delivery (from the round's opening to the device holding its
task) and of SubmitUpdate, and the coordinator's peak RSS and CPU seconds. The driver's own process shares
the machine: on 2 cores its CPU use is part of every latency.
"""
import argparse
import asyncio
import collections
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deltamask.codecs import get_codec  # noqa: E402
from deltamask.headwire import encode_head  # noqa: E402
from deltamask.rounds import client_update  # noqa: E402
from deltamask.sampling import thresholds_to_theta  # noqa: E402
from deltamask.thetawire import decode_theta  # noqa: E402
from deltamask.transfer import sha256_hex, split  # noqa: E402
from deltamask.v1 import coordinator_pb2 as pb  # noqa: E402
from deltamask.v1 import coordinator_pb2_grpc as rpc  # noqa: E402

CLASSES = 3


class Stats:
    def __init__(self) -> None:
        self.latency = collections.defaultdict(list)
        self.errors = collections.Counter()
        self.details = collections.defaultdict(list)  # the first few messages of each kind of error
        self.asked = set()  # devices that have asked for work (the coordinator counts them as ready)
        self.alive = set()  # devices still running (heartbeating)

    def fail(self, exc: grpc.RpcError, what: str) -> None:
        key = f"{what}:{exc.code().name}"
        self.errors[key] += 1
        if len(self.details[key]) < 3:
            self.details[key].append(exc.details())


def percentiles(values) -> dict:
    if not values:
        return {"n": 0}
    a = np.asarray(values)
    return {"n": len(a), "p50_s": round(float(np.percentile(a, 50)), 4), "p99_s": round(float(np.percentile(a, 99)), 4),
            "max_s": round(float(a.max()), 4)}


async def device(i: int, args, address: str, ca: bytes, token: str, stats: Stats, deadline_s: float) -> None:
    name = f"sim-{i:05d}"
    # its own TCP + TLS connection, as a board has (gRPC would otherwise share one connection between every
    # channel of this process with the same target and options, and 2,000 devices' calls on one HTTP/2
    # connection is a load no coordinator meets: the server cancels the streams beyond its limit)
    options = [("grpc.keepalive_time_ms", 60_000), ("grpc.max_reconnect_backoff_ms", 2000),
               ("grpc.use_local_subchannel_pool", 1)]
    async with grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(ca), options=options) as channel:
        stub = rpc.CoordinatorStub(channel)
        while True:
            try:
                reply = await stub.Register(pb.RegisterRequest(name=name, kind=pb.RPI4, enrollment_token=token),
                                            timeout=120, wait_for_ready=True)
                break
            except grpc.RpcError as exc:
                stats.fail(exc, "Register")
                await asyncio.sleep(1 + np.random.random())
        md = (("authorization", "Bearer " + reply.credential),)
        stats.alive.add(name)
        done = asyncio.Event()

        async def heartbeats() -> None:
            await asyncio.sleep(np.random.random() * args.heartbeat)  # devices do not start in step
            while not done.is_set():
                started = time.perf_counter()
                try:
                    await stub.Heartbeat(pb.HeartbeatRequest(), metadata=md, timeout=args.heartbeat)
                    stats.latency["heartbeat"].append(time.perf_counter() - started)
                except grpc.RpcError as exc:
                    stats.fail(exc, "Heartbeat")
                try:
                    await asyncio.wait_for(done.wait(), args.heartbeat)
                except asyncio.TimeoutError:
                    pass

        beating = asyncio.ensure_future(heartbeats())
        after = -1
        try:
            while True:
                try:
                    stats.asked.add(name)
                    task = await stub.GetTask(pb.TaskRequest(after_round=after, wait_s=args.poll), metadata=md,
                                              timeout=args.poll + 30)
                except grpc.RpcError as exc:
                    stats.fail(exc, "GetTask")
                    await asyncio.sleep(1)
                    continue
                if task.phase == pb.DONE:
                    return
                if task.phase == pb.IDLE:
                    continue
                stats.latency["task_delivery"].append(time.time() - (task.deadline_unix_s - deadline_s))
                await asyncio.sleep(args.train_s * (0.5 + np.random.random()))  # local training, elsewhere
                try:
                    if task.phase in (pb.HEAD, pb.REFIT):  # no model here: the refit's share needs no theta
                        payload, reference = encode_head(np.zeros((CLASSES, 0)), np.zeros(CLASSES)), ""
                    else:
                        chunks = [c async for c in stub.FetchTheta(pb.FetchRequest(round=task.round), metadata=md,
                                                                   timeout=60)]
                        thresholds = decode_theta(b"".join(c.data for c in chunks), args.d)
                        theta = thresholds_to_theta(thresholds).astype(np.float64)
                        rng = np.random.default_rng(i * 1000 + task.round)
                        theta[rng.choice(args.d, args.d // 20, replace=False)] = 0.02  # as if trained
                        up = client_update(thresholds, theta, task.seed, name, task.kappa, get_codec(task.codec),
                                           task.reference)
                        payload, reference = up.payload, up.reference_digest
                    header = pb.UpdateHeader(round=task.round, reference_digest=reference, total_length=len(payload),
                                             sha256=sha256_hex(payload), metrics=pb.Metrics(num_examples=100))
                    parts = [pb.UpdateChunk(header=header)] + [pb.UpdateChunk(data=p) for _, p in split(payload) if p]
                    started = time.perf_counter()
                    await stub.SubmitUpdate(iter(parts), metadata=md, timeout=60)
                    stats.latency["submit"].append(time.perf_counter() - started)
                except grpc.RpcError as exc:
                    stats.fail(exc, "round")
                after = task.round
        finally:
            done.set()
            stats.alive.discard(name)
            await beating


async def drive(args, address: str, ca: bytes, token: str, operator: str, server: subprocess.Popen) -> dict:
    stats = Stats()
    tasks = []
    for i in range(args.devices):  # devices power up at --ramp a second
        tasks.append(asyncio.ensure_future(device(i, args, address, ca, token, stats, args.deadline)))
        if i % 10 == 9:
            await asyncio.sleep(10 / args.ramp)
    false_offline, samples, reply = 0, 0, None
    async with grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(ca)) as channel:
        status = rpc.CoordinatorStub(channel)
        md = (("authorization", "Bearer " + operator),)
        while not all(t.done() for t in tasks):
            await asyncio.sleep(1.0)
            if len(stats.asked) < args.devices:
                continue
            alive = len(stats.alive)
            try:
                reply = await status.GetStatus(pb.StatusRequest(), metadata=md, timeout=10)
            except grpc.RpcError as exc:
                stats.fail(exc, "GetStatus")
                continue
            if reply.phase == pb.DONE:
                continue
            samples += 1
            false_offline = max(false_offline, alive - reply.online)
        rounds = len(reply.history) if reply is not None else 0
    await asyncio.gather(*tasks)
    return {"stats": stats, "false_offline": false_offline, "status_samples": samples, "rounds": rounds}


def usage(pid: int) -> dict:
    with open(f"/proc/{pid}/status") as f:
        peak_kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return {"coordinator_peak_rss_mb": round(peak_kb / 1024, 1),
            "coordinator_cpu_s": round((int(fields[11]) + int(fields[12])) / ticks, 2)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3, help="mask rounds after the head round")
    parser.add_argument("--rho", type=float, default=0.05, help="fraction of online devices asked each round")
    parser.add_argument("--heartbeat", type=float, default=10.0, help="heartbeat interval (s), the server's too")
    parser.add_argument("--poll", type=float, default=30.0, help="long-poll length (s)")
    parser.add_argument("--d", type=int, default=4096, help="masked parameters (no model: d alone)")
    parser.add_argument("--deadline", type=float, default=120.0, help="round deadline (s)")
    parser.add_argument("--train-s", type=float, default=None,
                        help="a selected device 'trains' 0.5 to 1.5 times this long (default: 2 heartbeat intervals)")
    parser.add_argument("--ramp", type=float, default=200.0,
                        help="devices starting per second (each a new TLS connection and an enrollment)")
    parser.add_argument("--keep", default=None, help="keep the coordinator's folder here")
    args = parser.parse_args(argv)
    if args.train_s is None:
        args.train_s = 2 * args.heartbeat
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # a socket per device on each side
    folder = Path(args.keep or tempfile.mkdtemp(prefix="deltamask-fleet-"))
    folder.mkdir(parents=True, exist_ok=True)
    from server.demo import free_port

    port, state = free_port(), folder / "state"
    config = {"listen": f"127.0.0.1:{port}", "state_dir": str(state), "backbone": None, "d": args.d,
              "num_classes": CLASSES, "expected_clients": args.devices, "min_quorum": 1, "rho": args.rho,
              "head": "linear_probe", "head_rho": args.rho, "rounds": args.rounds, "round_deadline_s": args.deadline,
              "heartbeat_interval_s": args.heartbeat, "codec": "exact", "exit_when_done": False,
              "tls": {"cert": str(state / "tls" / "server.pem"), "key": str(state / "tls" / "server.key")},
              "local": {"head_epochs": 1}}
    (folder / "server.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cli = [sys.executable, "-m", "server.cli"]
    conf = ["--config", str(folder / "server.yaml")]
    subprocess.run(cli + ["tls", *conf, "--hosts", "localhost,127.0.0.1"], env=env, check=True, capture_output=True)
    token = subprocess.run(cli + ["token", *conf, "--uses", "0", "--ttl", "2h"], env=env, check=True,
                           capture_output=True, text=True).stdout.strip()
    operator = Path(subprocess.run(cli + ["operator", *conf], env=env, check=True, capture_output=True,
                                   text=True).stdout.strip()).read_text().strip()
    log = open(folder / "server.log", "wb")
    server = subprocess.Popen(cli + conf, env=env, stdout=subprocess.DEVNULL, stderr=log)
    started = time.monotonic()
    try:
        ca = (state / "tls" / "ca.pem").read_bytes()
        result = asyncio.run(drive(args, f"localhost:{port}", ca, token, operator, server))
        used = usage(server.pid)
    finally:
        server.terminate()
        server.wait(60)
    stats = result["stats"]
    print(json.dumps({"devices": args.devices, "rounds": result["rounds"], "errors": dict(stats.errors), "error_details": dict(stats.details),
                      "error_count": sum(stats.errors.values()), "false_offline": result["false_offline"],
                      "status_samples": result["status_samples"], "heartbeat_interval_s": args.heartbeat,
                      "rho": args.rho, "d": args.d, "train_s": args.train_s, "ramp_per_s": args.ramp,
                      "heartbeat": percentiles(stats.latency["heartbeat"]),
                      "task_delivery": percentiles(stats.latency["task_delivery"]),
                      "submit": percentiles(stats.latency["submit"]), **used,
                      "wall_s": round(time.monotonic() - started, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
