import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from deltamask.delta import bernoulli_kl, cosine_kappa, delta_positions, top_kappa


def test_delta_positions_lists_where_masks_differ():
    a = np.array([1, 0, 1, 1, 0], bool)
    b = np.array([1, 1, 1, 0, 0], bool)
    assert delta_positions(a, b).tolist() == [1, 3]
    with pytest.raises(ValueError, match="shape"):
        delta_positions(a, b[:4])


def test_bernoulli_kl_matches_the_formula_and_its_direction():
    p, q = 0.9, 0.6
    expected = p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
    assert bernoulli_kl(np.array([p]), np.array([q]))[0] == pytest.approx(expected)
    assert bernoulli_kl(np.array([q]), np.array([p]))[0] != pytest.approx(expected)
    assert bernoulli_kl(np.array([0.3]), np.array([0.3]))[0] == pytest.approx(0.0)


def test_bernoulli_kl_is_finite_at_decided_probabilities():
    kl = bernoulli_kl(np.array([0.0, 1.0, 1.0, 0.0]), np.array([1.0, 0.0, 1.0, 0.0]))
    assert np.all(np.isfinite(kl)) and kl[0] > 10 and kl[2] == pytest.approx(0.0)


def test_top_kappa_keeps_the_highest_scores_and_breaks_ties_by_position():
    positions = np.array([10, 20, 30, 40, 50])
    scores = np.array([0.1, 0.9, 0.5, 0.9, 0.2])
    assert top_kappa(positions, scores, 0.4).tolist() == [20, 40]
    assert top_kappa(positions, scores, 0.2).tolist() == [20]  # tie 0.9/0.9: the lower position
    assert top_kappa(positions, scores, 1.0).tolist() == [10, 20, 30, 40, 50]
    assert top_kappa(positions, scores, 0.0).tolist() == []
    with pytest.raises(ValueError, match="kappa"):
        top_kappa(positions, scores, 1.5)


@given(st.lists(st.floats(0, 10), min_size=0, max_size=200), st.floats(0, 1))
def test_top_kappa_keeps_ceil_kappa_n_and_never_a_lower_score_than_it_drops(scores, kappa):
    scores = np.array(scores)
    positions = np.arange(len(scores)) * 3
    kept = top_kappa(positions, scores, kappa)
    assert len(kept) == math.ceil(kappa * len(scores) - 1e-9)
    dropped = np.setdiff1d(positions, kept)
    if len(kept) and len(dropped):
        assert scores[kept // 3].min() >= scores[dropped // 3].max()


def test_cosine_kappa_starts_at_0_8_and_moves_monotonically_to_the_end():
    values = [cosine_kappa(r, 20) for r in range(20)]
    assert values[0] == pytest.approx(0.8) and values[-1] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert cosine_kappa(10, 21) == pytest.approx(0.9)
    assert cosine_kappa(5, 11, start=0.8, end=0.2) == pytest.approx(0.5)
    assert cosine_kappa(0, 1) == 0.8
