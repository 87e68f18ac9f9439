"""Chunked blobs: offsets, resumption, length and digest checks."""
import pytest

from deltamask.errors import PayloadError
from deltamask.transfer import Assembler, sha256_hex, split


def test_split_covers_the_blob_from_any_offset():
    data = bytes(range(256)) * 5
    assert b"".join(p for _, p in split(data, 0, 100)) == data
    pieces = list(split(data, 250, 100))
    assert pieces[0][0] == 250 and b"".join(p for _, p in pieces) == data[250:]
    assert list(split(data, len(data))) == [(len(data), b"")]
    with pytest.raises(PayloadError):
        list(split(data, len(data) + 1))


def test_assembler_checks_order_length_and_digest():
    data = b"x" * 1000
    parts = Assembler(len(data), sha256_hex(data), limit=4096)
    for offset, piece in split(data, 0, 300):
        parts.add(offset, piece)
    assert parts.result() == data
    with pytest.raises(PayloadError, match="expected 0"):
        Assembler(10, sha256_hex(b"0" * 10), 100).add(5, b"12345")
    short = Assembler(10, sha256_hex(b"0" * 10), 100)
    short.add(0, b"00000")
    with pytest.raises(PayloadError, match="ended at 5 of 10"):
        short.result()
    wrong = Assembler(3, sha256_hex(b"abc"), 100)
    wrong.add(0, b"abd")
    with pytest.raises(PayloadError, match="SHA-256"):
        wrong.result()
    with pytest.raises(OverflowError):
        Assembler(101, "", 100)
    over = Assembler(3, sha256_hex(b"abc"), 100)
    with pytest.raises(OverflowError):
        over.add(0, b"abcd")
