"""The paper's baselines on the engine: their codecs (encode, decode, bits) on tiny inputs, and their rounds in
the simulator on the tiny backbone: FedMask (thresholded masks, 1 bpp), DeepReduce (Bloom filter, P0),
fine-tuning (FedAvg of float32 updates), EDEN (1-bit updates) and linear probing alone."""
import numpy as np
import pytest

from deltamask import PayloadError
from deltamask.codecs import decode, get_codec
from deltamask.codecs.base import FRAME_OVERHEAD, pack_frame, read_frame
from deltamask.codecs.bloom import BITS_PER_KEY, bloom_shape
from deltamask.federation import Aggregator, LocalTraining, Policy, plan_round
from deltamask.rounds import client_update, rebuild_client_mask
from deltamask.sampling import reference_mask, theta_to_thresholds

from tests.scripts import load_script


# --- DeepReduce: a Bloom filter over the delta positions, P0 --------------------------------------------
def test_bloom_flags_every_position_and_false_positives_at_its_rate():
    d, rng = 400_000, np.random.default_rng(0)
    positions = np.sort(rng.choice(d, 4000, replace=False))
    payload = get_codec("bloom").encode(positions, d)
    m, k = bloom_shape(len(positions))
    assert (m, k) == (BITS_PER_KEY * 4000, 6)
    assert len(payload) == FRAME_OVERHEAD + 17 + m // 8  # header <QQB, then the bits
    flips = decode(payload, d).flip_positions()
    assert np.isin(positions, flips).all()  # no false negatives
    false = len(flips) - len(positions)
    rate = get_codec("bloom").false_positive_rate
    assert 0.012 < rate < 0.015  # (1 - e^(-6/9))^6
    assert abs(false / (d - len(positions)) - rate) < 0.2 * rate
    # P0: the flagged positions flip the reference, false ones too
    reference = np.ones(d, bool)
    rebuilt = decode(payload, d).client_mask(reference)
    assert np.count_nonzero(~rebuilt) == len(flips)


def test_bloom_refuses_a_header_that_does_not_fit_its_count():
    payload = get_codec("bloom").encode(np.arange(0, 1000, 7), 1000)
    f = read_frame(payload)
    bad = pack_frame(f.codec_id, f.d, f.count + 1, f.header, f.body)
    with pytest.raises(PayloadError, match="bloom header"):
        decode(bad, 1000)
    with pytest.raises(PayloadError, match="bloom body"):
        decode(pack_frame(f.codec_id, f.d, f.count, f.header, f.body[:-1]), 1000)


# --- FedMask: the whole thresholded mask at 1 bpp --------------------------------------------------------
def test_bitmask_is_the_mask_at_exactly_one_bit_a_parameter():
    d = 10_003
    mask = np.random.default_rng(1).random(d) < 0.7
    payload = get_codec("bitmask").encode(mask, d)
    assert len(payload) == FRAME_OVERHEAD + (d + 7) // 8
    assert np.array_equal(decode(payload, d).client_mask(np.zeros(d, bool)), mask)


def test_a_threshold_rule_uploads_theta_k_at_or_above_tau():
    d = 5000
    theta_g = theta_to_thresholds(np.full(d, 0.9))
    theta_k = np.random.default_rng(2).random(d).astype(np.float32)
    up = client_update(theta_g, theta_k, 7, "dev", 1.0, get_codec("bitmask"), tau=0.4)
    packed, digest = rebuild_client_mask(decode(up.payload, d), theta_g, 7, "dev")
    rebuilt = np.unpackbits(packed, bitorder="little")[:d].astype(bool)
    assert np.array_equal(rebuilt, theta_k >= 0.4)
    assert digest == up.reference_digest
    assert up.delta == np.count_nonzero(rebuilt != reference_mask(theta_g, 7, "dev"))


# --- dense updates: float32 and EDEN --------------------------------------------------------------------
def test_float32_is_exact_at_32_bits():
    d = 1000
    x = np.random.default_rng(3).standard_normal(d).astype(np.float32)
    payload = get_codec("float32").encode(x, d)
    assert len(payload) == FRAME_OVERHEAD + 4 * d
    assert np.array_equal(decode(payload, d).values, x)


def test_eden_is_one_bit_unbiased_with_its_known_error():
    d = 2 * 65536  # whole chunks: no padding to truncate the error away
    x = np.random.default_rng(4).standard_normal(d).astype(np.float32)
    payload = get_codec("eden").encode(x, d)
    assert len(payload) == FRAME_OVERHEAD + 9 + 4 * 2 + d // 8  # a bit a coordinate and a float a chunk
    y = decode(payload, d).values
    # one bit a coordinate after a random rotation: relative error sqrt(pi/2 - 1) ~ 0.755
    assert np.linalg.norm(y - x) / np.linalg.norm(x) == pytest.approx(0.755, abs=0.02)
    # unbiased: the mean of estimates under different rotations converges to x (error ~ 0.755 / sqrt(n))
    x = x[:2000]
    small = x.copy()
    mean = np.zeros(2000)
    for i in range(200):
        small[0] = x[0] + i * 1e-3  # another update, another rotation seed
        estimate = decode(get_codec("eden").encode(small, 2000), 2000).values
        estimate[0] -= i * 1e-3
        mean += estimate / 200
    assert np.linalg.norm(mean - x) / np.linalg.norm(x) < 0.08


