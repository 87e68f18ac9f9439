"""The coordinator's gRPC face: the Coordinator service, health, reflection (v1 and v1alpha), TLS, limits.

Each RPC authenticates its caller from the call's metadata (`authorization: Bearer <credential>`), unpacks
its request, calls `server.coordinator.Coordinator`, and packs the answer; refusals become gRPC status codes
here and only here (`STATUS`). The server runs on asyncio (`grpc.aio`): a long poll, a heartbeat or a
health check holds no thread, so thousands of devices waiting for a round cost memory, not workers. Work
that takes time (enrolling: a database transaction; an upload: decoding and an fsync) runs in a bounded
thread pool, never on the event loop.
"""
import asyncio
import functools
import logging
import os
import threading
from concurrent import futures
from typing import Dict, Optional

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from deltamask.errors import PayloadError
from deltamask.federation import HEAD, MASK, REFIT
from deltamask.transfer import CHUNK_BYTES, Assembler, sha256_hex, split
from deltamask.v1 import coordinator_pb2 as pb
from deltamask.v1 import coordinator_pb2_grpc as rpc
from server.config import Limits, Tls
from server.coordinator import (DONE, IDLE, Busy, Conflict, Coordinator, CoordinatorError, Device, InvalidUpdate,
                                NotOpen, PermissionDenied, TooLarge, UnknownDevice)

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Coordinator"].full_name
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"

STATUS = {
    UnknownDevice: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    NotOpen: grpc.StatusCode.FAILED_PRECONDITION,
    InvalidUpdate: grpc.StatusCode.INVALID_ARGUMENT,
    TooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Conflict: grpc.StatusCode.ALREADY_EXISTS,
    Busy: grpc.StatusCode.UNAVAILABLE,
}
PHASES = {HEAD: pb.HEAD, MASK: pb.MASK, REFIT: pb.REFIT, IDLE: pb.IDLE, DONE: pb.DONE}
KIND_NAMES = {pb.RPI4: "rpi4", pb.JETSON_NANO: "jetson-nano", pb.CORAL: "coral", pb.LAPTOP: "laptop",
              pb.SERVER: "server", pb.DEVICE_KIND_UNSPECIFIED: "unspecified"}
INSECURE_HELP = ("no TLS configured: run `deltamask-server tls --config FILE` (it makes a CA and a server "
                 "certificate and prints the tls: keys to add), or set insecure: true to serve plaintext on a "
                 "network you trust")
MAX_WAIT_S = 300.0


def server_options(limits: Limits) -> list:
    # Edge devices train for up to an hour between calls. Their channels ping every 60 s (edge_client.transport);
    # a server that allows fewer pings answers with GOAWAY "too_many_pings" and drops the channel, the
    # failure other FL frameworks are known for. So: accept pings every 20 s, with or without calls.
    return [
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 20_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 20_000),
        ("grpc.http2.max_ping_strikes", 0),
        ("grpc.max_receive_message_length", limits.max_message_bytes),
        ("grpc.max_connection_age_ms", int(limits.max_connection_age_s * 1000)),
        ("grpc.max_connection_age_grace_ms", int(MAX_WAIT_S * 1000 + 60_000)),  # a long poll or upload finishes
        # gRPC shares a port by default (SO_REUSEPORT): a second coordinator on a port in use would start and take
        # half of the first one's connections. One coordinator per port: the second one fails to start.
        ("grpc.so_reuseport", 0),
    ]


def status_of(exc: CoordinatorError) -> grpc.StatusCode:
    return next(STATUS[kind] for kind in type(exc).__mro__ if kind in STATUS)


def _refusals(method):
    """Turn a CoordinatorError into the gRPC status of its kind."""

    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except CoordinatorError as exc:
            await context.abort(status_of(exc), str(exc))

    return wrapper


def bearer(context) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer "):]
    return ""


