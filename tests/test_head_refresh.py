"""benchmarks/head_refresh.py: the FiT-LDA head re-fit on a federation's masked network, from its checkpoint."""
import json

import numpy as np

from deltamask.learn.sim import SimConfig, build, run
from deltamask.sampling import ONE
from tests.scripts import load_script
from tests.test_sim import TINY

refresh = load_script("head_refresh")
CONFIG = dict(TINY, head="lda", lda_covariance="full", clients=3, rounds=2, rho=1.0, theta0=0.99, refit=False)


def test_a_refit_on_the_untouched_network_is_the_head_round_s_head(tmp_path):
    config = SimConfig(**CONFIG)
    head = [r for r in run(config, progress=False, checkpoint=tmp_path / "run.npz") if r["phase"] == "head"][0]
    model, learners, _, num_classes = build(config, held_out=False)
    _, _, (old_weight, old_bias) = refresh.load(tmp_path / "run.npz")
    assert head["head_sha256"]  # the head round ran; its head is the checkpoint's
    untouched = np.full(model.d, ONE, np.uint32)
    # the whole statistics again, and the class means with the old covariance
    for weight, bias in refresh.refit_heads(config, model, learners, num_classes, untouched):
        np.testing.assert_allclose(weight, old_weight, rtol=1e-3, atol=1e-3 * np.abs(old_weight).max())
        np.testing.assert_allclose(bias, old_bias, rtol=1e-3, atol=1e-3 * np.abs(old_bias).max())
    # on a network a mask changed, the two re-fits differ from the old head and from each other
    theta = np.where(np.arange(model.d) % 3 == 0, ONE // 2, ONE).astype(np.uint32)
    full, means = refresh.refit_heads(config, model, learners, num_classes, theta)
    assert not np.allclose(full[0], old_weight, rtol=1e-2) and not np.allclose(means[0], full[0], rtol=1e-2)


def test_the_script_scores_the_old_and_the_re_fit_head_on_the_round_s_sample(tmp_path, capsys):
    config = SimConfig(**CONFIG)
    rows = [r for r in run(config, progress=False, checkpoint=tmp_path / "run.npz") if r["phase"] == "mask"]
    assert refresh.main([str(tmp_path / "run.npz")]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    row = json.loads(line)
    assert row["mask_rounds"] == 2
    # the old head on the run's last theta and evaluation mask: the scores the run logged for that round
    for key in ("accuracy", "accuracy_expected", "accuracy_mode"):
        assert row[f"old_{key}"] == rows[-1][key]
    assert 0 <= row["new_accuracy_expected"] <= 1 and 0 <= row["means_accuracy_expected"] <= 1


def test_the_benchmark_s_re_fit_is_the_head_of_the_engine_s_refit_round(tmp_path):
    """refit: true runs the same re-fit as a round: every device's statistics on theta * w, summed."""
    import dataclasses

    config = SimConfig(**dict(CONFIG, refit=True))
    rows = list(run(config, progress=False, checkpoint=tmp_path / "run.npz"))
    assert [r["phase"] for r in rows] == ["head", "mask", "mask", "refit"]
    model, learners, _, num_classes = build(config, held_out=False)
    meta, wire, (weight, bias) = refresh.load(tmp_path / "run.npz")  # after the refit round: its head
    from deltamask.thetawire import decode_theta

    plain = dataclasses.replace(config, refit=False)
    full, _ = refresh.refit_heads(plain, model, learners, num_classes, decode_theta(wire, model.d))
    assert np.array_equal(full[0], weight) and np.array_equal(full[1], bias)  # W and b (the anchors stay)
    assert rows[-1]["head_sha256"] != rows[0]["head_sha256"]
