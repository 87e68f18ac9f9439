"""The conditional codecs: positions coded by rank within theta_g's undecided set, decoded against the same
theta; the same flips as their plain codec, fewer bytes, and filters that flip only undecided positions."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deltamask import PayloadError
from deltamask.codecs import CODECS, decode, get_codec
from deltamask.codecs.conditional import undecided
from deltamask.sampling import ONE

CONDITIONAL = [name for name, c in CODECS.items() if c.conditional]


@st.composite
def theta_and_flips(draw, max_d=4000):
    """Thresholds with decided (0 or 1) and undecided positions, and flips mostly among the undecided."""
    d = draw(st.integers(1, max_d))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    state = rng.choice(3, size=d, p=[0.45, 0.45, 0.1])  # 0, 1, undecided
    thresholds = np.where(state == 0, 0, np.where(state == 1, ONE, rng.integers(1, ONE, size=d))).astype(np.uint32)
    u = undecided(thresholds)
    inside = rng.choice(u, size=min(len(u), draw(st.integers(0, 300))), replace=False) if len(u) else []
    escapes = rng.choice(d, size=min(d, draw(st.integers(0, 3))), replace=False)  # the rare decided one
    return d, thresholds, np.unique(np.concatenate([inside, escapes]).astype(np.int64))


@pytest.mark.parametrize("name", CONDITIONAL)
@given(case=theta_and_flips())
@settings(max_examples=30, deadline=None)
def test_a_conditional_codec_round_trips_against_the_same_theta(name, case):
    d, thresholds, positions = case
    codec = get_codec(name)
    update = decode(codec.encode(positions, d, thresholds), d, thresholds)
    flipped = update.flip_positions()
    assert np.isin(positions, flipped).all()
    if codec.false_positive_rate == 0:
        assert np.array_equal(flipped, positions)
    else:  # a filter's false flips fall in the undecided set only, never on a decided position
        assert np.isin(np.setdiff1d(flipped, positions), undecided(thresholds)).all()


def test_exact_cond_costs_a_fraction_of_exact_when_a_tenth_is_undecided():
    d = 2_000_000
    rng = np.random.default_rng(0)
    thresholds = np.where(rng.random(d) < 0.5, 0, ONE).astype(np.uint32)
    u = rng.choice(d, d // 10, replace=False)
    thresholds[u] = ONE // 2
    positions = np.sort(rng.choice(u, 2000, replace=False))
    plain, cond = get_codec("exact").encode(positions, d), get_codec("exact-cond").encode(positions, d, thresholds)
    assert len(cond) < 0.8 * len(plain)  # log2(d/|U|) = 3.3 bits a position fewer, of ~12.6
    assert np.array_equal(decode(cond, d, thresholds).flip_positions(), positions)


def test_a_conditional_filter_makes_fewer_false_flips_by_the_undecided_share():
    d = 400_000
    rng = np.random.default_rng(1)
    thresholds = np.zeros(d, dtype=np.uint32)
    u = rng.choice(d, d // 20, replace=False)
    thresholds[u] = ONE // 3
    positions = np.sort(rng.choice(u, 3000, replace=False))
    plain = decode(get_codec("bfuse8").encode(positions, d), d).flip_positions()
    cond = decode(get_codec("bfuse8-cond").encode(positions, d, thresholds), d, thresholds).flip_positions()
    false_plain, false_cond = len(plain) - len(positions), len(cond) - len(positions)
    assert false_plain > 1000 and false_cond < false_plain / 10  # |U| = d/20: ~20x fewer queries


@pytest.mark.parametrize("name", ["exact-cond", "bfuse8-cond"])
def test_a_conditional_payload_is_refused_without_theta_or_against_another(name):
    d = 10_000
    rng = np.random.default_rng(2)
    thresholds = np.where(rng.random(d) < 0.2, ONE // 2, 0).astype(np.uint32)
    positions = undecided(thresholds)[:50]
    payload = get_codec(name).encode(positions, d, thresholds)
    with pytest.raises(PayloadError, match="theta, which was not given"):
        decode(payload, d)
    other = thresholds.copy()
    other[np.flatnonzero(other == 0)[:5]] = 7
    with pytest.raises(PayloadError, match="another theta"):
        decode(payload, d, other)
    with pytest.raises(ValueError, match="pass its 10000 thresholds"):
        get_codec(name).encode(positions, d)
