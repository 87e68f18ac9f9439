"""deltamask-server: run the coordinator, and make what it needs to run securely.

    deltamask-server tls      --config server.yaml [--hosts coordinator.lan,10.0.0.5]   # CA + certificate
    deltamask-server client-cert --config server.yaml --name pi-kitchen   # for mutual TLS (tls.client_ca)
    deltamask-server token    --config server.yaml [--name pi-kitchen] [--ttl 24h] [--uses 1]
    deltamask-server operator --config server.yaml    # the operator credential's file (GetStatus, admin calls)
    deltamask-server export   --config server.yaml --out model.onnx [--format onnx|torch] [--mask expected|sample|mode]
    deltamask-server [serve]  --config server.yaml    # one JSON line per closed round on stdout

`serve` refuses to start without TLS unless the configuration says `insecure: true`. SIGTERM or Ctrl-C:
the health service turns NOT_SERVING, calls in flight finish, the process exits; all state is already on
disk (state_dir) and the next start resumes from it.
"""
import argparse
import json
import logging
import re
import signal
import sys
import threading
import time
from pathlib import Path
from typing import List, Optional

from deltamask.errors import DeltaMaskError
from deltamask.yamlconfig import ConfigError
from server.config import load_config
from server.export import MASKS

log = logging.getLogger("deltamask.server")
COMMANDS = ("serve", "tls", "client-cert", "token", "operator", "export")
DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS + ("-h", "--help"):
        argv.insert(0, "serve")
    parser = argparse.ArgumentParser(prog="deltamask-server", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.split("\n")[2:8]))
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {name: sub.add_parser(name, help=help_) for name, help_ in (
        ("serve", "run the coordinator"), ("tls", "make a CA (once) and a server certificate in state_dir/tls"),
        ("client-cert", "make a client certificate from the CA (mutual TLS)"),
        ("token", "make an enrollment token and print it"), ("operator", "make the operator credential's file"),
        ("export", "write the fine-tuned model (the kept round's mask and the head) as one ONNX or TorchScript file"))}
    for p in commands.values():
        p.add_argument("--config", required=True, help="YAML configuration (see server/example.yaml)")
        p.add_argument("--log-level", default="INFO")
    commands["tls"].add_argument("--hosts", default="",
                                 help="comma-separated names and addresses devices reach the coordinator by "
                                      "(default: localhost, 127.0.0.1, ::1 and this host's name)")
    commands["client-cert"].add_argument("--name", required=True, help="the device's name (the certificate's CN)")
    commands["token"].add_argument("--name", default=None, help="a device token for this name only (default: a "
                                                                "fleet token, for new names)")
    commands["token"].add_argument("--ttl", default="24h", help="valid for: 90s, 30m, 24h, 7d (default 24h)")
    commands["token"].add_argument("--uses", type=int, default=1,
                                   help="enrollments it allows, 0 for any number until it expires (default 1)")
    commands["export"].add_argument("--out", required=True, help="the model file to write (model.onnx)")
    commands["export"].add_argument("--format", choices=("onnx", "torch"), default="onnx")
    commands["export"].add_argument("--mask", choices=MASKS, default="expected",
                                    help="expected: every masked weight times its theta (default); sample: the "
                                         "seeded sample the kept round was scored with; mode: theta >= 1/2")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config)
        return {"serve": serve, "tls": make_tls, "client-cert": client_cert, "token": make_token,
                "operator": operator, "export": export_model}[args.command](config, args)
    except (ConfigError, DeltaMaskError, ValueError, OSError) as exc:
        print(f"deltamask-server: error: {exc}", file=sys.stderr)
        return 2


def make_tls(config, args) -> int:
    from server.security import default_hosts, make_tls

    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()] or default_hosts()
    folder = Path(config.state_dir) / "tls"
    paths = make_tls(folder, hosts)
    print(f"# a server certificate for {', '.join(hosts)}, signed by the CA in {folder}\n"
          f"# add to {args.config}:\ntls:\n  cert: {paths['server_pem']}\n  key: {paths['server_key']}\n"
          f"# and give devices the CA certificate (not its key): {paths['ca_pem']}")
    return 0


