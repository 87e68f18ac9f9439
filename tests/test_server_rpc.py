"""The coordinator through its real RPCs on a loopback socket: status codes, idempotence, untouched state."""
import hashlib
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from deltamask.codecs import get_codec
from deltamask.headwire import encode_head
from deltamask.rounds import client_update
from deltamask.sampling import thresholds_to_theta
from deltamask.thetawire import decode_theta, theta_digest
from deltamask.transfer import sha256_hex
from deltamask.v1 import coordinator_pb2 as pb
from deltamask.v1 import coordinator_pb2_grpc as rpc
from edge_client.transport import Backoff, fetch_theta, submit_update, update_chunks
from server.config import LocalTraining, ServerConfig
from server.coordinator import Coordinator
from server.evaluation import model_facts
from server.service import Server
from server.store import Store
from tests.wire import Keys, enroll, secure_channel, tls_files


def operator(coordinator) -> str:
    """The operator credential, made as `deltamask-server operator` makes it."""
    from server.cli import operator_credential

    path = operator_credential(coordinator.config)
    return path.read_text().strip()

CONFIG = dict(backbone="tiny", weights=None, image_size=16, expected_clients=1, min_quorum=1, rounds=3,
              heartbeat_interval_s=30, head="linear_probe", local=LocalTraining(epochs=1, head_epochs=1))


def start(tmp_path: Path, chunk_bytes: int = 1 << 20, **overrides):
    config = ServerConfig(state_dir=str(tmp_path / "state"), **{**CONFIG, **overrides})
    coordinator = Coordinator(config, model_facts(config), Store(config.state_dir))
    tls = tls_files(tmp_path / "tls")
    server = Server(coordinator, "127.0.0.1:0", tls=tls, chunk_bytes=chunk_bytes)
    server.start()
    return coordinator, server, secure_channel(server.port, tls)


@pytest.fixture
def fleet(tmp_path):
    coordinator, server, channel = start(tmp_path)
    stub = Keys().stub(channel)
    stub.coordinator = coordinator
    yield coordinator, stub, channel
    channel.close()
    server.stop(0)
    coordinator.store.close()


def state_bytes(folder: Path) -> dict:
    """Every persisted file's digest (the -shm file is SQLite's shared-memory index, not state)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.endswith("-shm")}


def register(stub, name="pi-1") -> pb.RegisterReply:
    return enroll(stub, stub.coordinator.store, name)


def to_mask_round(coordinator, stub, device_id: str) -> pb.Task:
    """Head round (a zero head uploaded through the RPC), closed; mask round 1 opened; its task."""
    idle = stub.GetTask(pb.TaskRequest(device_id=device_id, after_round=-1, wait_s=0))
    assert idle.phase == pb.IDLE  # nothing is open until a device is ready: asking for work makes it so
    coordinator.step()
    task = stub.GetTask(pb.TaskRequest(device_id=device_id, after_round=-1, wait_s=5))
    assert task.phase == pb.HEAD and task.round == 0
    head = encode_head(np.zeros((task.num_classes, task.feature_dim)), np.zeros(task.num_classes))
    submit(stub, device_id, 0, head, "")
    coordinator.step()
    coordinator.step()
    task = stub.GetTask(pb.TaskRequest(device_id=device_id, after_round=0, wait_s=5))
    assert task.phase == pb.MASK and task.round == 1
    return task


def submit(stub, device_id, round_index, payload, reference_digest, total_length=None, sha=None):
    header = pb.UpdateHeader(device_id=device_id, round=round_index, reference_digest=reference_digest,
                             total_length=len(payload) if total_length is None else total_length,
                             sha256=sha or sha256_hex(payload), metrics=pb.Metrics(num_examples=10))
    chunks = list(update_chunks(header, payload))
    chunks[0].header.total_length = header.total_length  # update_chunks keeps the header as given
    return stub.SubmitUpdate(iter(chunks))


def mask_update(stub, device_id: str, task: pb.Task, name: str = "pi-1"):
    """The device's update, its masks seeded by its enrolled name (as the coordinator rebuilds them)."""
    wire = fetch_theta(stub, device_id, task.round, 1 << 24, Backoff())
    assert theta_digest(wire) == task.theta_digest
    thresholds = decode_theta(wire)
    theta_k = thresholds_to_theta(thresholds).astype(np.float64)
    rng = np.random.default_rng(0)
    theta_k[rng.choice(len(theta_k), 300, replace=False)] = 0.05  # as if training had turned some off
    return client_update(thresholds, theta_k, task.seed, name, task.kappa, get_codec(task.codec),
                         task.reference)


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def test_registering_again_with_the_credential_returns_the_same_device_and_no_new_credential(fleet):
    _, stub, _ = fleet
    first, again, other = register(stub), register(stub), register(stub, "pi-2")
    assert first.device_id == again.device_id != other.device_id
    assert first.credential and not again.credential and other.credential not in ("", first.credential)
    assert first.d == 6768 and len(first.layout_digest) == 64 and first.backbone == "tiny"


