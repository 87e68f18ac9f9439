"""The serving model's limits through real RPCs over TLS: a stream that never sends its header is cut at
its time limit, one device cannot hold more calls than its share, stalled streams and waiting long polls
do not slow health or heartbeats, and mutual TLS refuses a device without a client certificate."""
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deltamask.v1 import coordinator_pb2 as pb
from deltamask.v1 import coordinator_pb2_grpc as rpc
from server.config import Limits, Tls
from server.coordinator import Coordinator
from server.evaluation import model_facts
from server.security import make_client_cert
from server.service import Server
from server.store import Store
from tests.test_server_rpc import CONFIG, code_of
from tests.wire import Keys, as_device, ca_of, enroll, secure_channel, tls_files
from server.config import ServerConfig


@pytest.fixture
def limited(tmp_path):
    config = ServerConfig(state_dir=str(tmp_path / "state"), **CONFIG)
    coordinator = Coordinator(config, model_facts(config), Store(config.state_dir))
    tls = tls_files(tmp_path / "tls")
    server = Server(coordinator, "127.0.0.1:0", tls=tls, limits=Limits(first_message_s=0.5, calls_per_device=4))
    server.start()
    channel = secure_channel(server.port, tls)
    stub = Keys().stub(channel)
    yield coordinator, server, channel, stub
    channel.close()
    server.stop(0)
    coordinator.store.close()


def test_an_upload_whose_header_never_comes_is_cut_at_its_time_limit(limited):
    coordinator, _, _, stub = limited
    enroll(stub, coordinator.store, "pi-1")
    never = threading.Event()

    def silent():
        never.wait(10)
        return
        yield  # a stream that sends nothing

    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        stub.SubmitUpdate(silent(), timeout=10)
    never.set()
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "header did not come within 0.5 s" in info.value.details()
    assert time.monotonic() - started < 5


def test_one_device_cannot_hold_more_calls_than_its_share_and_others_are_not_slowed(limited):
    coordinator, server, channel, stub = limited
    enroll(stub, coordinator.store, "pi-1")
    enroll(stub, coordinator.store, "pi-2")
    as_device(stub, "pi-1")
    polls = [stub.GetTask.future(pb.TaskRequest(after_round=-1, wait_s=20)) for _ in range(4)]
    time.sleep(0.5)  # the four long polls are waiting, holding no thread
    assert code_of(lambda: stub.GetTask(pb.TaskRequest(after_round=-1, wait_s=1))) == \
        grpc.StatusCode.RESOURCE_EXHAUSTED
    # 70 streams that never send a header, from a device: health and other devices answer at once
    hold = threading.Event()

    def silent():
        hold.wait(10)
        return
        yield

    as_device(stub, "pi-2")
    stalls = [stub.SubmitUpdate.future(silent(), timeout=10) for _ in range(70)]
    health = health_pb2_grpc.HealthStub(channel)
    started = time.monotonic()
    for _ in range(20):
        assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status == \
            health_pb2.HealthCheckResponse.SERVING
    as_device(stub, "pi-1")
    for _ in range(20):
        stub.Heartbeat(pb.HeartbeatRequest(), timeout=2)
    assert time.monotonic() - started < 5  # 40 calls, none queued behind the 70 stalled streams or 4 polls
    refused = [s for s in stalls if s.exception(timeout=10) is not None]
    assert {s.code() for s in refused} <= {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED}
    hold.set()
    for p in polls:
        p.cancel()


def test_mutual_tls_refuses_a_device_without_a_client_certificate(tmp_path):
    config = ServerConfig(state_dir=str(tmp_path / "state"), **CONFIG)
    coordinator = Coordinator(config, model_facts(config), Store(config.state_dir))
    tls = tls_files(tmp_path / "tls")
    mutual = Tls(cert=tls.cert, key=tls.key, client_ca=str(tmp_path / "tls" / "ca.pem"))
    server = Server(coordinator, "127.0.0.1:0", tls=mutual)
    server.start()
    try:
        with secure_channel(server.port, tls) as channel:  # trusts the server, shows no certificate
            call = lambda: rpc.CoordinatorStub(channel).Register(pb.RegisterRequest(name="x"), timeout=5)  # noqa
            assert code_of(call) == grpc.StatusCode.UNAVAILABLE
        client = make_client_cert(tmp_path / "tls", "pi-1")
        pem = [ca_of(tls)] + [open(client[k], "rb").read() for k in ("key", "cert")]
        with grpc.secure_channel(f"localhost:{server.port}", grpc.ssl_channel_credentials(*pem)) as channel:
            stub = Keys().stub(channel)
            assert enroll(stub, coordinator.store, "pi-1").credential  # the certificate, then the token
    finally:
        server.stop(0)
        coordinator.store.close()
