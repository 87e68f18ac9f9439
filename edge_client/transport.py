"""The agent's side of the wire: a TLS keepalive channel carrying the device credential, retries with backoff,
chunked transfers."""
import collections
import logging
import random
import threading
import time
from typing import Callable, Iterator, Optional, TypeVar

import grpc

from deltamask.transfer import Assembler, sha256_hex, split
from deltamask.v1 import coordinator_pb2 as pb
from deltamask.v1 import coordinator_pb2_grpc as rpc

log = logging.getLogger(__name__)
T = TypeVar("T")

# Ping every 60 s even with no call in flight, so that NATs and proxies keep an hour-long idle channel
# (a Pi training between calls) open; the coordinator allows pings every 20 s (server.service).
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", 8 << 20),
    ("grpc.enable_retries", 0),  # retries are ours (Backoff), with jitter and logging
]
# the network or a coordinator going away (calls in flight at its shutdown end CANCELLED), not the request
RETRY = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
CALL_TIMEOUT_S = 60.0
# Every call is made with wait_for_ready=True: it waits (up to its timeout) for the channel to connect
# instead of failing at once while the channel is reconnecting. It also keeps a call in flight while
# the HTTP/2 handshake runs: with none in flight, a background reconnect can stall and time out.


def channel_options(max_backoff_s: float = 60.0) -> list:
    """CHANNEL_OPTIONS, with gRPC's own reconnect backoff bounded by the agent's (gRPC's default grows to
    120 s: an agent could sleep through a coordinator restart of a few seconds)."""
    cap_ms = int(max(1.0, max_backoff_s) * 1000)
    return CHANNEL_OPTIONS + [("grpc.initial_reconnect_backoff_ms", min(1000, cap_ms)),
                              ("grpc.min_reconnect_backoff_ms", min(1000, cap_ms)),
                              ("grpc.max_reconnect_backoff_ms", cap_ms)]


class _Credential(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                  grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer <credential>` to every call, reading the credential when the call starts
    (it changes once, when the device enrolls)."""

    def __init__(self, credential: Callable[[], str]) -> None:
        self.credential = credential

    def _with(self, details):
        secret = self.credential()
        if not secret:
            return details
        metadata = [m for m in (details.metadata or ()) if m[0] != "authorization"]
        metadata.append(("authorization", "Bearer " + secret))
        return _Details(details.method, details.timeout, metadata, details.credentials,
                        getattr(details, "wait_for_ready", None), getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._with(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._with(details), request_iterator)


class _Details(collections.namedtuple("_Details", ("method", "timeout", "metadata", "credentials",
                                                    "wait_for_ready", "compression")),
               grpc.ClientCallDetails):
    pass


def connect(address: str, ca: Optional[str] = None, credential: Callable[[], str] = lambda: "",
            max_backoff_s: float = 60.0, insecure: bool = False, client_cert: Optional[str] = None,
            client_key: Optional[str] = None) -> rpc.CoordinatorStub:
    """A stub on a TLS channel that trusts the coordinator's CA certificate (the file `ca`; with a client
    certificate and key for mutual TLS), or on a plaintext one with `insecure`; every call carries the
    device's credential."""
    options = channel_options(max_backoff_s)
    if insecure:
        channel = grpc.insecure_channel(address, options=options)
    elif ca:
        pem = [_read(path) for path in (ca, client_key, client_cert)]
        channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(*pem), options=options)
    else:
        raise ValueError("connecting needs the coordinator's CA certificate (ca: FILE), or insecure: true")
    return rpc.CoordinatorStub(with_credential(channel, credential))


def _read(path: Optional[str]) -> Optional[bytes]:
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()


def with_credential(channel: grpc.Channel, credential: Callable[[], str]) -> grpc.Channel:
    """`channel`, every call on it carrying `authorization: Bearer <credential()>` (when not empty)."""
    return grpc.intercept_channel(channel, _Credential(credential))


class Backoff:
    """Exponential backoff with full jitter: the n-th wait is uniform in [0, min(cap, base * 2^n)]."""

    def __init__(self, base_s: float = 0.5, cap_s: float = 60.0, rng: Optional[random.Random] = None,
                 on_wait: Optional[Callable[[], None]] = None) -> None:
        self.base_s, self.cap_s, self.attempt = base_s, cap_s, 0
        self.rng = rng or random.Random()
        self.on_wait = on_wait  # called before every wait (the agent feeds its watchdog: retrying is not a hang)

    def next_wait(self) -> float:
        wait = self.rng.uniform(0, min(self.cap_s, self.base_s * 2 ** self.attempt))
        self.attempt += 1
        return wait

    def reset(self) -> None:
        self.attempt = 0


def retrying(call: Callable[[], T], what: str, backoff: Backoff, stop: Optional[threading.Event] = None) -> T:
    """call() until it succeeds or fails with a status that retrying cannot fix."""
    while True:
        try:
            result = call()
            backoff.reset()
            return result
        except grpc.RpcError as exc:
            if exc.code() not in RETRY:
                raise
            wait = backoff.next_wait()
            if backoff.on_wait is not None:
                backoff.on_wait()
            log.warning("%s: %s (%s); retrying in %.1f s", what, exc.code().name, exc.details(), wait)
            if stop is not None and stop.wait(wait):
                raise
            if stop is None:
                time.sleep(wait)


def fetch_theta(stub: rpc.CoordinatorStub, device_id: str, round_index: int, limit: int, backoff: Backoff,
                stop: Optional[threading.Event] = None) -> bytes:
    """The round's theta wire bytes; a broken stream resumes from the bytes already received."""
    parts: Optional[Assembler] = None

    def attempt() -> bytes:
        nonlocal parts
        offset = parts.received if parts is not None else 0
        for chunk in stub.FetchTheta(pb.FetchRequest(device_id=device_id, round=round_index, offset=offset),
                                     timeout=CALL_TIMEOUT_S * 10, wait_for_ready=True):
            if parts is None:
                parts = Assembler(chunk.total_length, chunk.sha256, limit)
            parts.add(chunk.offset, chunk.data)
        assert parts is not None
        return parts.result()

    return retrying(attempt, f"fetch theta of round {round_index}", backoff, stop)


def update_chunks(header: pb.UpdateHeader, payload: bytes) -> Iterator[pb.UpdateChunk]:
    yield pb.UpdateChunk(header=header)
    for _, piece in split(payload):
        if piece:
            yield pb.UpdateChunk(data=piece)


def submit_update(stub: rpc.CoordinatorStub, header: pb.UpdateHeader, payload: bytes, backoff: Backoff,
                  stop: Optional[threading.Event] = None) -> pb.SubmitReply:
    """Upload, retrying a broken connection; a retry of an update already taken is acknowledged as a duplicate."""
    header.total_length, header.sha256 = len(payload), sha256_hex(payload)
    return retrying(lambda: stub.SubmitUpdate(update_chunks(header, payload), timeout=CALL_TIMEOUT_S * 10,
                                                    wait_for_ready=True),
                    f"upload for round {header.round}", backoff, stop)
