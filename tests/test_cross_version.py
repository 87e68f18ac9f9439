"""The agent's wire code against a coordinator process that may run another Python and other grpcio and
protobuf versions (`make test` runs this file again in the edge environment: Python 3.9, grpcio 1.70,
protobuf 5.29, against the main environment's coordinator). This client needs no torch: the wire alone."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

from deltamask.codecs import get_codec
from deltamask.headwire import encode_head
from deltamask.rounds import client_update
from deltamask.sampling import thresholds_to_theta
from deltamask.thetawire import decode_theta, theta_digest
from deltamask.v1 import coordinator_pb2 as pb
from edge_client.transport import Backoff, connect, fetch_theta, submit_update
from tests.wire import server_secrets, tls_config

ROOT = Path(__file__).resolve().parents[1]


def test_a_torch_free_client_does_a_head_round_and_a_mask_round(tmp_path):
    from tests.test_integration import free_port

    port = free_port()
    state = tmp_path / "state"
    config = {"listen": f"127.0.0.1:{port}", "state_dir": str(state), "backbone": "tiny", "tls": tls_config(state),
              "weights": None, "image_size": 16, "expected_clients": 1, "min_quorum": 1, "rounds": 1,
              "heartbeat_interval_s": 30, "exit_when_done": True, "head": "linear_probe", "local": {"epochs": 1, "head_epochs": 1}}
    (tmp_path / "server.yaml").write_text(yaml.safe_dump(config))
    python = os.environ.get("DELTAMASK_SERVER_PYTHON", sys.executable)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    token = server_secrets(tmp_path / "server.yaml", python, env, ROOT)
    server = subprocess.Popen([python, "-m", "server.cli", "--config", str(tmp_path / "server.yaml")], cwd=ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=open(tmp_path / "server.err", "wb"))
    try:
        credential = {"secret": ""}
        stub = connect(f"localhost:{port}", str(state / "tls" / "ca.pem"), lambda: credential["secret"])
        backoff = Backoff(base_s=0.05, cap_s=1)
        reg = stub.Register(pb.RegisterRequest(name="py39-board", kind=pb.RPI4, enrollment_token=token), timeout=120,
                            wait_for_ready=True)
        device, credential["secret"] = reg.device_id, reg.credential
        task = stub.GetTask(pb.TaskRequest(device_id=device, after_round=-1, wait_s=30), timeout=60)
        assert task.phase == pb.HEAD
        head = encode_head(np.zeros((task.num_classes, task.feature_dim)), np.zeros(task.num_classes))
        reply = submit_update(stub, pb.UpdateHeader(device_id=device, round=task.round,
                                                    metrics=pb.Metrics(num_examples=1)), head, backoff)
        assert reply.accepted
        task = stub.GetTask(pb.TaskRequest(device_id=device, after_round=task.round, wait_s=30), timeout=60)
        assert task.phase == pb.MASK and task.head == head
        wire = fetch_theta(stub, device, task.round, 1 << 20, backoff)
        assert theta_digest(wire) == task.theta_digest
        thresholds = decode_theta(wire, reg.d)
        theta_k = thresholds_to_theta(thresholds).astype(np.float64)
        theta_k[::50] = 0.01
        upload = client_update(thresholds, theta_k, task.seed, "py39-board", task.kappa, get_codec(task.codec),
                               task.reference)
        reply = submit_update(stub, pb.UpdateHeader(device_id=device, round=task.round,
                                                    reference_digest=upload.reference_digest), upload.payload, backoff)
        assert reply.accepted and not reply.duplicate
        task = stub.GetTask(pb.TaskRequest(device_id=device, after_round=task.round, wait_s=30), timeout=60)
        assert task.phase == pb.REFIT  # the head round again, on theta * w: theta travels as in a mask round
        wire = fetch_theta(stub, device, task.round, 1 << 20, backoff)
        assert theta_digest(wire) == task.theta_digest
        reply = submit_update(stub, pb.UpdateHeader(device_id=device, round=task.round,
                                                    metrics=pb.Metrics(num_examples=1)), head, backoff)
        assert reply.accepted
        task = stub.GetTask(pb.TaskRequest(device_id=device, after_round=task.round, wait_s=30), timeout=60)
        assert task.phase == pb.DONE
        assert server.wait(60) == 0
        rounds = [yaml.safe_load(line) for line in server.stdout.read().decode().splitlines()]
        assert [(r["round"], r["phase"], r["received"]) for r in rounds] == [(0, "head", 1), (1, "mask", 1),
                                                                              (2, "refit", 1)]
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