class CoordinatorService(rpc.CoordinatorServicer):
    def __init__(self, coordinator: Coordinator, limits: Limits, pool: futures.Executor,
                 chunk_bytes: int = CHUNK_BYTES) -> None:
        self.c, self.limits, self.pool, self.chunk_bytes = coordinator, limits, pool, chunk_bytes
        self.loop = asyncio.get_running_loop()
        self.changed = asyncio.Event()
        self.in_flight: Dict[str, int] = {}
        self.queued = 0  # uploads waiting for (or in) decoding
        coordinator.listeners.append(lambda: self.loop.call_soon_threadsafe(self._wake))

    def _wake(self) -> None:
        """A round opened or closed (or training ended): every long poll looks again."""
        event, self.changed = self.changed, asyncio.Event()
        event.set()

    def _caller(self, request, context) -> Device:
        """The device the call's credential belongs to; a device_id in the request must be its own."""
        device = self.c.authenticate(bearer(context))
        if request is not None and request.device_id and request.device_id != device.device_id:
            raise PermissionDenied("the request names another device than the caller's credential")
        return device

    def _slot(self, device: Device) -> "_Slot":
        return _Slot(self, device.device_id)

    async def _blocking(self, fn, *args):
        return await self.loop.run_in_executor(self.pool, fn, *args)

    @_refusals
    async def Register(self, request, context):
        kind = KIND_NAMES.get(request.kind, "unspecified")
        credential = ""
        if bearer(context):  # a device that restarted: its credential, no token
            device = self.c.authenticate(bearer(context))
            if request.name and request.name != device.name:
                raise PermissionDenied(f"this credential is {device.name!r}'s, not {request.name!r}'s")
            device = await self._blocking(self.c.register, device.name, kind, request.memory_bytes,
                                          request.preferred_codec)
        else:
            device, credential = await self._blocking(self.c.enroll, request.enrollment_token, request.name, kind,
                                                      request.memory_bytes, request.preferred_codec)
        c, facts = self.c.config, self.c.facts
        return pb.RegisterReply(device_id=device.device_id, heartbeat_interval_s=c.heartbeat_interval_s,
                                backbone=c.backbone or "", blocks=c.blocks, image_size=c.image_size, d=facts.d,
                                layout_digest=facts.layout_digest, num_classes=c.num_classes,
                                max_upload_bytes=self.c.max_upload_bytes, credential=credential)

    @_refusals
    async def Heartbeat(self, request, context):
        device = self._caller(request, context)
        return pb.HeartbeatReply(round=self.c.heartbeat(device.device_id))

    @_refusals
    async def GetTask(self, request, context):
        device = self._caller(request, context)
        with self._slot(device):
            until = self.loop.time() + max(0.0, min(request.wait_s, MAX_WAIT_S))
            while True:
                changed = self.changed
                task = self.c.poll_task(device.device_id, request.after_round)
                left = until - self.loop.time()
                if task is not None or left <= 0 or self.c.stopping:
                    break
                try:
                    await asyncio.wait_for(changed.wait(), left)
                except asyncio.TimeoutError:
                    pass
            task = task or self.c.idle()
        w = task.work
        if w is None:  # IDLE or DONE
            return pb.Task(phase=PHASES[task.phase], round=task.round)
        head = task.phase in (HEAD, REFIT)
        digest = sha256_hex(task.head) if task.head else ""
        held = bool(digest) and request.head_sha256 == digest  # the device has this head: do not send it again
        return pb.Task(phase=PHASES[task.phase], round=task.round, seed=w.seed, kappa=w.kappa, codec=w.codec,
                       reference=w.reference, deadline_unix_s=task.deadline, theta_digest=task.theta_digest,
                       theta_bytes=task.theta_bytes, head=b"" if held else task.head, head_sha256=digest,
                       num_classes=self.c.config.num_classes,
                       feature_dim=self.c.facts.feature_dim, epochs=w.local.head_epochs if head else w.local.epochs,
                       batch_size=w.local.batch_size, lr=w.local.head_lr if head else w.local.lr,
                       head_kind=w.head, lda_covariance=w.lda_covariance, lda_rank=w.lda_rank,
                       loss=w.local.loss, ranking=w.ranking)

    @_refusals
    async def FetchTheta(self, request, context):
        device = self._caller(request, context)
        with self._slot(device):
            wire = self.c.theta_for(device.device_id, request.round)
            digest = sha256_hex(wire)
            if request.offset > len(wire):
                raise InvalidUpdate(f"offset {request.offset} is past the end of theta ({len(wire)} bytes)")
            for offset, piece in split(wire, request.offset, self.chunk_bytes):
                await context.write(pb.Chunk(total_length=len(wire), sha256=digest, offset=offset, data=piece))
                if self.c.metrics is not None:
                    self.c.metrics.served(len(piece))

    @_refusals
    async def SubmitUpdate(self, request_iterator, context):
        device = self._caller(None, context)  # before reading a byte: strangers never reach the stream
        with self._slot(device):
            first = await self._read(context, self.limits.first_message_s, "the update's header")
            if first is None or first.WhichOneof("part") != "header":
                raise InvalidUpdate("an update starts with its header")
            h = first.header
            if h.device_id and h.device_id != device.device_id:
                raise PermissionDenied("the update names another device than the caller's credential")
            self.c.check_upload(device.device_id, h.round, h.total_length, h.sha256)
            if self.queued >= self.limits.decode_queue:
                raise Busy(f"busy: {self.queued} uploads waiting to be decoded (limits.decode_queue); retry later")
            self.queued += 1
            try:
                try:
                    parts = Assembler(h.total_length, h.sha256, self.c.max_upload_bytes)
                    while True:
                        chunk = await self._read(context, self.limits.chunk_s, "the next chunk")
                        if chunk is None:
                            break
                        if chunk.WhichOneof("part") != "data":
                            raise InvalidUpdate("one header per update")
                        parts.add(parts.received, chunk.data)
                    payload = parts.result()
                except OverflowError as exc:
                    raise TooLarge(str(exc)) from None
                except PayloadError as exc:
                    raise InvalidUpdate(str(exc)) from None
                duplicate = await self._blocking(self.c.submit, device.device_id, h.round, payload,
                                                 h.reference_digest, _metrics(h.metrics))
            finally:
                self.queued -= 1
        return pb.SubmitReply(accepted=True, duplicate=duplicate)

    async def _read(self, context, timeout: float, what: str):
        """The next message of a client stream (None at its end), or DEADLINE_EXCEEDED after `timeout`."""
        try:
            message = await asyncio.wait_for(context.read(), timeout)
        except asyncio.TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"{what} did not come within {timeout:g} s")
        return None if message is grpc.aio.EOF else message

    @_refusals
    async def GetStatus(self, request, context):
        self.c.authorize_operator(bearer(context))
        s = self.c.status()
        history = [pb.RoundSummary(round=h["round"], phase=PHASES[h["phase"]], selected=h["selected"],
                                   received=h["received"], accuracy=h.get("accuracy", -1.0),
                                   accuracy_expected=h.get("accuracy_expected", -1.0),
                                   uplink_bpp=h["uplink_bpp"], downlink_bpp=h["downlink_bpp"], state=h["state"])
                   for h in s["history"]]
        return pb.StatusReply(round=s["round"], phase=PHASES[s["phase"]], registered=s["registered"],
                              online=s["online"], history=history)

    @_refusals
    async def ListDevices(self, request, context):
        self.c.authorize_operator(bearer(context))
        return pb.DevicesReply(devices=[pb.DeviceInfo(**d) for d in self.c.device_list()])

    @_refusals
    async def FetchModel(self, request, context):
        self.c.authorize_operator(bearer(context))
        from server.export import final_state, pack_release

        try:
            blob = await self._blocking(lambda: pack_release(final_state(self.c.config, self.c.facts)))
        except ValueError as exc:
            raise NotOpen(str(exc)) from None
        if request.offset > len(blob):
            raise InvalidUpdate(f"offset {request.offset} is past the end of the model ({len(blob)} bytes)")
        digest = sha256_hex(blob)
        for offset, piece in split(blob, request.offset, self.chunk_bytes):
            await context.write(pb.Chunk(total_length=len(blob), sha256=digest, offset=offset, data=piece))

    @_refusals
    async def RevokeDevice(self, request, context):
        self.c.authorize_operator(bearer(context))
        device, already = await self._blocking(self.c.revoke, request.name)
        return pb.RevokeReply(device_id=device.device_id, was_revoked=already)

    @_refusals
    async def ListUpdates(self, request, context):
        self.c.authorize_operator(bearer(context))
        updates = await self._blocking(self.c.update_list, request.from_round)
        known = {f.name for f in pb.Metrics.DESCRIPTOR.fields}
        return pb.UpdatesReply(updates=[
            pb.UpdateInfo(round=u["round"], phase=PHASES[u["phase"]], device_id=u["device_id"], name=u["name"],
                          nbytes=u["nbytes"], metrics=pb.Metrics(**{k: v for k, v in u["metrics"].items()
                                                                    if k in known}))
            for u in updates])


