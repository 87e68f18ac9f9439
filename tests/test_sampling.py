import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyfusefilter._xorfilter import ffi, lib

from deltamask import sampling
from deltamask.sampling import (DIGEST_CHUNK, ONE, PER_CLIENT, SHARED, MaskDigest, chunk_digests, client_seed,
                                combine_digests, mask_digest, reference_seed,
                                sample_mask, sample_seed, theta_to_thresholds, thresholds_to_theta, uniforms)

# Golden vectors: another implementation (C on a board, Rust) must reproduce these exactly.
GOLDEN_SEED_0 = [14819496, 7239838, 443485, 16288696, 1784201, 5491615, 2917018, 12944403]
GOLDEN_SEED_X_AT_1M = [4300094, 14477955, 1309062, 7480368, 933303, 10362573, 9773027, 638404]
SEED_X = 0x0123456789ABCDEF
GOLDEN_CLIENT_SEED = 0xDF6C32652F93DC65  # client_seed(7, "rpi4-kitchen")
GOLDEN_MASK_HEX = "008081802b9ffef7"  # sample_mask(thresholds of linspace(0, 1, 64), seed 2026), packed LSB first
# SHA-256(b"deltamask/mask/v2" | d u64 LE | SHA-256(packed chunk) for each 2**20-position chunk)
GOLDEN_MASK_DIGEST = "b1284497a0aaf06f0151871abe5fae5610b2af4b996104e7828349d9388fe4e5"


def test_uniforms_match_golden_vectors():
    assert uniforms(0, 0, 8).tolist() == GOLDEN_SEED_0
    assert uniforms(SEED_X, 1_000_000, 1_000_008).tolist() == GOLDEN_SEED_X_AT_1M


def test_uniforms_are_the_splitmix64_stream_of_the_c_library():
    state = ffi.new("uint64_t *", SEED_X)
    expected = [lib.xor_rng_splitmix64(state) >> 40 for _ in range(2000)]
    assert uniforms(SEED_X, 0, 2000).tolist() == expected


@given(st.integers(0, 2**64 - 1), st.integers(0, 10**9), st.integers(1, 300))
@settings(max_examples=50, deadline=None)
def test_any_index_range_draws_the_same_uniforms(seed, start, length):
    whole = uniforms(seed, start, start + length)
    middle = length // 2
    assert np.array_equal(whole[middle:], uniforms(seed, start + middle, start + length))
    assert whole.dtype == np.uint32 and int(whole.max()) < 1 << 24


def test_sliced_sampling_equals_whole_sampling_across_internal_chunks():
    thresholds = theta_to_thresholds(np.random.default_rng(0).random(3 * sampling.CHUNK + 17))
    whole = sample_mask(thresholds, 99)
    start = sampling.CHUNK - 5
    assert np.array_equal(whole[start:], sample_mask(thresholds[start:], 99, start))


def test_sampling_follows_the_threshold_probability():
    d = 200_000
    for theta in (0.0, 0.1, 0.5, 0.99, 1.0):
        mask = sample_mask(theta_to_thresholds(np.full(d, theta)), 12345)
        assert abs(mask.mean() - theta) < 4 * np.sqrt(theta * (1 - theta) / d) + 1e-12


def test_mask_golden_vector_and_digest():
    mask = sample_mask(theta_to_thresholds(np.linspace(0, 1, 64)), 2026)
    assert np.packbits(mask, bitorder="little").tobytes().hex() == GOLDEN_MASK_HEX
    assert mask_digest(mask) == GOLDEN_MASK_DIGEST


def test_thresholds_are_exact_and_clipped():
    t = theta_to_thresholds(np.array([-0.5, 0.0, 0.5, 1.0, 1.5]))
    assert t.tolist() == [0, 0, ONE // 2, ONE, ONE]
    assert thresholds_to_theta(t, np.float64).tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]
    with pytest.raises(ValueError, match="NaN"):
        theta_to_thresholds(np.array([0.5, np.nan]))


