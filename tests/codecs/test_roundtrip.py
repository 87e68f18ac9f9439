import io

import numpy as np
import png as pypng  # an independent PNG reader (pure Python), not Pillow
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deltamask.codecs import CODECS, FLIPS, decode, get_codec
from deltamask.codecs.base import read_frame

FLIP_CODECS = [name for name, c in CODECS.items() if c.carries == FLIPS and not c.conditional]  # conditional:
# tests/codecs/test_conditional.py
FILTERS = ["bfuse8", "bfuse16", "xor8", "xor16"]


@st.composite
def position_sets(draw, max_d=5000):
    d = draw(st.integers(1, max_d))
    positions = draw(st.lists(st.integers(0, d - 1), max_size=min(d, 600), unique=True))
    return d, np.array(sorted(positions), dtype=np.int64)


@pytest.mark.parametrize("name", FLIP_CODECS)
@given(case=position_sets())
@settings(max_examples=40, deadline=None)
def test_flip_codecs_round_trip_with_no_false_negatives(name, case):
    d, positions = case
    codec = get_codec(name)
    update = decode(codec.encode(positions, d), d)
    flipped = update.flip_positions()
    assert np.isin(positions, flipped).all()
    if codec.false_positive_rate == 0:
        assert np.array_equal(flipped, positions)
    reference = np.zeros(d, dtype=bool)
    assert np.array_equal(np.flatnonzero(update.client_mask(reference)), flipped)


@given(st.lists(st.booleans(), min_size=1, max_size=3000))
@settings(max_examples=60, deadline=None)
def test_rawmask_round_trips_and_ignores_the_reference(bits):
    mask = np.array(bits)
    codec = get_codec("rawmask")
    update = decode(codec.encode(mask, len(mask)), len(mask))
    assert np.array_equal(update.client_mask(~mask), mask)
    start = len(mask) // 3
    assert np.array_equal(update.client_mask(np.zeros(len(mask) - start, bool), start), mask[start:])


@pytest.mark.parametrize("name", FLIP_CODECS)
def test_client_mask_by_slices_equals_client_mask_whole(name):
    d = 70_001
    rng = np.random.default_rng(5)
    positions = np.sort(rng.choice(d, 700, replace=False))
    reference = rng.random(d) < 0.9
    update = get_codec(name).decode(get_codec(name).encode(positions, d), d)
    whole = update.client_mask(reference)
    pieces = np.concatenate([update.client_mask(reference[lo:lo + 9_999], lo) for lo in range(0, d, 9_999)])
    assert np.array_equal(whole, pieces)


@pytest.mark.parametrize("name", FILTERS)
def test_filter_payload_image_is_grayscale_for_any_png_reader(name):
    d = 200_000
    positions = np.sort(np.random.default_rng(2).choice(d, 2000, replace=False))
    codec = get_codec(name)
    body = read_frame(codec.encode(positions, d)).body
    width, height, rows, info = pypng.Reader(bytes=body).read()
    assert info["greyscale"] and not info["alpha"] and info["bitdepth"] == codec.bits
    assert len(list(rows)) == height > 0
    from PIL import Image
    assert Image.open(io.BytesIO(body)).mode in ("L", "I;16")


@pytest.mark.parametrize("name", FILTERS)
def test_filter_false_flip_rate_matches_fingerprint_width(name):
    d = 2_000_000
    positions = np.sort(np.random.default_rng(8).choice(d, 20_000, replace=False))
    codec = get_codec(name)
    flipped = codec.decode(codec.encode(positions, d), d).flip_positions()
    rate = (len(flipped) - len(positions)) / (d - len(positions))
    expected = codec.false_positive_rate
    assert 0.7 * expected - 2e-6 <= rate <= 1.3 * expected + 4e-6


def test_encoding_is_deterministic():
    d = 50_000
    positions = np.arange(0, d, 37)
    for name in FLIP_CODECS:
        assert get_codec(name).encode(positions, d) == get_codec(name).encode(positions.copy(), d)


def test_unsorted_and_duplicate_positions_are_normalised():
    d = 1000
    codec = get_codec("exact")
    assert codec.encode([5, 3, 3, 900], d) == codec.encode([3, 5, 900], d)


@pytest.mark.parametrize("name", FLIP_CODECS)
def test_encode_refuses_positions_outside_d(name):
    with pytest.raises(ValueError, match=r"\[0, 100\)"):
        get_codec(name).encode([1, 100], 100)
    with pytest.raises(ValueError, match="integer"):
        get_codec(name).encode(np.array([0.5]), 100)


def test_unknown_codec_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="bfuse8"):
        get_codec("cuckoo")