class _Slot:
    """One call of a device in flight, counted against limits.calls_per_device."""

    def __init__(self, service: CoordinatorService, device_id: str) -> None:
        self.service, self.device_id = service, device_id

    def __enter__(self):
        counts, limit = self.service.in_flight, self.service.limits.calls_per_device
        if counts.get(self.device_id, 0) >= limit:
            raise TooLarge(f"this device has {limit} calls in flight already (limits.calls_per_device)")
        counts[self.device_id] = counts.get(self.device_id, 0) + 1
        return self

    def __exit__(self, *exc) -> None:
        counts = self.service.in_flight
        counts[self.device_id] -= 1
        if not counts[self.device_id]:
            del counts[self.device_id]


def _metrics(m: pb.Metrics) -> Dict:
    return {f.name: getattr(m, f.name) for f in pb.Metrics.DESCRIPTOR.fields}


def _read_file(path: Optional[str]) -> Optional[bytes]:
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()


class Server:
    """The gRPC server around a coordinator, on its own asyncio loop in a background thread: services,
    health, reflection, TLS (or plaintext only when asked for), graceful stop."""

    def __init__(self, coordinator: Coordinator, address: str, tls: Optional[Tls] = None, insecure: bool = False,
                 limits: Optional[Limits] = None, chunk_bytes: int = CHUNK_BYTES) -> None:
        if tls is None and not insecure:
            raise ValueError(INSECURE_HELP)
        self.coordinator, self.limits = coordinator, limits or Limits()
        threads = self.limits.decode_threads or os.cpu_count() or 2
        self.pool = futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode")
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="grpc", daemon=True)
        self.thread.start()
        try:
            self.port = self._call(self._build(address, tls, chunk_bytes))
        except BaseException:
            self._close_loop()
            raise

    def _call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    async def _build(self, address: str, tls: Optional[Tls], chunk_bytes: int) -> int:
        timer = []
        if self.coordinator.metrics is not None:  # RPC latency by method and status code (server/metrics.py)
            from server.metrics import RpcTimer

            timer = [RpcTimer(self.coordinator.metrics, SERVICE_NAME)]
        self.grpc = grpc.aio.server(options=server_options(self.limits), interceptors=timer,
                                    maximum_concurrent_rpcs=self.limits.max_concurrent_rpcs)
        service = CoordinatorService(self.coordinator, self.limits, self.pool, chunk_bytes)
        rpc.add_CoordinatorServicer_to_server(service, self.grpc)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        names = (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME,
                 REFLECTION_V1)
        reflection.enable_server_reflection(names, self.grpc)
        # v1 is v1alpha under another name, message for message: the same servicer answers both
        v1 = reflection.aio.ReflectionServicer(names)
        self.grpc.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(REFLECTION_V1, {
            "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                v1.ServerReflectionInfo, request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
                response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)}),))
        try:
            if tls is None:
                port = self.grpc.add_insecure_port(address)
            else:
                client_ca = _read_file(tls.client_ca)
                credentials = grpc.ssl_server_credentials([(_read_file(tls.key), _read_file(tls.cert))],
                                                          root_certificates=client_ca,
                                                          require_client_auth=client_ca is not None)
                port = self.grpc.add_secure_port(address, credentials)
        except RuntimeError:  # grpc's "Failed to bind"
            port = 0
        if port == 0:
            raise OSError(f"cannot listen on {address}: the address is in use or not this machine's")
        return port

    def start(self) -> None:
        async def start():
            await self.grpc.start()
            for name in ("", SERVICE_NAME):
                await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

        self._call(start())

    def stop(self, grace_s: float = 5.0) -> None:
        """NOT_SERVING first (load balancers and health checks see it), then finish calls in flight."""
        self.coordinator.stop()

        async def stop():
            await self.health.enter_graceful_shutdown()
            await self.grpc.stop(grace_s)

        try:
            self._call(stop())
        finally:
            self._close_loop()

    def _close_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.pool.shutdown(wait=False)


__all__ = ["INSECURE_HELP", "CoordinatorService", "SERVICE_NAME", "STATUS", "Server", "bearer", "server_options",
           "status_of"]
