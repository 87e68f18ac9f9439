"""deltamask-client: run the edge agent.

    deltamask-client --config client.yaml

Exits 0 when the coordinator says training is over (with exit_when_done), 2 on a configuration, model,
data or enrollment error, 3 when the coordinator refuses the device for good (its enrollment token is
unknown, expired or used; its name is taken), 130 on Ctrl-C / SIGTERM.
"""
import argparse
import logging
import signal
import sys
from typing import List, Optional

import grpc

from deltamask.errors import DeltaMaskError
from deltamask.yamlconfig import ConfigError
from edge_client.config import load_config
from edge_client.energy import EnergyError


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="deltamask-client", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="YAML configuration (see edge_client/example.yaml)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config)
        from edge_client.agent import Agent, EnrollmentError

        agent = Agent(config)
    except (ConfigError, DeltaMaskError, ValueError, EnergyError) as exc:
        print(f"deltamask-client: error: {exc}", file=sys.stderr)
        return 2

    def on_signal(*_) -> None:
        agent.stop.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        return agent.run()
    except (DeltaMaskError, ValueError, EnrollmentError) as exc:
        print(f"deltamask-client: error: {exc}", file=sys.stderr)
        return 2
    except grpc.RpcError as exc:  # refused for good: an enrollment token unknown, expired or used, a name taken
        print(f"deltamask-client: error: the coordinator refused: {exc.code().name}: {exc.details()}",
              file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
