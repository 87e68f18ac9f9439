"""What the RPC tests share: TLS files for localhost, a channel that carries a device's credential, enrolling."""
from pathlib import Path
from typing import Dict

import grpc

from deltamask.v1 import coordinator_pb2 as pb
from deltamask.v1 import coordinator_pb2_grpc as rpc
from edge_client.transport import channel_options, with_credential
from server.config import Tls
from server.security import issue_token, make_tls

HOSTS = ["localhost", "127.0.0.1"]


def tls_files(folder: Path) -> Tls:
    paths = make_tls(folder, HOSTS)
    return Tls(cert=paths["server_pem"], key=paths["server_key"])


def ca_of(tls: Tls) -> bytes:
    return (Path(tls.cert).parent / "ca.pem").read_bytes()


def secure_channel(port: int, tls: Tls) -> grpc.Channel:
    return grpc.secure_channel(f"localhost:{port}", grpc.ssl_channel_credentials(ca_of(tls)),
                               options=channel_options(1.0))


class Keys:
    """The credentials a test's devices hold; a stub made by `stub` sends the current one."""

    def __init__(self) -> None:
        self.by_name: Dict[str, str] = {}
        self.current = ""

    def __call__(self) -> str:
        return self.current

    def stub(self, channel: grpc.Channel) -> rpc.CoordinatorStub:
        stub = rpc.CoordinatorStub(with_credential(channel, self))
        stub.keys = self
        return stub


def enroll(stub, store, name: str = "pi-1", **register) -> pb.RegisterReply:
    """Register `name` as its agent would: again with its credential when it has one, else enroll with a new
    single-use device token; the stub's keys then hold (and send) that device's credential."""
    keys = stub.keys
    keys.current = keys.by_name.get(name, "")
    request = pb.RegisterRequest(name=name, kind=pb.RPI4, memory_bytes=4 << 30, **register)
    if not keys.current:
        request.enrollment_token = issue_token(store, name)
    reply = stub.Register(request)
    if reply.credential:
        keys.by_name[name] = keys.current = reply.credential
    return reply


def as_device(stub, name: str) -> None:
    """Make the stub send `name`'s credential from now on."""
    stub.keys.current = stub.keys.by_name[name]


def server_secrets(server_yaml: Path, python: str, env: dict, cwd: Path) -> str:
    """Make the TLS files the server config names (`deltamask-server tls`) and one fleet token for any number
    of enrollments (`deltamask-server token --uses 0`), as an operator would, with the server's Python."""
    import subprocess

    hosts = ",".join(HOSTS)
    subprocess.run([python, "-m", "server.cli", "tls", "--config", str(server_yaml), "--hosts", hosts], cwd=cwd,
                   env=env, check=True, capture_output=True)
    made = subprocess.run([python, "-m", "server.cli", "token", "--config", str(server_yaml), "--uses", "0",
                           "--ttl", "1h"], cwd=cwd, env=env, check=True, capture_output=True, text=True)
    return made.stdout.strip()


def tls_config(state_dir: Path) -> dict:
    """The server config's tls: keys for the files `deltamask-server tls` makes in state_dir/tls."""
    return {"cert": str(state_dir / "tls" / "server.pem"), "key": str(state_dir / "tls" / "server.key")}
