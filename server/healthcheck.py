"""Ask a coordinator's gRPC health service whether it serves: exit 0 when SERVING, 1 otherwise.

    python -m server.healthcheck [ADDRESS] [--ca CA.pem] [--service deltamask.v1.Coordinator] [--timeout S]

ADDRESS defaults to 127.0.0.1:50051. The coordinator registers two names with the standard
grpc.health.v1 service: "" (the whole server) and "deltamask.v1.Coordinator"; it turns both NOT_SERVING
when it is told to stop (SIGTERM). Anything other than SERVING (NOT_SERVING, an unknown service name,
no answer within the timeout, nothing listening) exits 1 and says why on stderr. With --ca (or the
environment's DELTAMASK_CA) it speaks TLS and checks the certificate against that CA; without, plaintext
(a coordinator started with insecure: true). Health answers without a credential. Made for container
health checks (docker/compose.yaml): it imports only grpcio and grpcio-health-checking.
"""
import argparse
import os
import sys
from typing import List, Optional

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEFAULT_ADDRESS = "127.0.0.1:50051"
DEFAULT_SERVICE = "deltamask.v1.Coordinator"  # server.service.SERVICE_NAME (a test keeps them equal)


def check(address: str = DEFAULT_ADDRESS, service: str = DEFAULT_SERVICE, timeout: float = 5.0,
          ca: Optional[str] = None) -> str:
    """The serving status's name (SERVING, NOT_SERVING, ...) or, when the call failed, the gRPC code's name."""
    if ca:
        with open(ca, "rb") as f:
            channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(f.read()))
    else:
        channel = grpc.insecure_channel(address)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout,
                               wait_for_ready=False)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            return code.name if code is not None else "ERROR"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.healthcheck", description=__doc__.split("\n")[0])
    parser.add_argument("address", nargs="?", default=DEFAULT_ADDRESS, help=f"host:port (default {DEFAULT_ADDRESS})")
    parser.add_argument("--service", default=DEFAULT_SERVICE,
                        help=f"service name to ask about; '' for the whole server (default {DEFAULT_SERVICE})")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the answer (default 5)")
    parser.add_argument("--ca", default=os.environ.get("DELTAMASK_CA"),
                        help="the coordinator's CA certificate: speak TLS (default: $DELTAMASK_CA; none: plaintext)")
    parser.add_argument("--quiet", "-q", action="store_true", help="print nothing when SERVING")
    args = parser.parse_args(argv)
    status = check(args.address, args.service, args.timeout, args.ca)
    if status == "SERVING":
        if not args.quiet:
            print(f"{args.address} {args.service or '(server)'}: SERVING")
        return 0
    print(f"{args.address} {args.service or '(server)'}: {status}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
