"""Who may call the coordinator, through its real RPCs over TLS on a loopback socket: every stranger, every
wrong or borrowed credential, every spent token is refused with UNAUTHENTICATED or PERMISSION_DENIED and
leaves the persisted state byte for byte as it was; secrets never reach the logs."""
import logging
import subprocess
import sys

import grpc
import numpy as np
import pytest
import yaml

from deltamask.headwire import encode_head
from deltamask.transfer import sha256_hex
from deltamask.v1 import coordinator_pb2 as pb
from deltamask.v1 import coordinator_pb2_grpc as rpc
from server.security import issue_token
from tests.test_server_rpc import code_of, start, state_bytes, submit
from tests.wire import Keys, as_device, enroll, secure_channel, tls_files

UNAUTHENTICATED, PERMISSION_DENIED = grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED


@pytest.fixture
def served(tmp_path):
    coordinator, server, channel = start(tmp_path)
    stub = Keys().stub(channel)
    stub.coordinator = coordinator
    yield coordinator, server, channel, stub
    channel.close()
    server.stop(0)
    coordinator.store.close()


def test_every_caller_without_the_right_secret_is_refused_and_nothing_changes(served, tmp_path, caplog):
    coordinator, server, channel, stub = served
    store = coordinator.store
    caplog.set_level(logging.DEBUG)
    pi1 = enroll(stub, store, "pi-1")
    enroll(stub, store, "pi-2")
    as_device(stub, "pi-1")
    expired = issue_token(store, "pi-3", ttl_s=1, now=coordinator.clock() - 10)
    used = issue_token(store, "pi-4")
    stub.keys.current = ""
    stub.keys.current = stub.Register(pb.RegisterRequest(name="pi-4", enrollment_token=used)).credential  # spends it
    stub.Heartbeat(pb.HeartbeatRequest())  # pi-4 holds its credential: its enrollment can no longer be repeated
    as_device(stub, "pi-1")
    stub.Heartbeat(pb.HeartbeatRequest())
    coordinator.flush_told()
    fleet_token = issue_token(store, uses=None)
    pi7_token = issue_token(store, "pi-7")
    folder = tmp_path / "state"
    before = state_bytes(folder)

    plain = rpc.CoordinatorStub(channel)  # TLS, no credential at all

    def bearer(secret):
        return [("authorization", "Bearer " + secret)]

    heartbeat = pb.HeartbeatRequest()
    wrong = pi1.credential[:-4] + "AAAA"
    refusals = {
        "no credential: heartbeat": (lambda: plain.Heartbeat(heartbeat), UNAUTHENTICATED),
        "no credential: task": (lambda: plain.GetTask(pb.TaskRequest(wait_s=0)), UNAUTHENTICATED),
        "no credential: theta": (lambda: list(plain.FetchTheta(pb.FetchRequest(round=1))), UNAUTHENTICATED),
        "no credential: upload": (lambda: plain.SubmitUpdate(iter([pb.UpdateChunk(header=pb.UpdateHeader(round=0))])),
                                  UNAUTHENTICATED),
        "no credential: status": (lambda: plain.GetStatus(pb.StatusRequest()), UNAUTHENTICATED),
        "no credential, no token: register": (lambda: plain.Register(pb.RegisterRequest(name="pi-9")),
                                              UNAUTHENTICATED),
        "garbage credential": (lambda: plain.Heartbeat(heartbeat, metadata=bearer("letmein")), UNAUTHENTICATED),
        "wrong secret for a real device id": (lambda: plain.Heartbeat(heartbeat, metadata=bearer(wrong)),
                                              UNAUTHENTICATED),
        "a device credential on an operator call": (lambda: plain.GetStatus(pb.StatusRequest(),
                                                                            metadata=bearer(pi1.credential)),
                                                    UNAUTHENTICATED),
        "another device's id with my credential": (
            lambda: stub.Heartbeat(pb.HeartbeatRequest(device_id=coordinator._by_name("pi-2").device_id)),
            PERMISSION_DENIED),
        "another device's upload with my credential": (
            lambda: submit(stub, coordinator._by_name("pi-2").device_id, 0, b"x", ""), PERMISSION_DENIED),
        "another device's name with my credential": (lambda: stub.Register(pb.RegisterRequest(name="pi-2")),
                                                     PERMISSION_DENIED),
        "an expired token": (lambda: plain.Register(pb.RegisterRequest(name="pi-3", enrollment_token=expired)),
                             UNAUTHENTICATED),
        "a token used up": (lambda: plain.Register(pb.RegisterRequest(name="pi-4", enrollment_token=used)),
                            UNAUTHENTICATED),
        "a made-up token": (lambda: plain.Register(pb.RegisterRequest(
            name="pi-5", enrollment_token=fleet_token[:-4] + "AAAA")), UNAUTHENTICATED),
        "a fleet token for a name already enrolled": (lambda: plain.Register(pb.RegisterRequest(
            name="pi-1", enrollment_token=fleet_token)), PERMISSION_DENIED),
        "a device token for another name": (lambda: plain.Register(pb.RegisterRequest(
            name="pi-6", enrollment_token=pi7_token)), PERMISSION_DENIED),
    }
    for what, (call, expected) in refusals.items():
        assert code_of(call) == expected, what
        assert state_bytes(folder) == before, f"{what} changed the persisted state"
    assert sorted(d.name for d in coordinator.devices.values()) == ["pi-1", "pi-2", "pi-4"]
    # the name still belongs to its device: its own credential still works
    as_device(stub, "pi-1")
    assert stub.Heartbeat(heartbeat).round == 0
    secrets_ = [pi1.credential, expired, used, fleet_token, pi7_token, *stub.keys.by_name.values()]
    logged = caplog.text + "".join(str(r.args) for r in caplog.records)
    assert not [s for s in secrets_ if s in logged or s.split(".")[-1] in logged]


