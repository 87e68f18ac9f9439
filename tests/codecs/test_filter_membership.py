"""The NumPy membership test must agree bit for bit with the C library's *_contain."""
import numpy as np
import pytest
from pyfusefilter._xorfilter import ffi, lib

from deltamask.codecs import get_codec, kernel

KINDS = {"bfuse8": "binary_fuse8", "bfuse16": "binary_fuse16", "xor8": "xor8", "xor16": "xor16"}


def c_filter(kind, keys):
    filt = ffi.new(f"{kind}_t *")
    assert getattr(lib, f"{kind}_allocate")(len(keys), filt)
    if kind.startswith("xor"):  # as the codec does: xor*_allocate leaves the array uninitialised
        nbytes = 3 * filt.blockLength * (2 if kind.endswith("16") else 1)
        ffi.memmove(filt.fingerprints, bytes(nbytes), nbytes)
    populate = getattr(lib, f"{kind}_buffered_populate" if kind.startswith("xor") else f"{kind}_populate")
    assert populate(ffi.from_buffer("uint64_t[]", keys.astype(np.uint64).copy()), len(keys), filt)
    return filt


@pytest.fixture(params=["numpy", "compiled"])
def membership_path(request, monkeypatch):
    """Run a test once through the NumPy path and once through the optional compiled kernel."""
    if request.param == "numpy":
        monkeypatch.setattr(kernel, "load", lambda: None)
    elif kernel.load() is None:
        pytest.skip("no C compiler here: the compiled kernel is unavailable")
    return request.param


@pytest.mark.parametrize("name", sorted(KINDS))
@pytest.mark.parametrize("n", [1, 7, 1000, 60_000])
def test_decode_matches_c_library_on_random_keys(name, n, membership_path):
    kind = KINDS[name]
    d = 3_000_000
    rng = np.random.default_rng(n)
    keys = np.sort(rng.choice(d, n, replace=False))
    codec = get_codec(name)
    update = codec.decode(codec.encode(keys, d), d)
    filt = c_filter(kind, keys)
    try:
        contain = getattr(lib, f"{kind}_contain")
        queries = np.concatenate([keys[:2000], rng.integers(0, d, 20_000), np.arange(0, 3000)])
        ours = np.concatenate([update.flips(int(q), int(q) + 1) for q in queries])
        theirs = np.array([contain(int(q), filt) for q in queries])
        assert np.array_equal(ours, theirs)
        # a contiguous range through the chunked path as well
        lo = int(rng.integers(0, d - 50_000))
        theirs_range = np.array([contain(q, filt) for q in range(lo, lo + 50_000)])
        assert np.array_equal(update.flips(lo, lo + 50_000), theirs_range)
    finally:
        getattr(lib, f"{kind}_free")(filt)


def test_kernel_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("DELTAMASK_KERNEL", "numpy")
    monkeypatch.setattr(kernel, "_loaded", False)
    assert kernel.load() is None