def test_bad_requests_get_their_status_and_change_no_persisted_byte(fleet, tmp_path):
    coordinator, stub, _ = fleet
    device = register(stub).device_id
    task = to_mask_round(coordinator, stub, device)
    upload = mask_update(stub, device, task)
    folder = tmp_path / "state"
    before = state_bytes(folder)
    corrupt = bytearray(upload.payload)
    corrupt[len(corrupt) // 2] ^= 0xFF
    limit = coordinator.max_upload_bytes
    refusals = {
        "another device's id": (lambda: submit(stub, "0123456789abcdef", 1, upload.payload,
                                               upload.reference_digest), grpc.StatusCode.PERMISSION_DENIED),
        "another device's heartbeat": (lambda: stub.Heartbeat(pb.HeartbeatRequest(device_id="nobody", round=1)),
                                       grpc.StatusCode.PERMISSION_DENIED),
        "wrong round": (lambda: submit(stub, device, 7, upload.payload, upload.reference_digest),
                        grpc.StatusCode.FAILED_PRECONDITION),
        "closed round": (lambda: submit(stub, device, 0, upload.payload, upload.reference_digest),
                         grpc.StatusCode.FAILED_PRECONDITION),
        "corrupt payload": (lambda: submit(stub, device, 1, bytes(corrupt), upload.reference_digest),
                            grpc.StatusCode.INVALID_ARGUMENT),
        "wrong digest": (lambda: submit(stub, device, 1, upload.payload, "0" * 64),
                         grpc.StatusCode.INVALID_ARGUMENT),
        "payload not matching its sha": (lambda: submit(stub, device, 1, upload.payload, upload.reference_digest,
                                                        sha="f" * 64), grpc.StatusCode.INVALID_ARGUMENT),
        "declared oversized": (lambda: submit(stub, device, 1, upload.payload, upload.reference_digest,
                                              total_length=limit + 1), grpc.StatusCode.RESOURCE_EXHAUSTED),
        "sent oversized": (lambda: submit(stub, device, 1, bytes(limit + 10), upload.reference_digest,
                                          total_length=100), grpc.StatusCode.RESOURCE_EXHAUSTED),
    }
    for name, (call, expected) in refusals.items():
        assert code_of(call) == expected, name
        assert state_bytes(folder) == before, f"{name} changed the persisted state"
    assert coordinator.open.received == {}


def test_the_same_update_twice_is_harmless_and_a_different_one_is_refused(fleet, tmp_path):
    coordinator, stub, channel = fleet
    device = register(stub).device_id
    task = to_mask_round(coordinator, stub, device)
    upload = mask_update(stub, device, task)
    reply = submit_update(stub, pb.UpdateHeader(device_id=device, round=1, reference_digest=upload.reference_digest),
                          upload.payload, Backoff())
    assert reply.accepted and not reply.duplicate
    ones, folder = coordinator.counts.ones.copy(), tmp_path / "state"
    before = state_bytes(folder)
    again = submit(stub, device, 1, upload.payload, upload.reference_digest)
    assert again.accepted and again.duplicate
    assert np.array_equal(coordinator.counts.ones, ones) and coordinator.counts.masks == 1
    assert state_bytes(folder) == before
    different = upload.payload[:-1] + bytes([upload.payload[-1] ^ 1])
    assert code_of(lambda: submit(stub, device, 1, different, upload.reference_digest)) == \
        grpc.StatusCode.ALREADY_EXISTS
    assert state_bytes(folder) == before
    coordinator.step()  # every selected device has sent: round 1 closes
    assert coordinator.history[-1]["round"] == 1 and coordinator.history[-1]["state"] == "closed"
    late = submit(stub, device, 1, upload.payload, upload.reference_digest)  # a retry after the close
    assert late.duplicate
    assert code_of(lambda: stub.GetStatus(pb.StatusRequest())) == grpc.StatusCode.UNAUTHENTICATED  # a device's
    status = rpc.CoordinatorStub(channel).GetStatus(pb.StatusRequest(), metadata=[
        ("authorization", "Bearer " + operator(coordinator))])
    assert status.registered == 1 and status.online == 1
    assert [(h.round, h.phase, h.state, h.received) for h in status.history] == [
        (0, pb.HEAD, "closed", 1), (1, pb.MASK, "closed", 1)]
    assert status.history[1].uplink_bpp == pytest.approx(8 * len(upload.payload) / coordinator.d)
    assert status.history[1].accuracy == -1.0  # no evaluation data configured


def test_theta_download_resumes_from_an_offset(tmp_path):
    coordinator, server, channel = start(tmp_path, chunk_bytes=4)
    try:
        stub = Keys().stub(channel)
        stub.coordinator = coordinator
        device = register(stub).device_id
        task = to_mask_round(coordinator, stub, device)
        whole = b"".join(c.data for c in stub.FetchTheta(pb.FetchRequest(device_id=device, round=1)))
        assert len(whole) > 3 * 4 and theta_digest(whole) == task.theta_digest
        tail = list(stub.FetchTheta(pb.FetchRequest(device_id=device, round=1, offset=10)))
        assert tail[0].offset == 10 and b"".join(c.data for c in tail) == whole[10:]
        assert tail[0].sha256 == sha256_hex(whole) and tail[0].total_length == len(whole)

        class Flaky:  # drops the stream after two chunks, once
            def __init__(self):
                self.calls = []

            def FetchTheta(self, request, **kw):
                self.calls.append(request.offset)
                for i, chunk in enumerate(stub.FetchTheta(request, **kw)):
                    if len(self.calls) == 1 and i == 2:
                        raise _Unavailable()
                    yield chunk

        flaky = Flaky()
        assert fetch_theta(flaky, device, 1, 1 << 20, Backoff(base_s=0.001)) == whole
        assert flaky.calls == [0, 8]
    finally:
        channel.close()
        server.stop(0)
        coordinator.store.close()


class _Unavailable(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.UNAVAILABLE

    def details(self):
        return "connection dropped"


def test_reflection_lists_the_services_to_a_client_that_knows_nothing_of_them(fleet):
    _, _, channel = fleet
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for s in next(replies).list_services_response.service}
    assert {"deltamask.v1.Coordinator", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
            "grpc.reflection.v1.ServerReflection"} <= names
    v1 = channel.stream_stream("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                               request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                               response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
    reply = next(v1(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))  # v1: same messages
    assert "deltamask.v1.Coordinator" in {s.name for s in reply.list_services_response.service}
    replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
        file_containing_symbol="deltamask.v1.Coordinator")]))
    assert next(replies).file_descriptor_response.file_descriptor_proto  # the schema itself is served