def test_a_device_token_re_enrolls_a_reinstalled_board_and_the_old_credential_stops_working(served):
    coordinator, _, _, stub = served
    old = enroll(stub, coordinator.store, "pi-1")
    stub.keys.current = ""
    again = stub.Register(pb.RegisterRequest(name="pi-1", enrollment_token=issue_token(coordinator.store, "pi-1")))
    assert again.device_id == old.device_id and again.credential not in ("", old.credential)
    stub.keys.current = old.credential
    assert code_of(lambda: stub.Heartbeat(pb.HeartbeatRequest())) == UNAUTHENTICATED
    stub.keys.current = again.credential
    assert stub.Heartbeat(pb.HeartbeatRequest()).round == 0


def test_an_enrollment_whose_reply_was_lost_is_repeated_with_its_token_until_the_credential_is_first_used(served):
    """The coordinator dies after committing an enrollment and before its reply (or the network drops the
    reply): the agent registers again with the same token. Fleet token or single-use device token, it gets the
    same device and a new credential and spends nothing more; once the device has called with its credential,
    the token no longer enrolls that name."""
    coordinator, _, _, stub = served
    store = coordinator.store
    fleet, single = issue_token(store, uses=2), issue_token(store, "pi-2")
    refused = {}
    for name, token in (("pi-1", fleet), ("pi-2", single)):
        stub.keys.current = ""
        request = pb.RegisterRequest(name=name, kind=pb.RPI4, memory_bytes=4 << 30, enrollment_token=token)
        lost = stub.Register(request)
        again = stub.Register(request)
        assert again.device_id == lost.device_id and again.credential not in ("", lost.credential)
        stub.keys.current = lost.credential  # only the newest credential works
        assert code_of(lambda: stub.Heartbeat(pb.HeartbeatRequest())) == UNAUTHENTICATED
        stub.keys.current = again.credential
        assert stub.Heartbeat(pb.HeartbeatRequest()).round == 0
        stub.keys.current = ""
        refused[name] = code_of(lambda: stub.Register(request))
    assert refused == {"pi-1": PERMISSION_DENIED, "pi-2": UNAUTHENTICATED}  # already enrolled; token spent
    stub.keys.current = ""
    third = pb.RegisterRequest(name="pi-3", kind=pb.RPI4, memory_bytes=4 << 30, enrollment_token=fleet)
    assert stub.Register(third).credential  # the fleet token's second use: the repeat spent none
    third.name = "pi-4"
    assert code_of(lambda: stub.Register(third)) == UNAUTHENTICATED
    assert sorted(d.name for d in coordinator.devices.values()) == ["pi-1", "pi-2", "pi-3"]


