"""The round policy and the aggregator: NumPy only (this file also runs where torch is not installed)."""
import numpy as np
import pytest

from deltamask.aggregation import BetaCounts
from deltamask.errors import PayloadError
from deltamask.federation import (HEAD, MASK, REFIT, Aggregator, LocalTraining, Policy, average_heads,
                                  clients_per_round, device_task, head_bits, kaiming_head, lda_head, lda_projection,
                                  plan_round, train_seed)
from deltamask.headwire import (LdaStats, class_block_nbytes, decode_head, decode_lda_stats, encode_head,
                                encode_lda_stats, lda_stats_nbytes)
from deltamask.sampling import theta_to_thresholds

NAMES = [f"dev-{i:02d}" for i in range(30)]


def test_k_is_rho_of_the_eligible_at_least_the_quorum_at_most_all():
    assert clients_per_round(0.2, 30) == 6 and clients_per_round(0.2, 30, min_quorum=8) == 8
    assert clients_per_round(1.0, 3, min_quorum=5) == 3 and clients_per_round(0.01, 30) == 1


def test_a_plan_depends_on_the_names_not_their_order_and_changes_with_the_round():
    policy = Policy(rho=0.2, rounds=10)
    a = plan_round(policy, 4, 1, 3, NAMES)
    b = plan_round(policy, 4, 1, 3, list(reversed(NAMES)))
    assert a == b and a.phase == MASK and len(a.selected) == 6 and list(a.selected) == sorted(a.selected)
    assert plan_round(policy, 5, 1, 4, NAMES).selected != a.selected
    assert a.reset == (3 % 5 == 0) and plan_round(policy, 6, 1, 5, NAMES).reset  # every ceil(1/rho) = 5 rounds
    assert train_seed(a.seed, "dev-01") != train_seed(a.seed, "dev-02") and a.eval_seed != a.seed


def test_head_phase_lengths_and_the_end_of_the_federation():
    assert plan_round(Policy(head="lda"), 0, 0, 0, NAMES).phase == HEAD
    assert plan_round(Policy(head="lda"), 1, 1, 0, NAMES).phase == MASK
    assert plan_round(Policy(head="kaiming"), 0, 0, 0, NAMES).phase == MASK
    probe = Policy(head="linear_probe", head_rounds=3, head_rho=0.5)
    assert [plan_round(probe, i, i, 0, NAMES).phase for i in range(4)] == [HEAD, HEAD, HEAD, MASK]
    assert len(plan_round(probe, 0, 0, 0, NAMES).selected) == 15
    assert plan_round(Policy(rounds=2, refit=False), 9, 1, 2, NAMES) is None
    task = device_task(probe, plan_round(probe, 0, 0, 0, NAMES))
    assert task.head == "linear_probe" and task.local == LocalTraining()


def test_the_refit_is_one_head_round_of_head_rho_after_the_last_mask_round():
    refit = Policy(head="lda", rounds=2, rho=0.2, refit=True)
    phases = [plan_round(refit, i, min(i, 1) + (i > 3), max(0, min(i - 1, 2)), NAMES) for i in range(5)]
    assert [p.phase if p else None for p in phases] == [HEAD, MASK, MASK, REFIT, None]
    assert len(phases[3].selected) == len(NAMES) and len(phases[1].selected) == 6  # head_rho 1, rho 0.2
    assert device_task(refit, phases[3]).phase == REFIT
    assert refit.finished(2, 2) and not refit.finished(1, 2) and Policy(rounds=2, refit=False).finished(1, 2)
    probe = Policy(head="linear_probe", head_rounds=2, rounds=1, refit=True)  # linear probing: one round more
    assert [plan_round(probe, i, h, m, NAMES).phase for i, h, m in [(0, 0, 0), (1, 1, 0), (2, 2, 0), (3, 2, 1)]] == \
        [HEAD, HEAD, MASK, REFIT]
    assert plan_round(Policy(head="kaiming", rounds=1, refit=True), 1, 0, 1, NAMES) is None  # no head round to redo


