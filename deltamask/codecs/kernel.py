"""An optional compiled membership kernel (~3 ns a position), built with cffi on first use.

The NumPy path in `filters` is the reference and the fallback: this module compiles a few lines of C
the first time it is asked (into DELTAMASK_CACHE, default ~/.cache/deltamask; needs a C compiler and
the Python headers, ~2 s) and returns None whenever that is impossible. DELTAMASK_KERNEL=numpy turns
it off. Tests check it against the NumPy path and the C library position by position.
"""
import hashlib
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)

CDEF = """
void bfuse8_member(uint64_t start, uint64_t n, uint64_t seed, uint32_t seg_len, uint32_t seg_count_len,
                   const uint8_t *fp, uint8_t *out);
void bfuse16_member(uint64_t start, uint64_t n, uint64_t seed, uint32_t seg_len, uint32_t seg_count_len,
                    const uint16_t *fp, uint8_t *out);
void xor8_member(uint64_t start, uint64_t n, uint64_t seed, uint32_t block, const uint8_t *fp, uint8_t *out);
void xor16_member(uint64_t start, uint64_t n, uint64_t seed, uint32_t block, const uint16_t *fp, uint8_t *out);
"""

SOURCE = r"""
#include <stdint.h>
static inline uint64_t murmur64(uint64_t h) {
  h ^= h >> 33; h *= 0xff51afd7ed558ccdULL; h ^= h >> 33; h *= 0xc4ceb9fe1a85ec53ULL; h ^= h >> 33;
  return h;
}
static inline uint64_t mulhi32(uint64_t h, uint64_t c) {  /* c < 2^32 */
  return ((h >> 32) * c + (((h & 0xffffffffULL) * c) >> 32)) >> 32;
}
#define BFUSE(NAME, T)                                                                        \
void NAME(uint64_t start, uint64_t n, uint64_t seed, uint32_t seg_len, uint32_t seg_count_len, \
          const T *fp, uint8_t *out) {                                                        \
  uint64_t mask = seg_len - 1;                                                                \
  for (uint64_t i = 0; i < n; i++) {                                                          \
    uint64_t h = murmur64(start + i + seed);                                                  \
    T f = (T)(h ^ (h >> 32));                                                                 \
    uint64_t h0 = mulhi32(h, seg_count_len);                                                  \
    uint64_t h1 = (h0 + seg_len) ^ ((h >> 18) & mask);                                        \
    uint64_t h2 = (h0 + 2 * (uint64_t)seg_len) ^ (h & mask);                                  \
    out[i] = (T)(f ^ fp[h0] ^ fp[h1] ^ fp[h2]) == 0;                                          \
  }                                                                                           \
}
#define XOR(NAME, T)                                                                          \
void NAME(uint64_t start, uint64_t n, uint64_t seed, uint32_t block, const T *fp, uint8_t *out) { \
  for (uint64_t i = 0; i < n; i++) {                                                          \
    uint64_t h = murmur64(start + i + seed);                                                  \
    T f = (T)(h ^ (h >> 32));                                                                 \
    uint32_t r0 = (uint32_t)h, r1 = (uint32_t)((h << 21) | (h >> 43)),                        \
             r2 = (uint32_t)((h << 42) | (h >> 22));                                          \
    uint64_t h0 = ((uint64_t)r0 * block) >> 32, h1 = (((uint64_t)r1 * block) >> 32) + block,  \
             h2 = (((uint64_t)r2 * block) >> 32) + 2 * (uint64_t)block;                       \
    out[i] = (T)(f ^ fp[h0] ^ fp[h1] ^ fp[h2]) == 0;                                          \
  }                                                                                           \
}
BFUSE(bfuse8_member, uint8_t)
BFUSE(bfuse16_member, uint16_t)
XOR(xor8_member, uint8_t)
XOR(xor16_member, uint16_t)
"""

_loaded: Any = False  # False: not tried yet; None: unavailable


def load() -> Optional[Any]:
    """The compiled module (with `.ffi` and `.lib`), or None when it cannot be had."""
    global _loaded
    if _loaded is False:
        _loaded = None if os.environ.get("DELTAMASK_KERNEL", "").lower() == "numpy" else _build()
    return _loaded


def _build() -> Optional[Any]:
    tag = hashlib.sha256((CDEF + SOURCE + sys.version).encode()).hexdigest()[:12]
    name = f"_deltamask_kernel_{tag}"
    cache = Path(os.environ.get("DELTAMASK_CACHE", Path.home() / ".cache" / "deltamask"))
    try:
        found = sorted(cache.glob(f"{name}*.so")) + sorted(cache.glob(f"{name}*.pyd"))
        if not found:
            from cffi import FFI
            cache.mkdir(parents=True, exist_ok=True)
            builder = FFI()
            builder.cdef(CDEF)
            builder.set_source(name, SOURCE, extra_compile_args=["-O3"])
            workdir = tempfile.mkdtemp(dir=str(cache))  # concurrent first uses must not share files
            try:
                built = Path(builder.compile(tmpdir=workdir, verbose=False))
                found = [cache / built.name]
                os.replace(str(built), str(found[0]))  # atomic: a reader sees no half-written file
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
            log.info("compiled the membership kernel into %s", found[0])
        spec = importlib.util.spec_from_file_location(name, found[0])
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    except Exception as exc:  # no compiler, no headers, read-only home: the NumPy path serves
        log.info("membership kernel unavailable (%s); using the NumPy path", exc)
        return None
