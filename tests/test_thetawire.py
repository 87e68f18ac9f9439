import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deltamask import PayloadError
from deltamask.sampling import ONE, theta_to_thresholds
from deltamask.thetawire import MAX_LEVELS, decode_theta, encode_theta, theta_digest


def counts_theta(d, k, probabilities, weights, seed=0):
    """theta as the mode formula leaves it: the fraction of K clients with a one."""
    rng = np.random.default_rng(seed)
    p = rng.choice(np.asarray(probabilities), size=d, p=weights)
    return theta_to_thresholds(rng.binomial(k, p) / k)


@given(st.lists(st.integers(0, ONE), min_size=1, max_size=400), st.integers(1, 6))
@settings(max_examples=80, deadline=None)
def test_thresholds_round_trip_exactly(values, distinct):
    t = np.array(values, dtype=np.uint32) % (distinct * 1000 + 1) * 7  # few distinct values, some repeated
    t = np.minimum(t, ONE).astype(np.uint32)
    assert np.array_equal(decode_theta(encode_theta(t), len(t)), t)


def test_many_distinct_values_fall_back_to_raw_and_still_round_trip():
    t = np.random.default_rng(1).integers(0, ONE + 1, size=5000).astype(np.uint32)
    wire = encode_theta(t)
    assert len(np.unique(t)) > MAX_LEVELS
    assert np.array_equal(decode_theta(wire, 5000), t)


def test_downlink_is_at_most_two_bits_per_parameter_for_count_valued_theta():
    d = 1_000_000
    early = counts_theta(d, 10, [0.99], [1.0])
    mixed = counts_theta(d, 10, [0.99, 0.5, 0.05], [0.85, 0.10, 0.05])
    for t, entropy_bound in ((early, 0.6), (mixed, 2.0)):
        wire = encode_theta(t)
        assert np.array_equal(decode_theta(wire, d), t)
        assert 8 * len(wire) / d <= entropy_bound
    uniform = theta_to_thresholds(np.full(d, 0.99))
    assert 8 * len(encode_theta(uniform)) / d < 0.001


def test_wire_is_close_to_the_empirical_entropy():
    d = 500_000
    t = counts_theta(d, 10, [0.99, 0.5, 0.05], [0.85, 0.10, 0.05], seed=4)
    _, counts = np.unique(t, return_counts=True)
    freq = counts / d
    entropy_bits = float(-(freq * np.log2(freq)).sum()) * d
    assert 8 * len(encode_theta(t)) <= 1.03 * entropy_bits + 2000


def test_digest_names_the_exact_bytes():
    t = counts_theta(10_000, 10, [0.9], [1.0])
    assert theta_digest(encode_theta(t)) == theta_digest(encode_theta(t.copy()))
    other = t.copy()
    other[0] = ONE - other[0]
    assert theta_digest(encode_theta(other)) != theta_digest(encode_theta(t))


def test_bad_theta_messages_raise_payload_error():
    t = counts_theta(10_000, 10, [0.9, 0.5], [0.8, 0.2])
    wire = encode_theta(t)
    with pytest.raises(PayloadError, match="d = 10000, expected d = 9999"):
        decode_theta(wire, 9999)
    with pytest.raises(PayloadError):
        decode_theta(wire[: len(wire) // 2])
    garbled = bytearray(wire)
    garbled[len(wire) // 2] ^= 0x10
    with pytest.raises(PayloadError, match="CRC"):
        decode_theta(bytes(garbled))
    with pytest.raises(PayloadError):
        decode_theta(b"DMSK" + bytes(40))


def test_encode_refuses_what_is_not_thresholds():
    with pytest.raises(ValueError):
        encode_theta(np.array([0.5, 0.2]))
    with pytest.raises(ValueError):
        encode_theta(np.array([ONE + 1], dtype=np.uint32))


def test_values_too_rare_for_the_palette_sample_still_round_trip():
    d = 300_000
    t = np.full(d, ONE, dtype=np.uint32)
    t[::7] = 5
    t[[11, 12_345, 299_999]] = [1, 2, 3]  # each once: a strided sample misses them
    assert np.array_equal(decode_theta(encode_theta(t), d), t)
    t[:300] = np.arange(300)  # more than 255 distinct values besides the fill: the raw layout
    assert np.array_equal(decode_theta(encode_theta(t), d), t)