def test_health_serves_then_turns_not_serving_on_stop(tmp_path):
    coordinator, server, channel = start(tmp_path)
    health = health_pb2_grpc.HealthStub(channel)
    request = health_pb2.HealthCheckRequest(service="deltamask.v1.Coordinator")
    assert health.Check(request).status == health_pb2.HealthCheckResponse.SERVING
    watch = health.Watch(request)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    server.stop(1)
    assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
    channel.close()
    coordinator.store.close()


def test_a_second_coordinator_on_a_port_in_use_refuses_to_start_and_the_first_keeps_every_call(tmp_path):
    """gRPC shares a port by default (SO_REUSEPORT): a second coordinator would start and take part of the
    first one's connections, so a device could enroll with the wrong federation. It must fail to start."""
    coordinators, tls = [], tls_files(tmp_path / "tls")
    for name in ("first", "second"):
        config = ServerConfig(state_dir=str(tmp_path / name), **CONFIG)
        coordinators.append(Coordinator(config, model_facts(config), Store(config.state_dir)))
    server = Server(coordinators[0], "127.0.0.1:0", tls=tls)
    server.start()
    with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{server.port}"):
        Server(coordinators[1], f"127.0.0.1:{server.port}", tls=tls)
    for i in range(20):  # each on a new connection, with a token of the first: each one enrolled there
        channel = secure_channel(server.port, tls)
        reply = enroll(Keys().stub(channel), coordinators[0].store, f"pi-{i}")
        assert reply.device_id in coordinators[0].devices
        channel.close()
    assert len(coordinators[0].devices) == 20 and not coordinators[1].devices
    server.stop(0)
    for coordinator in coordinators:
        coordinator.store.close()


def test_agent_keepalive_pings_are_ones_the_coordinator_accepts():
    """An agent idle for an hour of training keeps its channel: it pings while no call is in flight, and
    never more often than the coordinator tolerates (else GOAWAY "too_many_pings" drops the channel)."""
    from edge_client.transport import CHANNEL_OPTIONS
    from server.config import Limits
    from server.service import server_options

    client, server = dict(CHANNEL_OPTIONS), dict(server_options(Limits()))
    assert client["grpc.keepalive_permit_without_calls"] == 1 and server["grpc.keepalive_permit_without_calls"] == 1
    assert client["grpc.http2.max_pings_without_data"] == 0  # no cap on pings between calls
    assert client["grpc.keepalive_time_ms"] >= server["grpc.http2.min_recv_ping_interval_without_data_ms"]
    assert client["grpc.keepalive_time_ms"] <= 5 * 60_000  # well under common NAT idle timeouts


def test_backoff_is_exponential_with_full_jitter_and_a_cap():
    import random

    backoff = Backoff(base_s=1.0, cap_s=10.0, rng=random.Random(0))
    waits = [backoff.next_wait() for _ in range(12)]
    bounds = [min(10.0, 2.0 ** n) for n in range(12)]
    assert all(0 <= w <= b for w, b in zip(waits, bounds))
    assert len(set(waits)) == len(waits)  # jittered, not a fixed ladder
    assert max(waits[6:]) > 2.0  # and growing to the cap
    backoff.reset()
    assert backoff.next_wait() <= 1.0
