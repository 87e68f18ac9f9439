"""The model users take home: a coordinator runs a head round, two mask rounds and the refit (the head fitted
again on theta * w) on the tiny backbone with real learners and held-out evaluation; `deltamask-server export` writes ONNX and TorchScript files whose
outputs match the torch network, whose accuracy equals what the coordinator reported for the last round with
the same mask (expected, sampled or mode), and
which `deltamask-predict` runs on image files."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

from deltamask.data import device_share, load_dataset, seeded_subset  # noqa: E402
from deltamask.federation import HEAD, MASK, REFIT  # noqa: E402
from deltamask.headwire import decode_head  # noqa: E402
from deltamask.learn.learner import LocalLearner, Model  # noqa: E402
from deltamask.predict import Predictor, exported_accuracy  # noqa: E402
from deltamask.thetawire import decode_theta  # noqa: E402
from deltamask.transfer import sha256_hex  # noqa: E402
from server.config import load_config  # noqa: E402
from server.coordinator import Coordinator  # noqa: E402
from server.evaluation import Evaluator, model_facts  # noqa: E402
from server.export import export, final_state, network  # noqa: E402
from server.store import Store  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["board-a", "board-b"]


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """A finished coordinator state (its config file, config, facts, evaluator and history)."""
    folder = tmp_path_factory.mktemp("export")
    settings = {"state_dir": str(folder / "state"), "backbone": "tiny", "weights": None, "image_size": 16,
                "num_classes": 10, "expected_clients": 2, "min_quorum": 2, "rounds": 2, "head": "lda",
                "lda_covariance": "diag", "codec": "exact", "insecure": True, "theta0": 0.9,
                "evaluation": {"dataset": "digits", "samples": 300, "seed": 1}, "local": {"epochs": 1, "batch_size": 32},
                "keep": "last", "refit": True}
    (folder / "server.yaml").write_text(yaml.safe_dump(settings))
    config = load_config(folder / "server.yaml")
    facts = model_facts(config)
    evaluate = Evaluator(config)
    c = Coordinator(config, facts, Store(config.state_dir), evaluate=evaluate)
    train = load_dataset("digits", "train")
    model = Model("tiny", None, config.blocks, 16, 10, config.theta0)
    learners = {}
    for k, name in enumerate(NAMES):
        share = device_share(train.labels, 0, len(NAMES), k, 10.0, 5, 0)
        learners[name] = LocalLearner(model, model.prefix(train.images[share]), train.labels[share])
    ids = {c.register(name, "laptop", 0, "").device_id: name for name in NAMES}
    last = {i: -1 for i in ids}
    for i in ids:
        c.get_task(i, -1, 0)
    while not c.done.is_set():
        c.step()
        if c.open is None:
            continue
        for i, name in ids.items():
            task = c.get_task(i, last[i], 0)
            if task.work is None:
                continue
            head = decode_head(task.head, 10, facts.feature_dim) if task.head else None
            thresholds = None if task.phase == HEAD else decode_theta(c.theta_for(i, task.round), facts.d)  # +refit
            reply = learners[name].work(task.work, name, head, thresholds)
            c.submit(i, task.round, reply.payload, reply.reference_digest, {"num_examples": reply.examples})
            last[i] = task.round
        c.step()
    c.store.close()
    return {"file": folder / "server.yaml", "config": config, "facts": facts, "evaluate": evaluate,
            "history": c.history, "folder": folder}


def test_the_exported_model_matches_torch_and_scores_what_the_coordinator_reported(federation):
    config, facts, score = federation["config"], federation["facts"], federation["evaluate"].score
    last = federation["history"][-1]
    assert last["phase"] == REFIT and last["state"] == "closed" and 0 < last["accuracy"] <= 1  # theta, refit head
    out = federation["folder"] / "model.onnx"
    meta = export(config, facts, out, "onnx", "sample")
    assert meta["round"] == last["round"] and meta["accuracy"] == last["accuracy"]
    assert meta["theta_sha256"] == last["next_theta_sha256"] and meta["image_size"] == 16
    assert meta["head_sha256"] == last["head_sha256"] and meta["phase"] == REFIT
    assert meta["class_names"] == [str(i) for i in range(10)]  # digits has no names but its indices
    # the held-out images as the coordinator scored them, end to end through the exported file
    data = load_dataset("digits", "test")
    held = seeded_subset(len(data.labels), 300, 1)
    from deltamask.data import prepare_images

    pre = Model("tiny", None, config.blocks, 16, 10).backbone.preprocessing
    inputs = prepare_images(data.images[held], 16, pre.channels, pre.mean, pre.std).numpy()
    onnx_model = Predictor(str(out))
    assert onnx_model.meta == meta
    assert exported_accuracy(onnx_model, inputs, data.labels[held]) == pytest.approx(last["accuracy"], abs=1e-12)
    net, _ = network(final_state(config, facts), "sample", config.weights)
    with torch.no_grad():
        expected = net(torch.from_numpy(inputs[:64])).numpy()
    assert np.allclose(onnx_model.logits(inputs[:64]), expected, atol=1e-4, rtol=1e-4)
    # TorchScript carries the same metadata and the same function
    script = federation["folder"] / "model.pt"
    assert export(config, facts, script, "torch", "sample") == meta
    torch_model = Predictor(str(script))
    assert torch_model.meta == meta
    assert np.allclose(torch_model.logits(inputs[:64]), expected, atol=1e-5)
    # the expected network w * theta (the default) and the deterministic mask theta >= 1/2: each file scores
    # what the coordinator reported for that mask, and records that figure
    for mask, key in (("expected", "accuracy_expected"), ("mode", "accuracy_mode")):
        made = export(config, facts, federation["folder"] / f"{mask}.onnx", "onnx", mask)
        assert made["mask"] == mask and made["accuracy"] == last[key] and made["theta_sha256"] == meta["theta_sha256"]
        other = Predictor(str(federation["folder"] / f"{mask}.onnx"))
        assert exported_accuracy(other, inputs, data.labels[held]) == pytest.approx(last[key], abs=1e-12)
    # theta is not all decided after two rounds, so the expected network is another function than the sample
    assert not np.allclose(Predictor(str(federation["folder"] / "expected.onnx")).logits(inputs[:64]), expected,
                           atol=1e-4, rtol=1e-4)
    assert export(config, facts, federation["folder"] / "default.onnx")["mask"] == "expected"
    # the evaluator scored these very inputs
    assert np.array_equal(score.labels.numpy(), data.labels[held])


def test_keep_best_exports_the_round_that_scored_best_and_the_file_scores_it(federation):
    """keep: best (the default) bakes the round the coordinator scored highest (the expected mask's accuracy,
    or the head alone after the head round), whichever that is, and the file scores what that round reported."""
    import dataclasses

    from deltamask.data import prepare_images
    from deltamask.federation import KEPT_BY, kept_of

    config, facts, history = dataclasses.replace(federation["config"], keep="best"), federation["facts"], \
        federation["history"]
    kept = kept_of(config, history)
    row = next(h for h in history if h["round"] == kept.round)
    assert kept.score == max(h[KEPT_BY[h["phase"]]] for h in history)
    out = federation["folder"] / "kept.onnx"
    meta = export(config, facts, out)
    assert (meta["round"], meta["phase"], meta["accuracy"]) == (kept.round, kept.phase, kept.score)
    assert meta["theta_sha256"] == row["next_theta_sha256"]
    data = load_dataset("digits", "test")
    held = seeded_subset(len(data.labels), 300, 1)
    pre = Model("tiny", None, config.blocks, 16, 10).backbone.preprocessing
    inputs = prepare_images(data.images[held], 16, pre.channels, pre.mean, pre.std).numpy()
    assert exported_accuracy(Predictor(str(out)), inputs, data.labels[held]) == pytest.approx(kept.score, abs=1e-12)
    # the head round as the kept one: every weight kept, whichever mask is asked for; the file scores the head
    head_row = history[0]
    assert head_row["phase"] == HEAD
    only = dataclasses.replace(config, state_dir=str(federation["folder"] / "head-only"))
    import shutil

    shutil.copytree(federation["config"].state_dir, only.state_dir)
    store = Store(only.state_dir)
    for h in history[1:]:
        store.close_round(h["round"], h["state"], {**h, "accuracy_expected": 0.0})  # mask rounds scored worse
    store.close()
    for mask in ("expected", "sample", "mode"):
        meta = export(only, facts, federation["folder"] / f"head-{mask}.onnx", "onnx", mask)
        assert (meta["round"], meta["phase"]) == (head_row["round"], HEAD)
        assert exported_accuracy(Predictor(str(federation["folder"] / f"head-{mask}.onnx")), inputs,
                                 data.labels[held]) == pytest.approx(head_row["accuracy"], abs=1e-12)
    # a mask round kept over the refit: its theta with the head it was scored with (the head round's, not the
    # refit's)
    assert [h["phase"] for h in history] == [HEAD, MASK, MASK, REFIT]
    first = dataclasses.replace(config, state_dir=str(federation["folder"] / "mask-kept"))
    shutil.copytree(federation["config"].state_dir, first.state_dir)
    store = Store(first.state_dir)
    for h in history:  # the last mask round scored best (its theta is the refit's, still on disk)
        if h["round"] != 2:
            store.close_round(h["round"], h["state"], {**h, "accuracy": 0.0, "accuracy_expected": 0.0})
    head_wire, refit_wire = store.load_head(), store.load_head(refit=True)
    store.close()
    meta = export(first, facts, federation["folder"] / "mask-kept.onnx")
    assert (meta["round"], meta["phase"]) == (2, MASK) and meta["head_sha256"] == sha256_hex(head_wire)
    assert head_wire != refit_wire and meta["accuracy"] == history[2]["accuracy_expected"]
    assert exported_accuracy(Predictor(str(federation["folder"] / "mask-kept.onnx")), inputs,
                             data.labels[held]) == pytest.approx(history[2]["accuracy_expected"], abs=1e-12)


def test_deltamask_server_export_and_deltamask_predict_from_the_command_line(federation):
    from PIL import Image

    folder = federation["folder"]
    run = subprocess.run([sys.executable, "-m", "server.cli", "export", "--config", str(federation["file"]),
                          "--out", str(folder / "cli.onnx")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    printed = json.loads(run.stdout)
    assert printed["round"] == federation["history"][-1]["round"] and printed["mask"] == "expected"
    assert printed["phase"] == "refit"  # keep: last (the refit after the last mask round)
    data = load_dataset("digits", "test")
    paths = []
    for k in range(3):
        path = folder / f"digit-{k}.png"
        Image.fromarray(data.images[k]).save(path)
        paths.append(str(path))
    run = subprocess.run([sys.executable, "-m", "deltamask.predict", str(folder / "cli.onnx"), *paths, "--json",
                          "--top", "2"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    rows = [json.loads(line) for line in run.stdout.splitlines()]
    assert [r["image"] for r in rows] == paths
    for r in rows:
        assert len(r["classes"]) == 2 and r["classes"][0]["score"] >= r["classes"][1]["score"] > 0
        assert r["classes"][0]["class"] in [str(i) for i in range(10)]
    bad = subprocess.run([sys.executable, "-m", "deltamask.predict", str(folder / "missing.onnx"), paths[0]],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "deltamask-predict: error" in bad.stderr
