"""Payload sizes against the floor: what a kept position costs, header and PNG included."""
import numpy as np
import pytest

from deltamask.bits import bits_per_position, exact_floor_bits, payload_bits
from deltamask.codecs import get_codec
from deltamask.codecs import rice

CLIP_D = 35_439_360  # CLIP ViT-B/32, last 5 blocks


def random_positions(d, k, seed):
    rng = np.random.default_rng(seed)
    picked = np.unique(rng.integers(0, d, int(k * 1.02) + 100))
    return np.sort(rng.permutation(picked)[:k])


def test_bfuse8_costs_at_most_9_bits_per_position_with_fpr_near_1_in_256():
    k = 354_394  # 1% of CLIP's masked parameters
    positions = random_positions(CLIP_D, k, 0)
    codec = get_codec("bfuse8")
    payload = codec.encode(positions, CLIP_D)
    assert bits_per_position(payload_bits(payload), k) <= 9.0
    flipped = codec.decode(payload, CLIP_D).flip_positions()
    assert np.isin(positions, flipped).all()
    fpr = (len(flipped) - k) / (CLIP_D - k)
    assert 0.003 <= fpr <= 0.005


@pytest.mark.parametrize("density", [0.001, 0.01, 0.05])
def test_exact_codec_is_within_5_percent_of_log2_binomial(density):
    d = 10_000_000
    k = int(density * d)
    positions = random_positions(d, k, 1)
    payload = get_codec("exact").encode(positions, d)
    assert payload_bits(payload) <= 1.05 * exact_floor_bits(d, k)
    assert np.array_equal(get_codec("exact").decode(payload, d).flip_positions(), positions)


def test_rice_parameter_search_finds_the_smallest_code():
    gaps = np.random.default_rng(3).geometric(0.01, 50_000) - 1
    best = rice._best_k(gaps)
    cost = {k: rice.coded_bits(len(gaps), int((gaps >> k).sum()), k) for k in range(0, 20)}
    assert cost[best] == min(cost.values())


def test_dense_sets_are_coded_as_their_complement():
    d = 10_000
    positions = np.setdiff1d(np.arange(d), [3, 500, 9_999])
    payload = get_codec("exact").encode(positions, d)
    assert len(payload) < 100
    assert np.array_equal(get_codec("exact").decode(payload, d).flip_positions(), positions)


def test_rawmask_is_about_one_bit_per_parameter_for_an_undecided_mask():
    d = 1_000_000
    mask = np.random.default_rng(4).random(d) < 0.5
    payload = get_codec("rawmask").encode(mask, d)
    assert 0.99 <= payload_bits(payload) / d <= 1.01