def test_a_revoked_device_is_refused_at_once_and_after_a_restart_until_a_new_token_for_its_name(tmp_path):
    """A lost board: the operator revokes its name (RevokeDevice). Its long poll ends UNAUTHENTICATED, it is not
    selected again, an upload on the way is refused, its credential is refused before and after a restart;
    neither the fleet token, nor a repeat of its own enrollment, nor an unspent token made for its name brings
    it back; a new token for its name enrolls it anew. Only the operator may revoke."""
    import threading

    from server.coordinator import Coordinator, Unauthenticated
    from server.evaluation import model_facts
    from server.store import Store
    from tests.test_server_rpc import operator

    coordinator, server, channel = start(tmp_path)
    stub = Keys().stub(channel)
    store = coordinator.store
    fleet, reusable = issue_token(store, uses=None), issue_token(store, "pi-3", uses=None)
    replies = {}
    for name, token in (("pi-1", fleet), ("pi-2", fleet), ("pi-3", reusable), ("pi-4", fleet)):
        stub.keys.current = ""
        replies[name] = stub.Register(pb.RegisterRequest(name=name, kind=pb.RPI4, enrollment_token=token))
    plain = rpc.CoordinatorStub(channel)

    def as_(name):
        return [("authorization", "Bearer " + replies[name].credential)]

    as_operator = [("authorization", "Bearer " + operator(coordinator))]
    polled = {}

    def long_poll():  # pi-1 waits for work (which makes it ready) while it is revoked
        polled["code"] = code_of(lambda: plain.GetTask(pb.TaskRequest(wait_s=60), metadata=as_("pi-1"), timeout=90))

    poll = threading.Thread(target=long_poll)
    poll.start()
    while not coordinator._by_name("pi-1").ready:
        poll.join(0.01)
    assert code_of(lambda: plain.RevokeDevice(pb.RevokeRequest(name="pi-2"), metadata=as_("pi-1"))) \
        == UNAUTHENTICATED
    for name in ("pi-1", "pi-2", "pi-3"):  # pi-2 never called: its enrollment could have been repeated
        revoked = plain.RevokeDevice(pb.RevokeRequest(name=name), metadata=as_operator)
        assert (revoked.device_id, revoked.was_revoked) == (replies[name].device_id, False)
    poll.join(30)
    assert polled == {"code": UNAUTHENTICATED}
    assert plain.RevokeDevice(pb.RevokeRequest(name="pi-1"), metadata=as_operator).was_revoked  # twice: no change
    assert code_of(lambda: plain.RevokeDevice(pb.RevokeRequest(name="pi-9"), metadata=as_operator)) \
        == grpc.StatusCode.INVALID_ARGUMENT
    listed = plain.ListDevices(pb.DevicesRequest(), metadata=as_operator).devices
    assert [(d.name, d.revoked) for d in listed] == [("pi-1", True), ("pi-2", True), ("pi-3", True), ("pi-4", False)]
    for name in ("pi-1", "pi-2", "pi-3"):
        assert code_of(lambda: plain.Heartbeat(pb.HeartbeatRequest(), metadata=as_(name))) == UNAUTHENTICATED, name
    for name, token in (("pi-2", fleet), ("pi-3", reusable)):
        request = pb.RegisterRequest(name=name, kind=pb.RPI4, enrollment_token=token)
        assert code_of(lambda: plain.Register(request)) in (PERMISSION_DENIED, UNAUTHENTICATED), name

    # pi-1 was ready and is not counted: the head round asks pi-4 alone; pi-4, revoked while its upload
    # is being decoded, is refused and the round stays without it
    assert plain.GetTask(pb.TaskRequest(wait_s=0), metadata=as_("pi-4")).phase == pb.IDLE
    coordinator.step()
    pi4 = replies["pi-4"].device_id
    assert coordinator.open is not None and coordinator.open.selected == [pi4]
    check = coordinator._check

    def revoked_meanwhile(*args):
        coordinator.revoke("pi-4")
        return check(*args)

    coordinator._check = revoked_meanwhile
    head = encode_head(np.zeros((coordinator.config.num_classes, coordinator.facts.feature_dim)),
                       np.zeros(coordinator.config.num_classes))
    with pytest.raises(Unauthenticated, match="revoked"):
        coordinator.submit(pi4, 0, head, "", {"num_examples": 10})
    assert coordinator.open.received == {} and store.updates(0) == []
    channel.close()
    server.stop(0)
    store.close()

    again = Coordinator(coordinator.config, model_facts(coordinator.config), Store(coordinator.config.state_dir))
    try:
        for reply in replies.values():
            with pytest.raises(Unauthenticated):
                again.authenticate(reply.credential)
        board, credential = again.enroll(issue_token(again.store, "pi-1"), "pi-1", "rpi4", 4 << 30, "")
        assert board.device_id == replies["pi-1"].device_id and again.authenticate(credential) is board
        assert [d["revoked"] for d in again.device_list()] == [False, True, True, True]
        assert again.status()["registered"] == 1
    finally:
        again.store.close()


