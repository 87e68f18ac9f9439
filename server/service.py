"""The coordinator's gRPC face: the Coordinator service, health, reflection, and keepalive settings.

Each RPC unpacks its request, calls `server.coordinator.Coordinator`, and packs the answer; refusals
become gRPC status codes here and only here (`STATUS`).
"""
import functools
import logging
from concurrent import futures
from typing import Dict

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from deltamask.errors import PayloadError
from deltamask.transfer import CHUNK_BYTES, Assembler, sha256_hex, split
from deltamask.v1 import coordinator_pb2 as pb
from deltamask.v1 import coordinator_pb2_grpc as rpc
from deltamask.federation import HEAD, MASK
from server.coordinator import (DONE, IDLE, Conflict, Coordinator, CoordinatorError, InvalidUpdate,
                                NotOpen, TooLarge, UnknownDevice)

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Coordinator"].full_name

STATUS = {
    UnknownDevice: grpc.StatusCode.UNAUTHENTICATED,
    NotOpen: grpc.StatusCode.FAILED_PRECONDITION,
    InvalidUpdate: grpc.StatusCode.INVALID_ARGUMENT,
    TooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Conflict: grpc.StatusCode.ALREADY_EXISTS,
}
PHASES = {HEAD: pb.HEAD, MASK: pb.MASK, IDLE: pb.IDLE, DONE: pb.DONE}
KIND_NAMES = {pb.RPI4: "rpi4", pb.JETSON_NANO: "jetson-nano", pb.CORAL: "coral", pb.LAPTOP: "laptop",
              pb.SERVER: "server", pb.DEVICE_KIND_UNSPECIFIED: "unspecified"}

# Edge devices train for up to an hour between calls. Their channels ping every 60 s (edge_client.transport);
# a server that allows fewer pings answers with GOAWAY "too_many_pings" and drops the channel, the
# failure other FL frameworks are known for. So: accept pings every 20 s, with or without calls.
SERVER_OPTIONS = [
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 20_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 20_000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.max_receive_message_length", 8 << 20),
]


def _refusals(method):
    """Turn a CoordinatorError into the gRPC status of its kind."""

    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except CoordinatorError as exc:
            context.abort(STATUS[type(exc)], str(exc))

    return wrapper


class CoordinatorService(rpc.CoordinatorServicer):
    def __init__(self, coordinator: Coordinator, chunk_bytes: int = CHUNK_BYTES) -> None:
        self.c, self.chunk_bytes = coordinator, chunk_bytes

    @_refusals
    def Register(self, request, context):
        device = self.c.register(request.name, KIND_NAMES.get(request.kind, "unspecified"), request.memory_bytes,
                                 request.preferred_codec)
        c, facts = self.c.config, self.c.facts
        return pb.RegisterReply(device_id=device.device_id, heartbeat_interval_s=c.heartbeat_interval_s,
                                backbone=c.backbone or "", blocks=c.blocks, image_size=c.image_size, d=facts.d,
                                layout_digest=facts.layout_digest, num_classes=c.num_classes,
                                max_upload_bytes=self.c.max_upload_bytes)

    @_refusals
    def Heartbeat(self, request, context):
        return pb.HeartbeatReply(round=self.c.heartbeat(request.device_id))

    @_refusals
    def GetTask(self, request, context):
        task = self.c.get_task(request.device_id, request.after_round, request.wait_s)
        w = task.work
        if w is None:  # IDLE or DONE
            return pb.Task(phase=PHASES[task.phase], round=task.round)
        head = task.phase == HEAD
        return pb.Task(phase=PHASES[task.phase], round=task.round, seed=w.seed, kappa=w.kappa, codec=w.codec,
                       reference=w.reference, deadline_unix_s=task.deadline, theta_digest=task.theta_digest,
                       theta_bytes=task.theta_bytes, head=task.head, num_classes=self.c.config.num_classes,
                       feature_dim=self.c.facts.feature_dim, epochs=w.local.head_epochs if head else w.local.epochs,
                       batch_size=w.local.batch_size, lr=w.local.head_lr if head else w.local.lr,
                       head_kind=w.head, lda_covariance=w.lda_covariance, lda_rank=w.lda_rank,
                       loss=w.local.loss)

    @_refusals
    def FetchTheta(self, request, context):
        wire = self.c.theta_for(request.device_id, request.round)
        digest = sha256_hex(wire)
        if request.offset > len(wire):
            raise InvalidUpdate(f"offset {request.offset} is past the end of theta ({len(wire)} bytes)")
        return (pb.Chunk(total_length=len(wire), sha256=digest, offset=offset, data=piece)
                for offset, piece in split(wire, request.offset, self.chunk_bytes))

    @_refusals
    def SubmitUpdate(self, request_iterator, context):
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("part") != "header":
            raise InvalidUpdate("an update starts with its header")
        h = first.header
        self.c.check_upload(h.device_id, h.round, h.total_length, h.sha256)
        try:
            parts = Assembler(h.total_length, h.sha256, self.c.max_upload_bytes)
            for chunk in request_iterator:
                if chunk.WhichOneof("part") != "data":
                    raise InvalidUpdate("one header per update")
                parts.add(parts.received, chunk.data)
            payload = parts.result()
        except OverflowError as exc:
            raise TooLarge(str(exc)) from None
        except PayloadError as exc:
            raise InvalidUpdate(str(exc)) from None
        duplicate = self.c.submit(h.device_id, h.round, payload, h.reference_digest, _metrics(h.metrics))
        return pb.SubmitReply(accepted=True, duplicate=duplicate)

    @_refusals
    def GetStatus(self, request, context):
        s = self.c.status()
        history = [pb.RoundSummary(round=h["round"], phase=PHASES[h["phase"]], selected=h["selected"],
                                   received=h["received"], accuracy=h.get("accuracy", -1.0),
                                   uplink_bpp=h["uplink_bpp"], downlink_bpp=h["downlink_bpp"], state=h["state"])
                   for h in s["history"]]
        return pb.StatusReply(round=s["round"], phase=PHASES[s["phase"]], registered=s["registered"],
                              online=s["online"], history=history)


def _metrics(m: pb.Metrics) -> Dict:
    return {f.name: getattr(m, f.name) for f in pb.Metrics.DESCRIPTOR.fields}


class Server:
    """The gRPC server around a coordinator: services, health, reflection, graceful stop."""

    def __init__(self, coordinator: Coordinator, address: str, max_workers: int = 64,
                 chunk_bytes: int = CHUNK_BYTES) -> None:
        self.coordinator = coordinator
        self.grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=SERVER_OPTIONS)
        rpc.add_CoordinatorServicer_to_server(CoordinatorService(coordinator, chunk_bytes), self.grpc)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.grpc)
        self.port = self.grpc.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot listen on {address}")

    def start(self) -> None:
        self.grpc.start()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def stop(self, grace_s: float = 5.0) -> None:
        """NOT_SERVING first (load balancers and health checks see it), then finish calls in flight."""
        self.health.enter_graceful_shutdown()
        self.coordinator.stop()
        self.grpc.stop(grace_s).wait()
