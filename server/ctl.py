"""deltamask-ctl: the operator's view of a running coordinator, over its gRPC API, as the operator.

    deltamask-ctl --config server.yaml status         # address, CA and operator credential from the config
    deltamask-ctl --address coord:50051 --ca ca.pem --credential-file operator.credential devices
    deltamask-ctl --config server.yaml rounds | energy | watch [--interval 2] | plot --out charts/
    deltamask-ctl --config server.yaml export --out model.onnx [--format onnx|torch] [--mask expected|sample|mode]
    deltamask-ctl --config server.yaml revoke rpi4-kitchen   # a lost or stolen board: its credential stops working

Commands: `status` (round, phase, devices registered and online), `devices` (name, kind, online, last seen),
`rounds` (each round: phase, state, selected and received, accuracy with a sampled mask and of the expected
network, uplink and downlink bpp), `export`
(the fine-tuned model as one ONNX or TorchScript file, built here from the kept round's theta and head:
the file `deltamask-server export` writes, away from the coordinator; needs torch and the backbone's
weights), `energy` (joules per device and phase per round, from the measurements the devices sent with their updates: an
INA219, INA3221 or RAPL meter on the device), `watch` (status and the last rounds, redrawn every
--interval seconds), `plot` (PNG charts of accuracy, bits per parameter and joules per round), `revoke NAME`
(the device's credential stops working at once; only a new token made for its name enrolls it again). `--json`
prints JSON instead of tables. The operator credential is state_dir/operator.credential, written by the
coordinator at its first start (mode 0600).
"""
import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import grpc

from deltamask.v1 import coordinator_pb2 as pb
from server.export import MASKS

PHASE_NAMES = {pb.IDLE: "idle", pb.HEAD: "head", pb.MASK: "mask", pb.REFIT: "refit", pb.DONE: "done"}


class Operator:
    """The coordinator's operator calls, with the operator credential on every call."""

    def __init__(self, address: str, ca: Optional[str], credential: str, timeout_s: float = 10.0) -> None:
        from edge_client.transport import connect

        self.stub, self.timeout = connect(address, ca, lambda: credential), timeout_s

    def status(self) -> Dict:
        s = self.stub.GetStatus(pb.StatusRequest(), timeout=self.timeout)
        return {"round": s.round, "phase": PHASE_NAMES.get(s.phase, "?"), "registered": s.registered,
                "online": s.online, "rounds": [
                    {"round": h.round, "phase": PHASE_NAMES.get(h.phase, "?"), "state": h.state,
                     "selected": h.selected, "received": h.received,
                     "accuracy": h.accuracy if h.accuracy >= 0 else None,
                     "accuracy_expected": h.accuracy_expected if h.accuracy_expected >= 0 else None,
                     "uplink_bpp": h.uplink_bpp,
                     "downlink_bpp": h.downlink_bpp} for h in s.history]}

    def devices(self) -> List[Dict]:
        reply = self.stub.ListDevices(pb.DevicesRequest(), timeout=self.timeout)
        return [{"name": d.name, "device_id": d.device_id, "kind": d.kind, "online": d.online,
                 "seen_s_ago": d.seen_s_ago if d.seen_s_ago >= 0 else None, "codec": d.codec,
                 "told_done": d.told_done, "revoked": d.revoked} for d in reply.devices]

    def revoke(self, name: str) -> Dict:
        reply = self.stub.RevokeDevice(pb.RevokeRequest(name=name), timeout=self.timeout)
        return {"name": name, "device_id": reply.device_id, "was_revoked": reply.was_revoked}

    def release(self, limit: int = 4 << 30) -> bytes:
        """The coordinator's kept round as a release (server/export.py), fetched in chunks."""
        from deltamask.transfer import Assembler

        parts = None
        for chunk in self.stub.FetchModel(pb.ModelRequest(offset=0), timeout=max(self.timeout, 600)):
            parts = parts or Assembler(chunk.total_length, chunk.sha256, limit)
            parts.add(chunk.offset, chunk.data)
        if parts is None:
            raise ValueError("the coordinator sent an empty model")
        return parts.result()

    def energy(self, from_round: int = 0) -> List[Dict]:
        """Joules per device and phase per round (rows with no meter are kept, with energy_j 0 and meter "")."""
        reply = self.stub.ListUpdates(pb.UpdatesRequest(from_round=from_round), timeout=self.timeout)
        return [{"round": u.round, "phase": PHASE_NAMES.get(u.phase, "?"), "name": u.name, "bytes": u.nbytes,
                 "energy_j": u.metrics.energy_j, "meter": u.metrics.energy_meter, "train_s": u.metrics.train_s,
                 "encode_s": u.metrics.encode_s} for u in reply.updates]


