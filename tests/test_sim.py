"""The simulator end to end on a tiny backbone and scikit-learn's digits (seconds, not minutes)."""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from deltamask.errors import DataError, ModelError
from deltamask.federation import LocalTraining
from deltamask.learn.sim import SimConfig, parse_args, run

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(backbone="tiny", weights=None, image_size=16, dataset="digits", train_samples=0, test_samples=0,
            clients=3, rounds=2, min_per_client=5, head="linear_probe", refit=False,
            local=LocalTraining(epochs=1, head_epochs=5, batch_size=32, loss="local_classes"))


@pytest.mark.parametrize("codec", ["bfuse8", "exact", "rawmask"])
def test_rounds_report_accuracy_bits_and_flips(codec):
    rows = list(run(SimConfig(codec=codec, **TINY), progress=False))
    head, masks = rows[0], rows[1:]
    assert head["phase"] == "head" and head["d"] == 6768 and 0 <= head["accuracy"] <= 1
    assert head["uplink_bpp"] == pytest.approx(32 * (32 * 10 + 10) / 6768)  # one float32 head a client
    assert [r["round"] for r in masks] == [1, 2]
    for r in masks:
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["accuracy_expected"] <= 1
        assert r["uplink_bpp"] > 0 and r["downlink_bpp"] >= 0 and r["clients"] == 3
        if codec == "exact":
            assert r["false_flips"] == 0 and r["flips_applied"] == r["kept"]
        if codec == "rawmask":
            assert r["false_flips"] == 0 and r["uplink_bpp"] > 0.05  # the whole mask (DEFLATE), not a delta
            # FedPM's ideal arithmetic-coded size: under the mask's own frequency of ones, and under theta_g
            assert 0 < r["ideal_entropy_bpp"] <= 1 and 0 < r["ideal_cross_entropy_bpp"] <= 1
            assert r["ideal_entropy_bpp"] < r["uplink_bpp"]  # DEFLATE does not reach the entropy
    assert masks[0]["kappa"] == pytest.approx(0.8) and masks[-1]["kappa"] == pytest.approx(1.0)


def test_same_config_same_results():
    first = list(run(SimConfig(**TINY), progress=False))
    second = list(run(SimConfig(**TINY), progress=False))
    strip = lambda rows: [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rows]  # noqa: E731
    assert strip(first) == strip(second)


def test_partial_participation_samples_k_clients_and_resets_on_schedule():
    rows = list(run(SimConfig(**{**TINY, "clients": 4, "rho": 0.5, "rounds": 3}), progress=False))
    assert [r["clients"] for r in rows[1:]] == [2, 2, 2]


def test_heads_lda_and_kaiming_and_several_linear_probe_rounds():
    lda = list(run(SimConfig(**{**TINY, "head": "lda", "lda_covariance": "diag", "rounds": 1}), progress=False))
    full = list(run(SimConfig(**{**TINY, "head": "lda", "lda_covariance": "full", "rounds": 1}), progress=False))
    kaiming = list(run(SimConfig(**{**TINY, "head": "kaiming", "rounds": 1}), progress=False))
    assert lda[0]["uplink_bpp"] == pytest.approx(32 * (10 * 32 + 32) / 6768 + 32 * 10 / 6768)  # sums, counts, diag
    assert full[0]["uplink_bpp"] == pytest.approx((32 * (10 * 32 + 10) + 16 * 32 * 33 / 2) / 6768)
    projected = list(run(SimConfig(**{**TINY, "head": "lda", "lda_covariance": "projected", "lda_rank": 16,
                                      "rounds": 1}), progress=False))
    assert projected[0]["uplink_bpp"] == pytest.approx((32 * (10 * 16 + 10) + 16 * 16 * 17 / 2) / 6768)
    assert kaiming[0]["uplink_bpp"] == 0 and kaiming[0]["round"] == -1 and kaiming[1]["round"] == 0
    assert min(lda[0]["accuracy"], full[0]["accuracy"], projected[0]["accuracy"]) > kaiming[0]["accuracy"]
    probes = list(run(SimConfig(**{**TINY, "head_rounds": 3, "rounds": 1}), progress=False))
    assert [r["phase"] for r in probes] == ["head", "head", "head", "mask"] and probes[3]["round"] == 3
    assert len({r["head_sha256"] for r in probes[:3]}) == 3  # each head round moves the head