def test_the_refit_replaces_w_and_b_keeps_the_anchors_and_takes_no_class_sums():
    policy = Policy(lda_covariance="full", local=LocalTraining(loss="virtual_classes"))
    x, y = gaussian(600, classes=4)
    rng = np.random.default_rng(1)
    inputs = rng.normal(0, 1, (600, 12))

    def share(features, with_inputs):
        s = stats(features, y, classes=4, covariance="full")
        sums = np.zeros((4, 12))
        np.add.at(sums, y, inputs)
        return encode_lda_stats(LdaStats(s.sums, s.counts, s.second, sums if with_inputs else None), "full")

    agg = Aggregator(policy, 40, 4, 6, input_dim=12)
    head = agg.close_head({"a": (agg.decode_share(share(x, True)), 600)}, 0)
    moved = 2 * x + 1  # the features of the final network
    with pytest.raises(PayloadError):  # the refit's statistics carry no class sums
        agg.decode_share(share(moved, True), REFIT)
    refit = agg.close_head({"a": (agg.decode_share(share(moved, False), REFIT), 600)}, 3, REFIT)
    alone = Aggregator(Policy(lda_covariance="full"), 40, 4, 6).close_head(
        {"a": (decode_lda_stats(share(moved, False), 4, 6, "full"), 600)}, 3)
    assert np.array_equal(refit[0], alone[0]) and np.array_equal(refit[1], alone[1])
    assert not np.allclose(refit[0], head[0]) and np.array_equal(refit[2], head[2], equal_nan=True)
    assert head_bits(policy, 4, 6, 12, REFIT) == 8 * lda_stats_nbytes(4, 6, "full") < head_bits(policy, 4, 6, 12)


@pytest.mark.parametrize("bad", [dict(head="svm"), dict(rho=0), dict(head_rho=1.5), dict(lda_covariance="lowrank"),
                                 dict(lda_rank=0, lda_covariance="projected"),
                                 dict(local=LocalTraining(loss="focal")), dict(theta0=1.0), dict(rounds=0),
                                 dict(head="linear_probe", local=LocalTraining(loss="virtual_classes")),
                                 dict(codec="float32", local=LocalTraining(loss="virtual_classes"))])
def test_a_bad_policy_is_refused_with_the_key_named(bad):
    with pytest.raises(ValueError, match=next(iter(bad)) if "local" not in bad else "loss"):
        Policy(**bad).check()