def client_cert(config, args) -> int:
    from server.security import make_client_cert

    paths = make_client_cert(Path(config.state_dir) / "tls", args.name)
    print(f"# a client certificate for {args.name}; on the device (agent.yaml):\n"
          f"client_cert: {paths['cert']}\nclient_key: {paths['key']}\n"
          f"# and on the coordinator (server.yaml), to require one from every device:\n"
          f"#   tls: {{client_ca: {Path(config.state_dir) / 'tls' / 'ca.pem'}}}")
    return 0


def parse_duration(text: str) -> float:
    m = DURATION.match(text.strip())
    if not m:
        raise ValueError(f"--ttl {text!r}: expected a number with s, m, h or d (e.g. 24h)")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def make_token(config, args) -> int:
    from server.security import issue_token
    from server.store import Store

    if args.uses < 0:
        raise ValueError(f"--uses must be 0 (any number) or more, got {args.uses}")
    store = Store(config.state_dir)
    try:
        token = issue_token(store, args.name, parse_duration(args.ttl), args.uses or None)
    finally:
        store.close()
    scope = f"device {args.name!r}" if args.name else "any new device name"
    uses = f"{args.uses} enrollment{'s' if args.uses != 1 else ''}" if args.uses else "any number of enrollments"
    print(f"# enrollment token for {scope}: {uses}, valid {args.ttl}", file=sys.stderr)
    print(token)
    return 0


def export_model(config, args) -> int:
    from server.evaluation import model_facts
    from server.export import export

    meta = export(config, model_facts(config), Path(args.out), args.format, args.mask)
    keys = ("round", "phase", "mask", "accuracy", "theta_sha256")
    print(json.dumps({"out": args.out, **{k: meta[k] for k in keys}}))
    return 0


def operator(config, args) -> int:
    print(operator_credential(config))
    return 0


def operator_credential(config) -> Path:
    """state_dir/operator.credential, made (mode 0600) when the state has no operator credential yet."""
    from server.security import digest, new_secret, write_secret
    from server.store import Store

    path = Path(config.state_dir) / "operator.credential"
    store = Store(config.state_dir)
    try:
        if store.get_meta("operator_sha256") is None or not path.exists():
            credential = new_secret("dmo", "operator")
            write_secret(path, credential + "\n")
            store.set_meta("operator_sha256", digest(credential))
            log.info("operator credential written to %s (mode 0600)", path)
    finally:
        store.close()
    return path


def serve(config, args) -> int:
    from server.coordinator import Coordinator
    from server.evaluation import Evaluator, model_facts
    from server.recovery import StateError
    from server.service import INSECURE_HELP, Server
    from server.store import Store

    if config.tls is None and not config.insecure:
        print(f"deltamask-server: error: {INSECURE_HELP}", file=sys.stderr)
        return 2
    if config.insecure:
        log.warning("serving PLAINTEXT (insecure: true): credentials and updates cross the network readable")
    operator_credential(config)
    facts = model_facts(config)
    evaluate = Evaluator(config) if config.evaluation is not None else None
    try:
        coordinator = Coordinator(config, facts, Store(config.state_dir), evaluate=evaluate,
                                  on_round=lambda summary: print(json.dumps(summary), flush=True))
    except StateError as exc:
        print(f"deltamask-server: error: {exc}", file=sys.stderr)
        return 2
    if config.metrics_listen is not None:
        from server.metrics import Metrics

        coordinator.metrics = Metrics(coordinator)
        metrics_server, port = coordinator.metrics.serve(config.metrics_listen)
        log.info("Prometheus metrics on http://%s:%d/metrics", config.metrics_listen.rpartition(":")[0], port)
    server = Server(coordinator, config.listen, tls=config.tls, insecure=config.insecure, limits=config.limits)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    log.info("serving on port %d (%s): d = %d, %d mask rounds, state in %s", server.port,
             "plaintext" if config.tls is None else "TLS", facts.d, config.rounds, config.state_dir)
    rounds = threading.Thread(target=coordinator.run, name="rounds", daemon=True)
    rounds.start()
    done_at = None
    while not stop.wait(0.5):
        if config.exit_when_done and coordinator.done.is_set():
            done_at = done_at or time.monotonic()
            if coordinator.everyone_told_done() or time.monotonic() - done_at > config.done_grace_s:
                break
    server.stop()
    if config.metrics_listen is not None:
        metrics_server.shutdown()
    rounds.join(timeout=10)
    coordinator.flush_told()
    coordinator.store.close()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
