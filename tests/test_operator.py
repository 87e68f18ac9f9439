"""What an operator sees of a real coordinator process: its Prometheus endpoint, scraped over HTTP and parsed
with prometheus_client's own text parser (rounds, bytes, bpp, devices, energy, RPC latency by status code),
and deltamask-ctl's commands over the gRPC API, authenticated as the operator."""
import json
import os
import re
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
from deltamask.federation import Policy, kept_of
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


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """A coordinator process (TLS, metrics on) after a head round and a mask round of one torch-free device
    that reported energy; yields what the tests need and stops the process after them."""
    from tests.test_integration import free_port

    tmp_path = tmp_path_factory.mktemp("operator")
    port, metrics_port = free_port(), free_port()
    state = tmp_path / "state"
    config = {"listen": f"127.0.0.1:{port}", "state_dir": str(state), "backbone": "tiny", "tls": tls_config(state),
              "weights": None, "image_size": 16, "expected_clients": 1, "min_quorum": 1, "rounds": 2,
              "heartbeat_interval_s": 30, "head": "linear_probe", "local": {"epochs": 1, "head_epochs": 1},
              "metrics_listen": f"127.0.0.1:{metrics_port}",
              "evaluation": {"dataset": "digits", "samples": 100, "seed": 1}}
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
        yield {"port": port, "metrics_port": metrics_port, "config": tmp_path / "server.yaml", "state": state,
               "stub": stub, "head": head, "upload": upload, "wire": wire, "d": reg.d, "env": env, "token": token}
    finally:
        server.kill()
        server.wait()


def test_the_metrics_endpoint_counts_rounds_bytes_devices_energy_and_rpcs(fleet):
    stub, metrics_port, head, upload, wire = (fleet[k] for k in ("stub", "metrics_port", "head", "upload", "wire"))
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
    phases = {dict(k)["phase"]: v for (name, k), v in m.items() if name == "deltamask_phase"}
    assert m[("deltamask_round", ())] == 2 and sum(phases.values()) == 1 and phases["idle"] + phases["mask"] == 1
    assert m[("deltamask_devices_registered", ())] == 1 and m[("deltamask_devices_online", ())] == 1
    assert m[("deltamask_uplink_bytes_total", (("phase", "head"),))] == len(head)
    assert m[("deltamask_uplink_bytes_total", (("phase", "mask"),))] == len(upload.payload)
    assert m[("deltamask_downlink_bytes_total", ())] >= len(wire)
    assert m[("deltamask_round_uplink_bpp", (("phase", "mask"),))] == pytest.approx(8 * len(upload.payload) / fleet["d"])
    assert m[("deltamask_round_downlink_bpp", (("phase", "mask"),))] == pytest.approx(8 * len(wire) / fleet["d"])
    energy = {labels: v for (name, labels), v in m.items() if name == "deltamask_device_energy_joules_total"}
    assert sorted((dict(k)["phase"], v) for k, v in energy.items()) == [("head", 2.5), ("mask", 4.0)]
    assert all(dict(k)["kind"] for k in energy)
    assert m[("deltamask_decode_seconds_count", (("phase", "mask"),))] == 1
    assert m[("deltamask_round_close_seconds_count", (("phase", "head"),))] == 1
    rpc = {(dict(k)["method"], dict(k)["code"]): v for (name, k), v in m.items()
           if name == "deltamask_rpc_seconds_count"}
    assert rpc[("Register", "OK")] == 1 and rpc[("SubmitUpdate", "OK")] == 2 and rpc[("FetchTheta", "OK")] >= 1
    assert rpc[("GetStatus", "UNAUTHENTICATED")] == 1
    mask = wait_for_mask_round(fleet)[1]  # held-out scores: a sampled mask, and the expected network export writes
    assert m[("deltamask_round_accuracy", (("phase", "mask"),))] == pytest.approx(mask["accuracy"])
    assert m[("deltamask_round_accuracy_expected", ())] == pytest.approx(mask["accuracy_expected"])
    code, out, _ = ctl(fleet, "--json", "rounds")  # keep: best over the scores the operator sees
    assert code == 0 and m[("deltamask_kept_round", ())] == kept_of(Policy(), json.loads(out)).round


def ctl(fleet, *args):
    run = subprocess.run([sys.executable, "-m", "server.ctl", "--config", str(fleet["config"]), *args], cwd=ROOT,
                         env=fleet["env"], capture_output=True, text=True, timeout=60)
    return run.returncode, run.stdout, run.stderr


def wait_for_mask_round(fleet):
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        code, out, _ = ctl(fleet, "--json", "rounds")
        rounds = json.loads(out) if code == 0 else []
        if any(r["phase"] == "mask" and r["state"] == "closed" for r in rounds):
            return rounds
        time.sleep(0.2)
    raise AssertionError("the mask round did not close")