def gaussian(n, features=6, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    x = rng.normal(0, 3, (classes, features))[labels] + rng.normal(0, 1, (n, features))
    return x, labels


def stats(x, labels, classes=3, covariance="diag"):
    sums = np.zeros((classes, x.shape[1]))
    np.add.at(sums, labels, x)
    second = (x * x).sum(0) if covariance == "diag" else x.T @ x
    return LdaStats(sums, np.bincount(labels, minlength=classes).astype(float), second)


@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_the_lda_head_does_not_depend_on_how_the_data_are_split_and_survives_the_wire(covariance):
    x, y = gaussian(900)
    shares = [stats(x[i::3], y[i::3], covariance=covariance) for i in range(3)]
    split, whole = lda_head(shares), lda_head([stats(x, y, covariance=covariance)])
    assert np.allclose(split[0], whole[0], rtol=1e-6) and np.allclose(split[1], whole[1], rtol=1e-6)
    assert ((x @ whole[0].T + whole[1]).argmax(1) == y).mean() > 0.95
    wire = [encode_lda_stats(s, covariance) for s in shares]  # float32 sums; float16 mean second moments
    assert all(len(w) == lda_stats_nbytes(3, 6, covariance) for w in wire)
    sent = lda_head([decode_lda_stats(w, 3, 6, covariance) for w in wire])
    assert np.allclose(sent[0], whole[0], rtol=2e-2, atol=2e-2)
    assert ((x @ sent[0].T + sent[1]).argmax(1) == (x @ whole[0].T + whole[1]).argmax(1)).mean() > 0.99
    with pytest.raises(PayloadError):
        decode_lda_stats(wire[0][:-4], 3, 6, covariance)


def test_projected_lda_sends_rank_r_statistics_and_its_head_acts_on_the_features():
    x, y = gaussian(900, features=40)
    policy = Policy(head="lda", lda_covariance="projected", lda_rank=8)
    agg = Aggregator(policy, 100, 3, 40)
    p = lda_projection(40, 8, round_seed=11)
    assert np.array_equal(p, lda_projection(40, 8, 11)) and not np.array_equal(p, lda_projection(40, 8, 12))
    shares = {f"d{i}": (agg.decode_share(encode_lda_stats(stats(x[i::3] @ p, y[i::3], covariance="full"),
                                                          "projected")), 300) for i in range(3)}
    assert lda_stats_nbytes(3, 40, "projected", 8) == 4 * (3 * 8 + 3) + 2 * 36
    weight, bias = agg.close_head(shares, round_seed=11)
    assert weight.shape == (3, 40) and ((x @ weight.T + bias).argmax(1) == y).mean() > 0.9


def test_the_aggregator_combines_replies_in_name_order_whatever_their_arrival():
    policy = Policy(head="linear_probe")
    agg = Aggregator(policy, 64, 3, 6)
    rng = np.random.default_rng(1)
    heads = {f"d{i}": ((rng.normal(size=(3, 6)).astype(np.float32), rng.normal(size=3).astype(np.float32)), i + 1)
             for i in range(4)}
    decoded = {n: (agg.decode_share(encode_head(*h)), w) for n, (h, w) in heads.items()}
    forward = agg.close_head(decoded, 0)
    backward = agg.close_head(dict(reversed(list(decoded.items()))), 0)
    assert all(np.array_equal(a, b) for a, b in zip(forward, backward))
    expect = average_heads([h for h, _ in heads.values()], [w for _, w in heads.values()])
    assert np.allclose(forward[0], expect[0]) and forward[0].dtype == np.float32


def test_mask_rounds_reset_the_counts_on_schedule_and_theta_is_the_counts_mode():
    policy = Policy(rho=0.5, rounds=4, theta0=0.9)
    agg = Aggregator(policy, 40, 3, 6)
    assert np.array_equal(agg.thresholds, theta_to_thresholds(np.full(40, 0.9)))
    masks = np.random.default_rng(2).random((2, 40)) < 0.5
    for m in masks:
        agg.counts.add(m)
    agg.open_mask(plan_round(policy, 1, 1, 0, NAMES))  # mask round 0: reset due
    assert agg.counts.masks == 0
    for m in masks:
        agg.counts.add(m)
    agg.open_mask(plan_round(policy, 2, 1, 1, NAMES))  # mask round 1: no reset (period 2)
    assert agg.counts.masks == 2
    reference = BetaCounts(40)
    for m in masks:
        reference.add(m)
    assert np.array_equal(agg.close_mask(), theta_to_thresholds(reference.theta()))


def test_the_kaiming_head_comes_from_the_seed_within_torchs_default_bound():
    w, b = kaiming_head(100, 10, seed=3)
    assert np.array_equal(w, kaiming_head(100, 10, seed=3)[0]) and not np.array_equal(w, kaiming_head(100, 10, 4)[0])
    assert np.abs(w).max() <= 0.1 and np.abs(w).max() > 0.09 and not b.any()
    assert Aggregator(Policy(head="kaiming", seed=3), 10, 10, 100).head[0].tobytes() == w.tobytes()


def test_virtual_classes_anchors_are_the_pooled_class_means_of_the_inputs_and_travel_with_the_head():
    """virtual_classes: each device's LDA statistics carry its per-class sums of the masked blocks' inputs; the
    aggregator's head carries the federation's class means of them (whatever the split), NaN for a class no
    device holds; the wire keeps both, and a reply without the sums, or with the wrong width, is refused."""
    policy = Policy(lda_covariance="full", local=LocalTraining(loss="virtual_classes"))
    policy.check()
    with pytest.raises(ValueError, match="size of the masked blocks' inputs"):
        Aggregator(policy, 40, 4, 6)
    with pytest.raises(ValueError, match="more than the .* a task carries"):  # 100 classes x a ViT's 50 x 768
        Aggregator(policy, 40, 100, 512, input_dim=50 * 768)
    x, y = gaussian(600, classes=3)  # class 3 is held by no device
    rng = np.random.default_rng(5)
    inputs = rng.normal(2, 1, (600, 12)) + y[:, None]  # what the masked blocks take: 12 numbers an example

    def share(part):
        s = stats(x[part], y[part], classes=4, covariance="full")
        sums = np.zeros((4, 12))
        np.add.at(sums, y[part], inputs[part])
        return LdaStats(s.sums, s.counts, s.second, sums)

    agg = Aggregator(policy, 40, 4, 6, input_dim=12)
    parts = [np.arange(600)[i::3] for i in range(3)]
    wire = [encode_lda_stats(share(p), "full") for p in parts]
    assert len(wire[0]) == lda_stats_nbytes(4, 6, "full") + class_block_nbytes(4, 12)
    head = agg.close_head({f"d{i}": (agg.decode_share(w), 200) for i, w in enumerate(wire)}, 0)
    assert len(head) == 3
    pooled = np.stack([inputs[y == c].mean(0) for c in range(3)])
    assert np.allclose(head[2][:3], pooled, atol=1e-5) and np.isnan(head[2][3]).all()
    whole = Aggregator(policy, 40, 4, 6, input_dim=12).close_head(
        {"all": (decode_lda_stats(encode_lda_stats(share(np.arange(600)), "full"), 4, 6, "full", 0, 12), 600)}, 0)
    assert np.allclose(whole[2][:3], head[2][:3], atol=1e-5)
    down = encode_head(*head)
    assert len(down) == 4 * (4 * 6 + 4) + class_block_nbytes(4, 12, anchors=True)
    back = decode_head(down, 4, 6)
    assert all(np.array_equal(a, b, equal_nan=True) for a, b in zip(back, head)) and len(back) == 3
    assert len(decode_head(encode_head(*head[:2]), 4, 6)) == 2
    plain = encode_lda_stats(stats(x, y, classes=4, covariance="full"), "full")
    for bad, why in [(plain, "without the class sums"), (wire[0][:-4], "class block"),
                     (encode_lda_stats(replace_inputs(share(parts[0]), np.zeros((4, 11))), "full"), "11 inputs")]:
        with pytest.raises(PayloadError, match=why):
            agg.decode_share(bad)
    with pytest.raises(PayloadError):  # a device's own linear head never carries anchors
        decode_head(down, 4, 6, limit=1e4)
    # one encoding of each head: a flag other than 0/1, or a value in an unheld row, is refused
    at = 4 * (4 * 6 + 4) + 8  # the flags
    for bad in (down[:at + 3] + b"\x02" + down[at + 4:], down[:-4] + np.float32(1).tobytes()):
        with pytest.raises(PayloadError, match="one encoding"):
            decode_head(bad, 4, 6)
    # sums for a class of no examples would move its mean at no weight
    odd = share(parts[0])
    sums = odd.inputs.copy()
    sums[3] = 1.0
    with pytest.raises(PayloadError, match="class of no examples"):
        agg.decode_share(encode_lda_stats(replace_inputs(odd, sums), "full"))


def replace_inputs(s, inputs):
    return LdaStats(s.sums, s.counts, s.second, inputs)


def test_keep_round_holds_the_best_scored_round_and_kept_of_folds_a_history_to_it():
    from deltamask.federation import BEST, KEPT_BY, LAST, Kept, keep_round, kept_of

    best, last = Policy(keep=BEST), Policy(keep=LAST)
    assert keep_round(best, None, 0, HEAD, 0.80) == Kept(0, HEAD, 0.80)
    assert keep_round(best, Kept(0, HEAD, 0.80), 1, MASK, 0.79) == Kept(0, HEAD, 0.80)  # worse: not kept
    assert keep_round(best, Kept(0, HEAD, 0.80), 1, MASK, 0.80) == Kept(0, HEAD, 0.80)  # a tie keeps the earlier
    assert keep_round(best, Kept(0, HEAD, 0.80), 2, MASK, 0.81) == Kept(2, MASK, 0.81)
    assert keep_round(best, Kept(2, MASK, 0.81), 3, MASK, None) == Kept(2, MASK, 0.81)  # unscored: no candidate
    assert keep_round(best, Kept(2, MASK, None), 3, MASK, None) == Kept(3, MASK, None)  # nothing scored: latest
    assert keep_round(last, Kept(2, MASK, 0.81), 3, MASK, 0.10) == Kept(3, MASK, 0.10)
    history = [{"round": 0, "phase": HEAD, "state": "closed", "accuracy": 0.80},
               {"round": 1, "phase": MASK, "state": "closed", "accuracy": 0.99, "accuracy_expected": 0.82},
               {"round": 2, "phase": MASK, "state": "skipped", "accuracy_expected": 0.95},
               {"round": 3, "phase": MASK, "state": "closed", "accuracy": 0.70, "accuracy_expected": 0.81}]
    assert KEPT_BY == {HEAD: "accuracy", MASK: "accuracy_expected", REFIT: "accuracy_expected"}
    assert kept_of(best, history) == Kept(1, MASK, 0.82)  # by the expected mask; a skipped round is none
    refit = {"round": 4, "phase": REFIT, "state": "closed", "accuracy": 0.5, "accuracy_expected": 0.83}
    assert kept_of(best, history + [refit]) == Kept(4, REFIT, 0.83)  # the refit: theta * w with its own head
    assert kept_of(last, history) == Kept(3, MASK, 0.81) and kept_of(best, []) is None
    with pytest.raises(ValueError, match="keep"):
        Policy(keep="first").check()
