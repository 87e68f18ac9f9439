"""Every malformed payload raises PayloadError with a clear message, fast and in bounded memory."""
import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from deltamask import PayloadError
from deltamask.codecs import CODECS, decode, get_codec
from deltamask.codecs.base import pack_frame, read_frame

D = 100_000
POSITIONS = np.sort(np.random.default_rng(0).choice(D, 1000, replace=False))
# the round's theta the conditional codecs code against: undecided (0 < theta < 1) at a tenth of d, and at
# every position above
THETA = np.where(np.random.default_rng(1).random(D) < 0.1, 1 << 23, 0).astype(np.uint32)
THETA[POSITIONS] = 1 << 22


def payload_for(name):
    codec = get_codec(name)
    if codec.carries == "mask":
        mask = np.zeros(D, bool)
        mask[POSITIONS] = True
        return codec.encode(mask, D)
    if codec.carries == "weights":
        return codec.encode(np.random.default_rng(2).standard_normal(D).astype(np.float32), D)
    return codec.encode(POSITIONS, D, THETA)


def reframe(payload, body=None, header=None, codec_id=None, d=None, count=None):
    """Rebuild a payload with some parts replaced and a valid CRC (an adversary's payload)."""
    f = read_frame(payload)
    return pack_frame(f.codec_id if codec_id is None else codec_id, f.d if d is None else d,
                      f.count if count is None else count, f.header if header is None else header,
                      f.body if body is None else body)


@pytest.mark.parametrize("name", sorted(CODECS))
def test_truncated_payload(name):
    payload = payload_for(name)
    for cut in (0, 10, len(payload) // 2, len(payload) - 1):
        with pytest.raises(PayloadError):
            decode(payload[:cut], D, THETA)


@pytest.mark.parametrize("name", sorted(CODECS))
def test_garbled_payload_is_caught_anywhere(name):
    payload = payload_for(name)
    for at in range(0, len(payload), max(1, len(payload) // 40)):
        garbled = bytearray(payload)
        garbled[at] ^= 0x41
        with pytest.raises(PayloadError):
            decode(bytes(garbled), D, THETA)


@pytest.mark.parametrize("name", sorted(CODECS))
def test_wrong_d(name):
    with pytest.raises(PayloadError, match=f"d = {D}, expected d = {D + 1}"):
        decode(payload_for(name), D + 1, THETA)


def test_unknown_codec_id():
    with pytest.raises(PayloadError, match="unknown codec id 99"):
        decode(reframe(payload_for("exact"), codec_id=99), D)


def test_codec_id_of_another_codec():
    with pytest.raises(PayloadError, match="not bfuse8"):
        get_codec("bfuse8").decode(payload_for("exact"), D)


def test_not_a_payload_at_all():
    for junk in (b"", b"hello", bytes(64), "DMSK"):
        with pytest.raises(PayloadError):
            decode(junk, D)


def test_decompression_bomb_png_is_refused_before_reading_pixels():
    """A small file that declares a 100,000 x 100,000 image (10 GB of pixels)."""
    width = height = 100_000
    raw_row = b"\x00" + bytes(width)
    idat = zlib.compress(raw_row * 50, 9)  # only a few rows really present; the header claims 100k

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    started = time.process_time()
    with pytest.raises(PayloadError, match="PNG"):
        decode(reframe(payload_for("bfuse8"), body=bomb), D)
    assert time.process_time() - started < 5  # bounded: the pixels are never inflated


def test_png_of_the_wrong_size_is_refused():
    small = io.BytesIO()
    Image.new("L", (64, 4)).save(small, "PNG")
    with pytest.raises(PayloadError, match="64x4 pixels, expected"):
        decode(reframe(payload_for("bfuse8"), body=small.getvalue()), D)


def test_colour_png_is_refused():
    f = read_frame(payload_for("bfuse8"))
    seg_len, length = struct.unpack("<QIIIII", f.header)[2], struct.unpack("<QIIIII", f.header)[5]
    rgb = io.BytesIO()
    Image.new("RGB", (seg_len, length // seg_len)).save(rgb, "PNG")
    with pytest.raises(PayloadError, match="mode 'RGB'"):
        decode(reframe(payload_for("bfuse8"), body=rgb.getvalue()), D)


def test_sixteen_bit_codec_refuses_an_eight_bit_image():
    f16 = read_frame(payload_for("bfuse16"))
    seg_len, length = struct.unpack("<QIIIII", f16.header)[2], struct.unpack("<QIIIII", f16.header)[5]
    grey8 = io.BytesIO()
    Image.new("L", (seg_len, length // seg_len)).save(grey8, "PNG")
    with pytest.raises(PayloadError, match="16-bit"):
        decode(reframe(payload_for("bfuse16"), body=grey8.getvalue()), D)


def test_inconsistent_filter_header():
    f = read_frame(payload_for("bfuse8"))
    fields = list(struct.unpack("<QIIIII", f.header))
    fields[5] = 1 << 31  # ArrayLength: 2 GB of fingerprints for 1000 keys
    with pytest.raises(PayloadError, match="inconsistent"):
        decode(reframe(payload_for("bfuse8"), header=struct.pack("<QIIIII", *fields)), D)
    with pytest.raises(PayloadError, match="header is 3 bytes"):
        decode(reframe(payload_for("bfuse8"), header=b"abc"), D)
    with pytest.raises(PayloadError, match="block length"):
        decode(reframe(payload_for("xor8"), header=struct.pack("<QQ", 1, 1 << 40)), D)


def test_count_larger_than_d():
    with pytest.raises(PayloadError, match="declares"):
        decode(reframe(payload_for("exact"), count=D + 1), D)


def test_exact_position_list_beyond_d_or_with_wrong_count():
    other = get_codec("exact").encode(np.array([5, 2 * D - 1]), 2 * D)
    with pytest.raises(PayloadError, match=">= 100000"):
        decode(reframe(payload_for("exact"), body=read_frame(other).body, count=2), D)
    with pytest.raises(PayloadError, match="does not match"):
        decode(reframe(payload_for("exact"), count=999), D)


def test_rawmask_deflate_bomb_and_overlong_mask():
    bomb = zlib.compress(bytes(1 << 26), 9)  # 64 MiB of zeros in ~65 kB
    with pytest.raises(PayloadError, match="exactly"):
        decode(reframe(payload_for("rawmask"), body=bomb, count=0), D)
    with pytest.raises(PayloadError, match="garbled"):
        decode(reframe(payload_for("rawmask"), body=b"not deflate"), D)
    d = 13  # bits set past position d in the last byte
    bad = zlib.compress(np.packbits(np.ones(16, bool), bitorder="little").tobytes())
    with pytest.raises(PayloadError, match="past position d"):
        decode(pack_frame(6, d, 13, b"", bad), d)
