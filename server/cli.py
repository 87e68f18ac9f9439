"""deltamask-server: run the coordinator.

    deltamask-server --config server.yaml     # one JSON line per closed round on stdout

SIGTERM or Ctrl-C: the health service turns NOT_SERVING, calls in flight finish, the process exits;
all state is already on disk (state_dir) and the next start resumes from it.
"""
import argparse
import json
import logging
import signal
import sys
import threading
import time
from typing import List, Optional

from deltamask.errors import DeltaMaskError
from deltamask.yamlconfig import ConfigError
from server.config import load_config
from server.coordinator import Coordinator
from server.store import Store

log = logging.getLogger("deltamask.server")
DONE_GRACE_S = 15.0  # with exit_when_done: how long online devices get to hear that training is over


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="deltamask-server", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="YAML configuration (see server/example.yaml)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config)
        from server.evaluation import Evaluator, model_facts
        from server.service import Server

        facts = model_facts(config)
        evaluate = Evaluator(config) if config.evaluation is not None else None
        coordinator = Coordinator(config, facts, Store(config.state_dir), evaluate=evaluate,
                                  on_round=lambda summary: print(json.dumps(summary), flush=True))
        server = Server(coordinator, config.listen)
    except (ConfigError, DeltaMaskError, ValueError, OSError) as exc:
        print(f"deltamask-server: error: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    log.info("serving on port %d: d = %d, %d mask rounds, state in %s", server.port, facts.d, config.rounds,
             config.state_dir)
    rounds = threading.Thread(target=coordinator.run, name="rounds", daemon=True)
    rounds.start()
    done_at = None
    while not stop.wait(0.5):
        if config.exit_when_done and coordinator.done.is_set():
            done_at = done_at or time.monotonic()
            if coordinator.everyone_told_done() or time.monotonic() - done_at > DONE_GRACE_S:
                break
    server.stop()
    rounds.join(timeout=10)
    coordinator.store.close()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
