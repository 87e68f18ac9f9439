"""One round end to end through the core functions: clients encode, the server rebuilds and aggregates."""
import numpy as np
import pytest

from deltamask import (BetaCounts, client_update, decode, get_codec, mask_digest, rebuild_client_mask,
                       sample_mask, theta_to_thresholds)
from deltamask.sampling import PER_CLIENT, SHARED, reference_seed, sample_seed

D = 50_000
ROUND_SEED = 2026


def trained_theta(rng, theta_g):
    return np.clip(theta_g + rng.normal(0, 0.05, D), 0, 1)


def unpack(packed):
    return np.unpackbits(packed, bitorder="little")[:D].astype(bool)


@pytest.mark.parametrize("mode", [PER_CLIENT, SHARED])
@pytest.mark.parametrize("name", ["exact", "rawmask"])
def test_lossless_codecs_rebuild_every_client_mask_exactly(mode, name):
    rng = np.random.default_rng(0)
    thresholds = theta_to_thresholds(np.full(D, 0.9))
    counts, expected = BetaCounts(D), np.zeros(D, np.int64)
    for client in ("rpi4-a", "jetson-b", "coral-c"):
        theta_k = trained_theta(rng, np.full(D, 0.9))
        upload = client_update(thresholds, theta_k, ROUND_SEED, client, 1.0, get_codec(name), mode)
        own = sample_mask(theta_to_thresholds(theta_k), sample_seed(ROUND_SEED, client))
        packed, digest = rebuild_client_mask(decode(upload.payload, D), thresholds, ROUND_SEED, client, mode)
        assert digest == upload.reference_digest
        assert np.array_equal(unpack(packed), own)
        counts.add_packed(packed)
        expected += own
    assert np.array_equal(counts.ones, expected) and counts.masks == 3


def test_kappa_keeps_the_most_divergent_flips_and_the_server_applies_exactly_those():
    rng = np.random.default_rng(1)
    theta_g = np.full(D, 0.5)
    thresholds = theta_to_thresholds(theta_g)
    theta_k = trained_theta(rng, theta_g)
    upload = client_update(thresholds, theta_k, ROUND_SEED, "dev", 0.5, get_codec("exact"))
    assert upload.kept == -(-upload.delta // 2)
    flips = decode(upload.payload, D).flip_positions()
    divergence = np.abs(theta_k - 0.5)
    reference = sample_mask(thresholds, reference_seed(ROUND_SEED, "dev"))
    own = sample_mask(theta_to_thresholds(theta_k), sample_seed(ROUND_SEED, "dev"))
    dropped = np.setdiff1d(np.flatnonzero(reference != own), flips)
    assert divergence[flips].min() >= divergence[dropped].max() - 1e-6


def test_per_client_reference_needs_far_fewer_flips_than_the_shared_one():
    rng = np.random.default_rng(2)
    theta_g = np.full(D, 0.7)
    theta_k = trained_theta(rng, theta_g)
    thresholds = theta_to_thresholds(theta_g)
    per_client = client_update(thresholds, theta_k, ROUND_SEED, "d", 1.0, get_codec("bfuse8"), PER_CLIENT)
    shared = client_update(thresholds, theta_k, ROUND_SEED, "d", 1.0, get_codec("bfuse8"), SHARED)
    assert per_client.delta < shared.delta / 5
    assert len(per_client.payload) < len(shared.payload) / 3


def test_filter_false_flips_are_applied_and_counted_by_the_rebuild():
    rng = np.random.default_rng(3)
    thresholds = theta_to_thresholds(np.full(D, 0.95))
    theta_k = trained_theta(rng, np.full(D, 0.95))
    upload = client_update(thresholds, theta_k, ROUND_SEED, "dev", 1.0, get_codec("bfuse8"))
    packed, _ = rebuild_client_mask(decode(upload.payload, D), thresholds, ROUND_SEED, "dev")
    own = sample_mask(theta_to_thresholds(theta_k), sample_seed(ROUND_SEED, "dev"))
    false_flips = int((unpack(packed) != own).sum())
    assert 0 < false_flips < 4 * D / 256


def test_a_client_that_drew_another_reference_is_caught_by_the_digest():
    thresholds = theta_to_thresholds(np.full(D, 0.8))
    upload = client_update(thresholds, np.full(D, 0.8), ROUND_SEED, "dev", 1.0, get_codec("exact"))
    _, digest = rebuild_client_mask(decode(upload.payload, D), thresholds, ROUND_SEED + 1, "dev")
    assert digest != upload.reference_digest
    assert upload.reference_digest == mask_digest(sample_mask(thresholds, reference_seed(ROUND_SEED, "dev")))


def test_a_random_ranking_keeps_as_many_flips_as_kl_but_not_the_most_divergent():
    """The ablation of the KL ranking: the same top-kappa count, drawn in a seeded order."""
    rng = np.random.default_rng(3)
    thresholds = theta_to_thresholds(np.full(D, 0.9))
    theta_k = trained_theta(rng, np.full(D, 0.9))
    codec = get_codec("exact")
    kl = client_update(thresholds, theta_k, ROUND_SEED, "pi", 0.3, codec)
    rand = client_update(thresholds, theta_k, ROUND_SEED, "pi", 0.3, codec, ranking="random")
    again = client_update(thresholds, theta_k, ROUND_SEED, "pi", 0.3, codec, ranking="random")
    assert rand.kept == kl.kept and rand.delta == kl.delta and rand.payload == again.payload
    kept_kl, kept_rand = (decode(u.payload, D).flip_positions() for u in (kl, rand))
    assert not np.array_equal(kept_kl, kept_rand)
    divergence = np.abs(theta_k - 0.9)  # the KL grows with |theta_k - theta_g| here
    assert divergence[kept_kl].mean() > divergence[kept_rand].mean()
    with pytest.raises(ValueError, match="ranking"):
        client_update(thresholds, theta_k, ROUND_SEED, "pi", 0.3, codec, ranking="loudest")