def test_client_seed_is_derived_from_round_seed_and_client_id():
    assert client_seed(7, "rpi4-kitchen") == GOLDEN_CLIENT_SEED
    assert client_seed(7, "rpi4-kitchen") != client_seed(8, "rpi4-kitchen")
    assert client_seed(7, "rpi4-kitchen") != client_seed(7, "rpi4-garage")


def test_reference_modes():
    assert reference_seed(7, "a", PER_CLIENT) == sample_seed(7, "a") == client_seed(7, "a")
    assert reference_seed(7, "a", SHARED) == reference_seed(7, "b", SHARED) == 7
    with pytest.raises(ValueError, match="reference mode"):
        reference_seed(7, "a", "everyone")


def test_per_client_reference_couples_the_client_sample_to_its_reference():
    """Same uniforms: the masks differ only where theta moved (docs/design.md section 3.2)."""
    d = 100_000
    rng = np.random.default_rng(3)
    theta_g = np.full(d, 0.5)
    theta_k = np.clip(theta_g + rng.normal(0, 0.02, d), 0, 1)
    seed = sample_seed(11, "dev")
    own = sample_mask(theta_to_thresholds(theta_k), seed)
    coupled = sample_mask(theta_to_thresholds(theta_g), reference_seed(11, "dev", PER_CLIENT))
    shared = sample_mask(theta_to_thresholds(theta_g), reference_seed(11, "dev", SHARED))
    assert (own != coupled).mean() < 0.03  # ~ mean |theta_k - theta_g| = 0.016
    assert (own != shared).mean() > 0.45  # ~ 2 theta (1 - theta) = 0.5


@given(st.lists(st.booleans(), min_size=1, max_size=200), st.integers(0, 25))
def test_digest_is_the_same_whole_or_in_pieces(bits, piece):
    mask = np.array(bits)
    step = 8 * (piece + 1)
    digest = MaskDigest(len(mask))
    for lo in range(0, len(mask), step):
        digest.update(mask[lo:lo + step])
    assert digest.hexdigest() == mask_digest(mask)


def test_digest_refuses_misaligned_or_incomplete_pieces():
    digest = MaskDigest(16).update(np.ones(5, bool))
    with pytest.raises(ValueError, match="multiple of 8"):
        digest.update(np.ones(5, bool))
    with pytest.raises(ValueError, match="expected d"):
        MaskDigest(16).update(np.ones(8, bool)).hexdigest()


def test_digest_of_several_chunks_is_the_two_level_hash_and_shards_combine():
    import hashlib

    d = 2 * DIGEST_CHUNK + 1000  # two whole leaves and a short one
    mask = sample_mask(theta_to_thresholds(np.full(d, 0.3)), 99)
    packed = np.packbits(mask, bitorder="little").tobytes()
    step = DIGEST_CHUNK // 8
    leaves = [hashlib.sha256(packed[lo:lo + step]).digest() for lo in range(0, len(packed), step)]
    expected = hashlib.sha256(b"deltamask/mask/v2" + d.to_bytes(8, "little") + b"".join(leaves)).hexdigest()
    assert mask_digest(mask) == expected
    pieces = MaskDigest(d)
    for lo in range(0, d, 3 * 8 * 1000 + 8):  # pieces that straddle the leaf boundaries
        pieces.update(mask[lo:lo + 3 * 8 * 1000 + 8])
    assert pieces.hexdigest() == expected
    shards = chunk_digests(mask[:DIGEST_CHUNK], 0) + chunk_digests(mask[DIGEST_CHUNK:], DIGEST_CHUNK)
    assert combine_digests(d, shards) == expected
    with pytest.raises(ValueError, match="multiple of"):
        chunk_digests(mask[5:], 5)
    with pytest.raises(ValueError, match="leaf digests"):
        combine_digests(d, shards[:2])