def test_eden_refuses_bad_scales_and_a_weight_update_has_no_mask():
    d = 3000
    payload = get_codec("eden").encode(np.ones(d, np.float32), d)
    f = read_frame(payload)
    header = f.header[:9] + np.array([np.nan], "<f4").tobytes()
    with pytest.raises(PayloadError, match="finite"):
        decode(pack_frame(f.codec_id, f.d, f.count, header, f.body), d)
    with pytest.raises(ValueError, match="finite"):
        get_codec("eden").encode(np.full(d, np.inf, np.float32), d)
    with pytest.raises(PayloadError, match="no mask"):  # a coordinator handed a weight update in a mask round
        rebuild_client_mask(decode(payload, d), theta_to_thresholds(np.full(d, 0.9)), 1, "dev")


def test_weight_updates_average_with_fedavg_weights():
    agg = Aggregator(Policy(codec="float32"), 4, 2, 3)
    assert np.array_equal(agg.offset, np.zeros(4, np.float32))
    a, b = np.array([1, 2, 3, 4], np.float32), np.array([3, 2, 1, 0], np.float32)
    assert np.allclose(agg.close_weights({"b": (b, 30), "a": (a, 10)}), (10 * a + 30 * b) / 40)
    assert np.allclose(agg.close_weights({"a": (a, 1)}), (10 * a + 30 * b) / 40 + a)  # updates accumulate


# --- policy --------------------------------------------------------------------------------------------
def test_linear_probing_alone_plans_head_rounds_then_stops():
    policy = Policy(head="linear_probe", head_rounds=3, rounds=0)
    policy.check()
    plans = [plan_round(policy, i, i, 0, ["a", "b"]) for i in range(3)]
    assert [p.phase for p in plans] == ["head"] * 3
    assert plan_round(policy, 3, 3, 0, ["a", "b"]) is None
    with pytest.raises(ValueError, match="0 only for linear probing"):
        Policy(rounds=0).check()
    with pytest.raises(ValueError, match="mask_rule"):
        Policy(mask_rule="top").check()


def test_the_coordinator_refuses_the_simulator_only_baselines():
    from server.config import ServerConfig

    for keys, match in ((dict(codec="eden"), "fine-tuning baseline"), (dict(mask_rule="threshold"), "FedMask"),
                        (dict(head="linear_probe", rounds=0), "rounds must be at least 1")):
        with pytest.raises(ValueError, match=match):
            ServerConfig(d=100, backbone=None, insecure=True, **keys).check()


# --- the simulator on the tiny backbone -----------------------------------------------------------------
TINY = dict(backbone="tiny", weights=None, image_size=16, dataset="digits", train_samples=0, test_samples=0,
            clients=3, rounds=2, min_per_client=5, refit=False, local=LocalTraining(epochs=1, batch_size=32, weight_lr=1e-3))


@pytest.fixture(scope="module")
def baselines():
    from deltamask.learn.sim import run

    compare = load_script("compare")
    common = {k: v for k, v in TINY.items() if k != "local"}
    out = {}
    for name in ("finetune", "eden", "fedmask", "deepreduce", "linear-probe"):
        config = compare.sim_config(common, 0, compare.RUNS[name], {"batch_size": 32, "weight_lr": 1e-3})
        out[name] = list(run(config, progress=False))
    return out


def test_fine_tuning_rounds_move_the_weights_at_32_and_1_bits(baselines):
    d = baselines["finetune"][0]["d"]
    for name, low, high in (("finetune", 32.0, 32.1), ("eden", 1.0, 1.4)):
        head, rounds = baselines[name][0], baselines[name][1:]
        assert [r["phase"] for r in rounds] == ["mask", "mask"] and all(r["update"] == "weights" for r in rounds)
        for r in rounds:
            assert low <= r["uplink_bpp"] <= high and r["downlink_bpp"] == 32.0 and r["clients"] == 3
        assert rounds[0]["weights_sha256"] != rounds[1]["weights_sha256"]
        assert head["d"] == d
    # the fine-tuned weights change what the network predicts (the head alone scores otherwise)
    assert any(r["accuracy"] != baselines["finetune"][0]["accuracy"] for r in baselines["finetune"][1:])


def test_fedmask_and_deepreduce_rounds_account_their_bits(baselines):
    for r in baselines["fedmask"][1:]:
        assert 1.0 <= r["uplink_bpp"] < 1.05 and r["false_flips"] == 0
    for r in baselines["deepreduce"][1:]:  # P0: every false positive is a flip
        assert r["false_flips"] > 0 and r["flips_applied"] == pytest.approx(r["kept"] + r["false_flips"])


def test_linear_probing_alone_runs_its_rounds_as_head_rounds(baselines):
    rows = baselines["linear-probe"]
    assert [r["phase"] for r in rows] == ["head", "head"]
    assert rows[0]["downlink_bpp"] == 0.0 and rows[1]["downlink_bpp"] == pytest.approx(rows[1]["uplink_bpp"])