def render(rows: List[Dict], columns: List[str]) -> str:
    """A plain-text table of `rows` (missing values shown as -)."""
    def cell(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    table = [columns] + [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in table)


ROUND_COLUMNS = ["round", "phase", "state", "selected", "received", "accuracy", "accuracy_expected", "uplink_bpp",
                 "downlink_bpp"]


def status_text(s: Dict, last: int = 0) -> str:
    head = f"round {s['round']}  phase {s['phase']}  devices {s['registered']} registered, {s['online']} online"
    return head if not last else head + "\n\n" + render(s["rounds"][-last:], ROUND_COLUMNS)


def plot(op: Operator, out: Path) -> List[Path]:
    """accuracy.png, bpp.png and energy.png (joules per round by phase) in `out`; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    rounds = [r for r in op.status()["rounds"] if r["state"] == "closed"]
    paths = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        paths.append(out / name)

    fig, ax = plt.subplots(figsize=(6.4, 4))
    scored = [r for r in rounds if r["accuracy"] is not None]
    ax.plot([r["round"] for r in scored], [r["accuracy"] for r in scored], marker="o", label="a sampled mask")
    expected = [r for r in scored if r["accuracy_expected"] is not None]
    if expected:  # the network `export` writes by default
        ax.plot([r["round"] for r in expected], [r["accuracy_expected"] for r in expected], marker="s",
                label="expected network w * theta")
        ax.legend()
    ax.set_xlabel("round")
    ax.set_ylabel("held-out accuracy")
    ax.set_title("accuracy per round" if scored else "accuracy per round (no evaluation configured)")
    ax.grid(alpha=0.3)
    save(fig, "accuracy.png")

    fig, ax = plt.subplots(figsize=(6.4, 4))
    x = [r["round"] for r in rounds]
    ax.plot(x, [max(r["uplink_bpp"], 1e-9) for r in rounds], marker="o", label="uplink (mean per device)")
    ax.plot(x, [max(r["downlink_bpp"], 1e-9) for r in rounds], marker="s", label="downlink (theta)")
    ax.set_yscale("log")
    ax.set_xlabel("round")
    ax.set_ylabel("bits per parameter (log)")
    ax.set_title("bits per parameter per round")
    ax.legend()
    ax.grid(alpha=0.3)
    save(fig, "bpp.png")

    fig, ax = plt.subplots(figsize=(6.4, 4))
    joules: Dict[str, Dict[int, float]] = {}
    for u in op.energy():
        joules.setdefault(u["phase"], {}).setdefault(u["round"], 0.0)
        joules[u["phase"]][u["round"]] += u["energy_j"]
    for phase, by_round in sorted(joules.items()):
        ax.bar(list(by_round), list(by_round.values()), label=f"{phase} rounds")
    ax.set_xlabel("round")
    ax.set_ylabel("joules, all devices (as measured on them)")
    ax.set_title("device energy per round")
    if joules:
        ax.legend()
    ax.grid(alpha=0.3)
    save(fig, "energy.png")
    return paths


def from_config(path: str) -> Dict:
    """Address, CA and operator credential file of the coordinator a server config describes."""
    from server.config import load_config

    config = load_config(path)
    host, _, port = config.listen.rpartition(":")
    host = "localhost" if host in ("", "[::]", "0.0.0.0") else host
    ca = None if config.tls is None else str(Path(config.tls.cert).parent / "ca.pem")
    return {"address": f"{host}:{port}", "ca": ca,
            "credential_file": str(Path(config.state_dir) / "operator.credential")}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="deltamask-ctl", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="the coordinator's config: address, CA and credential from it")
    parser.add_argument("--address", help="host:port of the coordinator")
    parser.add_argument("--ca", help="the CA certificate (PEM) to trust; omit for a plaintext (insecure) coordinator")
    parser.add_argument("--credential-file", help="the operator credential (state_dir/operator.credential)")
    parser.add_argument("--json", action="store_true", help="JSON instead of tables")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("status", "devices", "rounds", "energy"):
        sub.add_parser(name)
    watch = sub.add_parser("watch")
    watch.add_argument("--interval", type=float, default=2.0)
    watch.add_argument("--count", type=int, default=0, help="redraw this many times, then exit (0: until ^C)")
    watch.add_argument("--last", type=int, default=10, help="rounds shown")
    charts = sub.add_parser("plot")
    charts.add_argument("--out", type=Path, required=True, help="folder for accuracy.png, bpp.png, energy.png")
    model = sub.add_parser("export")
    model.add_argument("--out", type=Path, required=True, help="the model file to write (model.onnx)")
    model.add_argument("--format", choices=("onnx", "torch"), default="onnx")
    model.add_argument("--mask", choices=MASKS, default="expected", help="as deltamask-server export's")
    model.add_argument("--weights", default="default", help="the backbone's pretrained weights here (default: "
                                                            "its offline copy)")
    sub.add_parser("revoke").add_argument("name", help="the device's enrolled name (deltamask-ctl devices)")
    args = parser.parse_args(argv)

    where = from_config(args.config) if args.config else {}
    address, ca = args.address or where.get("address"), args.ca or where.get("ca")
    credential_file = args.credential_file or where.get("credential_file")
    if not address or not credential_file:
        parser.error("give --config, or --address and --credential-file")
    try:
        credential = Path(credential_file).read_text().strip()
        op = Operator(address, ca, credential)
        if args.command == "watch":
            shown = 0
            while True:
                text = status_text(op.status(), args.last)
                print(("\033[H\033[J" if sys.stdout.isatty() else "") + text, flush=True)
                shown += 1
                if args.count and shown >= args.count:
                    return 0
                time.sleep(args.interval)
        if args.command == "export":
            from server.export import unpack_release, write_model

            meta = write_model(unpack_release(op.release()), args.out, args.format, args.mask, args.weights)
            print(json.dumps({"out": str(args.out), **{k: meta[k] for k in ("round", "phase", "mask", "accuracy",
                                                                             "theta_sha256")}}))
            return 0
        if args.command == "plot":
            for path in plot(op, args.out):
                print(path)
            return 0
        if args.command == "revoke":
            print(json.dumps(op.revoke(args.name)))
            return 0
        if args.command == "status":
            s = op.status()
            print(json.dumps({k: v for k, v in s.items() if k != "rounds"}) if args.json else status_text(s))
            return 0
        rows, columns = {
            "devices": (op.devices, ["name", "kind", "online", "seen_s_ago", "codec", "told_done", "revoked",
                                     "device_id"]),
            "rounds": (lambda: op.status()["rounds"], ROUND_COLUMNS),
            "energy": (op.energy, ["round", "phase", "name", "energy_j", "meter", "train_s", "encode_s", "bytes"]),
        }[args.command]
        data = rows()
        print(json.dumps(data) if args.json else render(data, columns))
        return 0
    except grpc.RpcError as exc:
        print(f"deltamask-ctl: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"deltamask-ctl: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
