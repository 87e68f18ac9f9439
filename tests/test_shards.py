"""Sharded decode + aggregation: the process pool and Ray give the single-process counts bit for bit."""
import numpy as np
import pytest

from deltamask import BetaCounts, client_update, get_codec, rebuild_client_mask
from deltamask.codecs import decode
from deltamask.sampling import DIGEST_CHUNK, theta_to_thresholds
from deltamask.shards import ProcessPool, RayPool, RoundContext, Serial, aggregate, plan_shards

D = 2 * DIGEST_CHUNK + 12_345  # three leaves, the last one short
SEED = 0xC0FFEE


@pytest.fixture(scope="module")
def round_():
    rng = np.random.default_rng(5)
    theta = np.where(rng.random(D) < 0.9, rng.choice([0.0, 1.0], D), rng.random(D))  # mostly decided
    thresholds = theta_to_thresholds(theta)
    uploads, digests = [], {}
    for k, codec in enumerate(["exact-cond", "bfuse8", "exact", "bfuse8-cond", "rawmask", "xor8"]):
        name = f"dev-{k}"
        theta_k = np.clip(theta + rng.normal(0, 0.2, D), 0, 1)
        up = client_update(thresholds, theta_k, SEED, name, 0.9, get_codec(codec))
        uploads.append((name, up.payload))
        digests[name] = up.reference_digest
    return RoundContext(thresholds, SEED), uploads, digests


def serial_counts(ctx, uploads):
    """The path the coordinator takes upload by upload: rebuild, then add the packed mask."""
    counts = BetaCounts(ctx.d)
    for name, payload in uploads:
        packed, _ = rebuild_client_mask(decode(payload, ctx.d, ctx.thresholds), ctx.thresholds, ctx.seed, name)
        counts.add_packed(packed)
    return counts.ones


def test_shards_cover_every_position_of_every_upload_once(round_):
    ctx, uploads, _ = round_
    for workers in (1, 2, 7):
        shards = plan_shards(uploads, D, workers, max_range=DIGEST_CHUNK)
        cover = {}
        for s in shards:
            assert s.lo % DIGEST_CHUNK == 0 and s.hi - s.lo <= DIGEST_CHUNK
            for name, _ in s.uploads:
                cover.setdefault(name, []).append((s.lo, s.hi))
        assert {n: sorted(r) for n, r in cover.items()} == {
            n: [(0, DIGEST_CHUNK), (DIGEST_CHUNK, 2 * DIGEST_CHUNK), (2 * DIGEST_CHUNK, D)] for n, _ in uploads}
    assert len(plan_shards(uploads, D, 2)) >= 4  # every worker gets work
    with pytest.raises(ValueError, match="multiple"):
        plan_shards(uploads, D, 2, max_range=1000)


def test_serial_shards_equal_the_upload_by_upload_rebuild_and_digests(round_):
    ctx, uploads, digests = round_
    result = aggregate(ctx, uploads, Serial(), expected=digests, max_range=DIGEST_CHUNK)
    assert result.accepted == [n for n, _ in uploads] and not result.errors
    assert result.digests == digests
    np.testing.assert_array_equal(result.ones, serial_counts(ctx, uploads))
    assert all(result.applied[n] > 0 for n, _ in uploads)


def test_bad_payload_and_wrong_digest_are_refused_and_left_out(round_):
    ctx, uploads, digests = round_
    garbled = [(n, p if n != "dev-1" else p[:-1] + bytes([p[-1] ^ 1])) for n, p in uploads]
    wrong = dict(digests, **{"dev-2": "0" * 64})
    result = aggregate(ctx, garbled, Serial(), expected=wrong, max_range=DIGEST_CHUNK)
    assert set(result.errors) == {"dev-1", "dev-2"}
    assert "CRC" in result.errors["dev-1"] and "digest" in result.errors["dev-2"]
    kept = [(n, p) for n, p in uploads if n not in ("dev-1", "dev-2")]
    assert result.accepted == [n for n, _ in kept]
    np.testing.assert_array_equal(result.ones, serial_counts(ctx, kept))


@pytest.mark.parametrize("executor", ["process", "ray"])
def test_process_pool_and_ray_equal_serial(round_, executor):
    if executor == "ray":
        pytest.importorskip("ray", reason="Ray is installed by `make test` (the ray extra)")
    ctx, uploads, digests = round_
    pool = ProcessPool(2) if executor == "process" else RayPool(2)
    try:
        result = aggregate(ctx, uploads, pool, expected=digests, max_range=DIGEST_CHUNK)
    finally:
        pool.close()
    np.testing.assert_array_equal(result.ones, serial_counts(ctx, uploads))
    assert result.digests == digests and not result.errors