def test_clear_errors_for_bad_settings():
    with pytest.raises(ModelError, match="unknown backbone"):
        list(run(SimConfig(**{**TINY, "backbone": "resnet9000"}), progress=False))
    with pytest.raises(DataError):
        list(run(SimConfig(**{**TINY, "clients": 400}), progress=False))


@pytest.mark.parametrize("head,codec,loss", [("linear_probe", "exact-cond", "local_classes"),
                                             ("kaiming", "float32", "local_classes"),
                                             ("lda", "exact", "virtual_classes")])  # the head's anchors kept too
def test_a_run_killed_in_any_round_resumes_from_its_checkpoint_to_the_same_rows(tmp_path, monkeypatch, head, codec,
                                                                                 loss):
    """Killed while round k runs, the same run with the same checkpoint gives the rows the uninterrupted run
    gives from round k on (head, theta, accuracy); killed between printing a row and saving, it gives that row
    again. A checkpoint of another configuration, or a damaged one, is refused with the reason."""
    from deltamask.errors import CheckpointError
    from deltamask.learn import sim

    config = SimConfig(**{**TINY, "rounds": 4, "clients": 4, "rho": 0.5, "head": head, "codec": codec,
                          "local": LocalTraining(head_epochs=5, batch_size=32, loss=loss)})
    strip = lambda rows: [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rows]  # noqa: E731
    whole = strip(run(config, progress=False))
    opened = sim.Federation.open
    for kill in (1, 3):
        def killed(self, plan, kill=kill):
            if plan.index == kill:
                raise KeyboardInterrupt
            return opened(self, plan)

        path = tmp_path / f"run-{kill}.npz"
        rows = []
        with monkeypatch.context() as m:
            m.setattr(sim.Federation, "open", killed)
            with pytest.raises(KeyboardInterrupt):
                for row in run(config, progress=False, checkpoint=path):
                    rows.append(row)
        rows += list(run(config, progress=False, checkpoint=path))
        assert strip(rows) == whole, kill
        assert list(run(config, progress=False, checkpoint=path)) == []  # finished: nothing left to run
    path = tmp_path / "between.npz"
    taken = []
    for row in run(config, progress=False, checkpoint=path):
        taken.append(row)
        if len(taken) == 3:
            break  # the row is printed, the state after it not yet saved
    again = list(run(config, progress=False, checkpoint=path))
    assert strip(again[:1]) == strip(taken[-1:]) and strip(taken[:-1] + again) == whole
    with pytest.raises(CheckpointError, match="rho"):
        other = SimConfig(**{**TINY, "rounds": 4, "clients": 4, "rho": 1.0, "head": head, "codec": codec})
        list(run(other, progress=False, checkpoint=tmp_path / "run-1.npz"))
    (tmp_path / "bad.npz").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        list(run(config, progress=False, checkpoint=tmp_path / "bad.npz"))


