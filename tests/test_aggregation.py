import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deltamask.aggregation import MEAN, MODE, BetaCounts, reset_due, reset_period, theta_from_counts
from deltamask.sampling import theta_to_thresholds, thresholds_to_theta


@given(st.integers(1, 8), st.integers(1, 200), st.integers(0, 2**32 - 1))
@settings(max_examples=60, deadline=None)
def test_counts_are_the_sum_of_the_masks_added_one_at_a_time(k, d, seed):
    rng = np.random.default_rng(seed)
    masks = rng.random((k, d)) < rng.random(d)
    counts = BetaCounts(d)
    for mask in masks:
        counts.add(mask)
    assert counts.masks == k
    assert np.array_equal(counts.ones, masks.sum(axis=0))
    theta = counts.theta(MODE)
    assert np.allclose(theta, masks.mean(axis=0))  # lambda0 = 1: the mode is the fraction of ones
    mean = counts.theta(MEAN)
    assert np.allclose(mean, (masks.sum(axis=0) + 1) / (k + 2))
    assert np.all((0 <= theta) & (theta <= 1))


@given(st.integers(1, 3000), st.integers(0, 2**32 - 1))
@settings(max_examples=40, deadline=None)
def test_packed_masks_add_like_bool_masks(d, seed):
    mask = np.random.default_rng(seed).random(d) < 0.3
    a, b = BetaCounts(d), BetaCounts(d)
    a.add(mask)
    b.add_packed(np.packbits(mask, bitorder="little"), chunk=64)
    assert np.array_equal(a.ones, b.ones) and a.masks == b.masks == 1


def test_mode_with_a_stronger_prior():
    ones = np.array([0, 3, 10])
    theta = theta_from_counts(ones, masks=10, lambda0=2.0)
    assert np.allclose(theta, (ones + 1) / 12)


def test_mode_is_undefined_without_masks_and_keeps_the_previous_theta():
    previous = np.array([0.99, 0.5])
    assert np.array_equal(BetaCounts(2).theta(previous=previous), previous)
    with pytest.raises(ValueError, match="previous"):
        BetaCounts(2).theta()
    with pytest.raises(ValueError, match="formula"):
        theta_from_counts(np.zeros(2), 1, formula="median")


def test_mean_never_decides_a_position_the_mode_can():
    """Why the mode is the default: with a reset every round the mean stays inside (0, 1)."""
    k = 10
    counts = BetaCounts(1)
    for _ in range(k):
        counts.add(np.array([True]))
    assert counts.theta(MODE)[0] == 1.0
    assert counts.theta(MEAN)[0] == pytest.approx((k + 1) / (k + 2))


def test_reset_restores_the_prior():
    counts = BetaCounts(3)
    counts.add(np.array([True, False, True]))
    counts.reset()
    assert counts.masks == 0 and not counts.ones.any()


def test_reset_period_is_ceil_one_over_rho_even_where_floating_point_says_otherwise():
    assert reset_period(1.0) == 1
    assert reset_period(0.5) == 2
    assert reset_period(1 / 3) == 3  # 1 / (1/3) == 3.0000000000000004
    assert reset_period(0.3) == 4
    assert [r for r in range(7) if reset_due(r, 1 / 3)] == [0, 3, 6]
    with pytest.raises(ValueError):
        reset_period(0)


def test_sharded_slices_then_mask_count_equal_whole_masks():
    rng = np.random.default_rng(9)
    masks = rng.random((3, 1000)) < 0.6
    whole, sharded = BetaCounts(1000), BetaCounts(1000)
    for mask in masks:
        whole.add(mask)
    for lo in range(0, 1000, 128):  # a map over (index range) shards, then one count of the masks
        sharded.add_slice(masks[:, lo:lo + 128].sum(axis=0), lo)
    sharded.count_masks(3)
    assert np.array_equal(whole.ones, sharded.ones) and whole.masks == sharded.masks
    assert np.array_equal(whole.theta(), sharded.theta())


@pytest.mark.parametrize("formula,lambda0", [("mode", 1.0), ("mode", 2.5), ("mean", 1.0), ("mean", 0.5)])
def test_thresholds_equal_the_thresholds_of_theta(formula, lambda0):
    rng = np.random.default_rng(3)
    counts = BetaCounts(5000, lambda0)
    for _ in range(7):
        counts.add(rng.random(5000) < rng.random(5000))
    previous = theta_to_thresholds(rng.random(5000))
    expected = theta_to_thresholds(counts.theta(formula, previous=thresholds_to_theta(previous, np.float64)))
    assert np.array_equal(counts.thresholds(formula, previous=previous), expected)


def test_thresholds_keep_the_previous_ones_where_the_mode_is_undefined():
    previous = theta_to_thresholds(np.linspace(0, 1, 100))
    assert np.array_equal(BetaCounts(100).thresholds(previous=previous), previous)