def test_plaintext_to_the_tls_port_gets_no_answer(served):
    _, server, _, _ = served
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = lambda: rpc.CoordinatorStub(channel).Register(pb.RegisterRequest(name="x"), timeout=5)  # noqa: E731
        assert code_of(call) == grpc.StatusCode.UNAVAILABLE


def test_a_client_that_does_not_trust_the_coordinators_ca_refuses_it(served, tmp_path):
    _, server, _, _ = served
    other = tls_files(tmp_path / "other-ca")  # a coordinator in the middle would have another CA
    with secure_channel(server.port, other) as channel:
        call = lambda: rpc.CoordinatorStub(channel).Register(pb.RegisterRequest(name="x"), timeout=5)  # noqa: E731
        assert code_of(call) == grpc.StatusCode.UNAVAILABLE


def test_a_declared_example_count_does_not_steer_the_head_and_absurd_values_are_refused(tmp_path):
    coordinator, server, channel = start(tmp_path, min_quorum=3, expected_clients=3)
    try:
        stub = Keys().stub(channel)
        names = ["pi-1", "pi-2", "mallory"]
        for name in names:
            enroll(stub, coordinator.store, name)
        for name in names:
            as_device(stub, name)
            assert stub.GetTask(pb.TaskRequest(after_round=-1, wait_s=0)).phase == pb.IDLE
        coordinator.step()
        task = stub.GetTask(pb.TaskRequest(after_round=-1, wait_s=5))
        assert task.phase == pb.HEAD
        shape = (task.num_classes, task.feature_dim)
        absurd = encode_head(np.full(shape, 1e6), np.zeros(task.num_classes))
        assert code_of(lambda: submit(stub, "", 0, absurd, "")) == grpc.StatusCode.INVALID_ARGUMENT
        for name, value, examples in (("pi-1", 1.0, 100), ("pi-2", 1.0, 120), ("mallory", 1000.0, 10 ** 9)):
            as_device(stub, name)
            head = encode_head(np.full(shape, value), np.zeros(task.num_classes))
            header = pb.UpdateHeader(round=0, total_length=len(head), sha256=sha256_hex(head),
                                     metrics=pb.Metrics(num_examples=examples))
            stub.SubmitUpdate(iter([pb.UpdateChunk(header=header), pb.UpdateChunk(data=head)]))
        coordinator.step()
        weight, _ = coordinator.agg.head
        # mallory weighs at most 4 medians (4 x 120 examples), not 10^9: the head is not 999.99
        assert np.allclose(weight, (100 + 120 + 480 * 1000.0) / (100 + 120 + 480), rtol=1e-5)
    finally:
        channel.close()
        server.stop(0)
        coordinator.store.close()


def test_a_coordinator_without_tls_and_without_insecure_exits_saying_how_to_fix_it(tmp_path):
    config = {"backbone": "tiny", "weights": None, "image_size": 16, "listen": "127.0.0.1:0",
              "state_dir": str(tmp_path / "state")}
    (tmp_path / "server.yaml").write_text(yaml.safe_dump(config))
    run = subprocess.run([sys.executable, "-m", "server.cli", "--config", str(tmp_path / "server.yaml")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "deltamask-server tls --config" in run.stderr and "insecure: true" in run.stderr