def test_cli_prints_json_lines_and_a_clear_error(tmp_path):
    args = ["--backbone", "tiny", "--weights", "none", "--image-size", "16", "--dataset", "digits",
            "--train-samples", "0", "--test-samples", "0", "--clients", "2", "--rounds", "1", "--min-per-client", "5",
            "--epochs", "1"]
    out = subprocess.run([sys.executable, "-m", "deltamask.learn.sim", *args], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert "config" in lines[0] and [(r["round"], r["phase"]) for r in lines[1:]] == [(0, "head"), (1, "mask"),
                                                                                      (2, "refit")]
    bad = subprocess.run([sys.executable, "-m", "deltamask.learn.sim", *args, "--dataset", "cifar10", "--data-root",
                          str(ROOT / "no-such-folder")], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "error:" in bad.stderr and "Traceback" not in bad.stderr
    assert parse_args(["--weights", "none"])[0].weights is None
    resumed = [sys.executable, "-m", "deltamask.learn.sim", *args, "--checkpoint", str(tmp_path / "run.npz")]
    first = subprocess.run(resumed, capture_output=True, text=True, cwd=ROOT)
    assert [json.loads(line).get("round") for line in first.stdout.splitlines()] == [None, 0, 1, 2]
    done = subprocess.run(resumed, capture_output=True, text=True, cwd=ROOT)  # finished: the config line alone
    assert done.returncode == 0 and len(done.stdout.splitlines()) == 1 and "resuming at round 3" in done.stderr
    other = subprocess.run(resumed + ["--seed", "7"], capture_output=True, text=True, cwd=ROOT)
    assert other.returncode == 2 and "another configuration (seed differ)" in other.stderr


@pytest.mark.parametrize("plain", ["exact", "bfuse8"])
def test_a_conditional_codec_runs_the_same_rounds_in_fewer_bits_or_with_fewer_false_flips(plain):
    """exact-cond is lossless: the same positions, so the same theta every round (its bytes are measured on
    MobileNetV2 in docs/results.md: here, about one position an upload, its few header bytes dominate).
    bfuse8-cond queries only the undecided positions, so it makes fewer false flips."""
    config = {**TINY, "rounds": 3}
    rows = list(run(SimConfig(codec=plain, **config), progress=False))[1:]
    cond = list(run(SimConfig(codec=f"{plain}-cond", **config), progress=False))[1:]
    if plain == "exact":
        assert [r["theta_sha256"] for r in cond] == [r["theta_sha256"] for r in rows]
        extra_bytes = [(c["uplink_bpp"] - r["uplink_bpp"]) * 6768 / 8 for c, r in zip(cond, rows)]
        assert max(extra_bytes) <= 4  # three varints; each position then costs log2(d/|U|) bits less
    else:
        assert sum(r["false_flips"] for r in cond) < sum(r["false_flips"] for r in rows)


def test_keep_best_chooses_by_validation_images_never_the_test_images():
    """With val_samples, every round is scored on training images the federation's subset leaves out as well;
    the kept round is the best of those scores so far (the head round included) and kept_accuracy is that
    round's test score; with keep: last it is the latest round. Too many validation images: a clear error."""
    from deltamask.data import load_dataset, seeded_subset
    from deltamask.errors import DataError
    from deltamask.federation import KEPT_BY, kept_of
    from deltamask.learn.sim import validation_images

    config = SimConfig(**{**TINY, "train_samples": 600, "val_samples": 300, "test_samples": 200, "rounds": 4,
                          "head": "lda", "lda_covariance": "diag", "codec": "exact", "theta0": 0.9})
    rows = list(run(config, progress=False))
    for k, row in enumerate(rows):
        key = KEPT_BY[row["phase"]]
        assert 0 < row["val_" + key] <= 1 and 0 < row[key] <= 1
        kept = kept_of(config, [{**r, key_: r["val_" + key_]} for r in rows[:k + 1] for key_ in [KEPT_BY[r["phase"]]]])
        assert row["kept_round"] == kept.round
        assert row["kept_accuracy"] == rows[kept.round][KEPT_BY[rows[kept.round]["phase"]]]
    assert [r["val_accuracy"] for r in rows] != [r["accuracy"] for r in rows]  # two sets of images
    n = len(load_dataset("digits", "train").labels)
    val = validation_images(n, config)
    assert len(val) == 300 and not set(val) & set(seeded_subset(n, 600, config.seed))
    last = list(run(dataclasses.replace(config, keep="last"), progress=False))
    assert [r["kept_round"] for r in last] == [r["round"] for r in last]
    with pytest.raises(DataError, match="val_samples"):
        list(run(dataclasses.replace(config, val_samples=n), progress=False))