def test_ctl_status_devices_rounds_and_energy_as_the_operator(fleet):
    rounds = wait_for_mask_round(fleet)
    assert [(r["round"], r["phase"], r["state"], r["received"]) for r in rounds] == [(0, "head", "closed", 1),
                                                                                    (1, "mask", "closed", 1)]
    assert rounds[1]["uplink_bpp"] == pytest.approx(8 * len(fleet["upload"].payload) / fleet["d"])
    # scored on held-out data: the head alone after the head round; after the mask round a sampled mask and
    # the expected network w * theta (what export writes by default)
    assert 0 < rounds[0]["accuracy"] <= 1 and rounds[0]["accuracy_expected"] is None
    assert 0 < rounds[1]["accuracy"] <= 1 and 0 < rounds[1]["accuracy_expected"] <= 1
    code, out, _ = ctl(fleet, "--json", "status")
    status = json.loads(out)
    assert code == 0 and status["round"] == 2 and (status["registered"], status["online"]) == (1, 1)
    assert status["phase"] in ("idle", "mask")  # round 2 opens as soon as the rounds thread looks
    code, out, _ = ctl(fleet, "status")
    assert code == 0 and out.startswith(f"round 2  phase {status['phase']}  devices 1 registered, 1 online")
    code, out, _ = ctl(fleet, "--json", "devices")
    devices = json.loads(out)
    assert code == 0 and [(d["name"], d["kind"], d["online"]) for d in devices] == [("pi-1", "rpi4", True)]
    assert 0 <= devices[0]["seen_s_ago"] < 60
    code, out, _ = ctl(fleet, "--json", "energy")
    assert code == 0 and [(u["round"], u["phase"], u["name"], u["energy_j"], u["meter"]) for u in json.loads(out)] \
        == [(0, "head", "pi-1", 2.5, "ina219"), (1, "mask", "pi-1", 4.0, "")]
    code, out, _ = ctl(fleet, "energy")  # the table
    assert code == 0 and out.splitlines()[0].split()[:4] == ["round", "phase", "name", "energy_j"]
    assert out.splitlines()[1].split()[:4] == ["0", "head", "pi-1", "2.5"]


def test_ctl_watch_redraws_and_plot_writes_pngs_that_open(fleet, tmp_path):
    from PIL import Image

    wait_for_mask_round(fleet)
    code, out, _ = ctl(fleet, "watch", "--interval", "0.1", "--count", "2")
    assert code == 0 and out.count("round 2  phase ") == 2 and len(re.findall(r"^1\s+mask\s+closed", out, re.M)) == 2
    code, out, _ = ctl(fleet, "plot", "--out", str(tmp_path / "charts"))
    assert code == 0 and sorted(Path(p).name for p in out.split()) == ["accuracy.png", "bpp.png", "energy.png"]
    for name in ("accuracy.png", "bpp.png", "energy.png"):
        with Image.open(tmp_path / "charts" / name) as image:
            assert image.format == "PNG" and image.size[0] > 300


def test_ctl_without_the_operator_credential_is_refused(fleet, tmp_path):
    wrong = tmp_path / "wrong.credential"
    wrong.write_text("dmo.nobody.secret\n")
    run = subprocess.run([sys.executable, "-m", "server.ctl", "--address", f"localhost:{fleet['port']}", "--ca",
                          str(fleet["state"] / "tls" / "ca.pem"), "--credential-file", str(wrong), "devices"],
                         cwd=ROOT, env=fleet["env"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and "UNAUTHENTICATED" in run.stderr and run.stdout == ""


def test_ctl_export_builds_the_file_deltamask_server_export_writes(fleet, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    wait_for_mask_round(fleet)
    code, out, err = ctl(fleet, "export", "--out", str(tmp_path / "remote.onnx"))
    assert code == 0, err
    made = subprocess.run([sys.executable, "-m", "server.cli", "export", "--config", str(fleet["config"]), "--out",
                           str(tmp_path / "local.onnx")], cwd=ROOT, env=fleet["env"], capture_output=True, text=True,
                          timeout=300)
    assert made.returncode == 0, made.stderr
    remote, local = json.loads(out), json.loads(made.stdout)
    assert remote.pop("out") != local.pop("out") and remote == local
    code, out, _ = ctl(fleet, "--json", "rounds")  # keep: best: the round scored best (here the head, or round 1)
    assert code == 0 and remote["round"] == kept_of(Policy(), json.loads(out)).round
    meta = [onnxruntime.InferenceSession(str(tmp_path / f"{n}.onnx")).get_modelmeta().custom_metadata_map["deltamask"]
            for n in ("remote", "local")]
    assert meta[0] == meta[1]
    x = np.random.default_rng(0).standard_normal((4, 1, 16, 16)).astype(np.float32)
    logits = [onnxruntime.InferenceSession(str(tmp_path / f"{n}.onnx")).run(None, {"images": x})[0]
              for n in ("remote", "local")]
    assert np.array_equal(logits[0], logits[1])


def test_ctl_revoke_takes_a_devices_seat_and_devices_shows_it(fleet):
    """A lost board: `deltamask-ctl revoke NAME` refuses its credential from then on and `devices` says so
    (tests/test_auth.py holds the rest of what a revocation does). Last in this module: it adds a device."""
    wait_for_mask_round(fleet)
    credential = {"secret": ""}
    stub = connect(f"localhost:{fleet['port']}", str(fleet["state"] / "tls" / "ca.pem"), lambda: credential["secret"])
    request = pb.RegisterRequest(name="pi-lost", kind=pb.RPI4, enrollment_token=fleet["token"])
    reg = stub.Register(request, timeout=60)
    credential["secret"] = reg.credential
    stub.Heartbeat(pb.HeartbeatRequest(), timeout=30)
    code, out, err = ctl(fleet, "revoke", "pi-lost")
    assert code == 0, err
    assert json.loads(out) == {"name": "pi-lost", "device_id": reg.device_id, "was_revoked": False}
    with pytest.raises(grpc.RpcError) as refused:
        stub.Heartbeat(pb.HeartbeatRequest(), timeout=30)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    code, out, _ = ctl(fleet, "--json", "devices")
    assert code == 0 and {d["name"]: d["revoked"] for d in json.loads(out)} == {"pi-1": False, "pi-lost": True}
    code, _, err = ctl(fleet, "revoke", "nobody")
    assert code == 1 and "INVALID_ARGUMENT" in err and "nobody" in err
