"""The coordinator's Prometheus endpoint, scraped over HTTP from a real coordinator process and parsed with
prometheus_client's own text parser: rounds, bytes, bpp, devices, energy and RPC latency by status code."""
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml

from deltamask.codecs import get_codec
from deltamask.headwire import encode_head
from deltamask.rounds import client_update
from deltamask.sampling import thresholds_to_theta
from deltamask.thetawire import decode_theta
from deltamask.v1 import coordinator_pb2 as pb
from edge_client.transport import Backoff, connect, fetch_theta, submit_update
from tests.wire import server_secrets, tls_config

ROOT = Path(__file__).resolve().parents[1]
parser = pytest.importorskip("prometheus_client.parser")


def scrape(port: int) -> dict:
    """{(name, labels as a sorted tuple): value} of every sample on /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in parser.text_string_to_metric_families(text) for s in family.samples}


def test_the_metrics_endpoint_counts_rounds_bytes_devices_energy_and_rpcs(tmp_path):
    from tests.test_integration import free_port

    port, metrics_port = free_port(), free_port()
    state = tmp_path / "state"
    config = {"listen": f"127.0.0.1:{port}", "state_dir": str(state), "backbone": "tiny", "tls": tls_config(state),
              "weights": None, "image_size": 16, "expected_clients": 1, "min_quorum": 1, "rounds": 2,
              "heartbeat_interval_s": 30, "head": "linear_probe", "local": {"head_epochs": 1},
              "metrics_listen": f"127.0.0.1:{metrics_port}"}
    (tmp_path / "server.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    token = server_secrets(tmp_path / "server.yaml", sys.executable, env, ROOT)
    server = subprocess.Popen([sys.executable, "-m", "server.cli", "--config", str(tmp_path / "server.yaml")],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "server.err", "wb"))
    try:
        credential = {"secret": ""}
        stub = connect(f"localhost:{port}", str(state / "tls" / "ca.pem"), lambda: credential["secret"])
        backoff = Backoff(base_s=0.05, cap_s=1)
        reg = stub.Register(pb.RegisterRequest(name="pi-1", kind=pb.RPI4, enrollment_token=token), timeout=120,
                            wait_for_ready=True)
        device, credential["secret"] = reg.device_id, reg.credential
        task = stub.GetTask(pb.TaskRequest(device_id=device, after_round=-1, wait_s=30), timeout=60)
        head = encode_head(np.zeros((task.num_classes, task.feature_dim)), np.zeros(task.num_classes))
        assert submit_update(stub, pb.UpdateHeader(device_id=device, round=task.round, metrics=pb.Metrics(
            num_examples=1, energy_j=2.5, energy_meter="ina219")), head, backoff).accepted
        task = stub.GetTask(pb.TaskRequest(device_id=device, after_round=task.round, wait_s=30), timeout=60)
        wire = fetch_theta(stub, device, task.round, 1 << 20, backoff)
        thresholds = decode_theta(wire, reg.d)
        theta_k = thresholds_to_theta(thresholds).astype(np.float64)
        theta_k[::50] = 0.01
        upload = client_update(thresholds, theta_k, task.seed, "pi-1", task.kappa, get_codec(task.codec),
                               task.reference)
        assert submit_update(stub, pb.UpdateHeader(device_id=device, round=task.round, metrics=pb.Metrics(
            energy_j=4.0), reference_digest=upload.reference_digest), upload.payload, backoff).accepted
        with pytest.raises(grpc.RpcError) as refused:  # a device's credential is not the operator's
            stub.GetStatus(pb.StatusRequest(), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        deadline = time.monotonic() + 60
        while True:  # the mask round closes after its upload, on the rounds thread
            m = scrape(metrics_port)
            if m.get(("deltamask_rounds_total", (("phase", "mask"), ("state", "closed")))) or \
                    time.monotonic() > deadline:
                break
            time.sleep(0.2)

        assert m[("deltamask_rounds_total", (("phase", "head"), ("state", "closed")))] == 1
        assert m[("deltamask_rounds_total", (("phase", "mask"), ("state", "closed")))] == 1
        assert m[("deltamask_round", ())] == 2 and m[("deltamask_phase", (("phase", "idle"),))] == 1  # round 2 opens when asked
        assert m[("deltamask_devices_registered", ())] == 1 and m[("deltamask_devices_online", ())] == 1
        assert m[("deltamask_uplink_bytes_total", (("phase", "head"),))] == len(head)
        assert m[("deltamask_uplink_bytes_total", (("phase", "mask"),))] == len(upload.payload)
        assert m[("deltamask_downlink_bytes_total", ())] >= len(wire)
        assert m[("deltamask_round_uplink_bpp", (("phase", "mask"),))] == pytest.approx(8 * len(upload.payload) / reg.d)
        assert m[("deltamask_round_downlink_bpp", (("phase", "mask"),))] == pytest.approx(8 * len(wire) / reg.d)
        energy = {labels: v for (name, labels), v in m.items() if name == "deltamask_device_energy_joules_total"}
        assert sorted((dict(k)["phase"], v) for k, v in energy.items()) == [("head", 2.5), ("mask", 4.0)]
        assert all(dict(k)["kind"] for k in energy)
        assert m[("deltamask_decode_seconds_count", (("phase", "mask"),))] == 1
        assert m[("deltamask_round_close_seconds_count", (("phase", "head"),))] == 1
        rpc = {(dict(k)["method"], dict(k)["code"]): v for (name, k), v in m.items()
               if name == "deltamask_rpc_seconds_count"}
        assert rpc[("Register", "OK")] == 1 and rpc[("SubmitUpdate", "OK")] == 2 and rpc[("FetchTheta", "OK")] >= 1
        assert rpc[("GetStatus", "UNAUTHENTICATED")] == 1
    finally:
        server.kill()
        server.wait()
