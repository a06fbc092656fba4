"""Per-block checksums and zero-block detection for blockd.

This module owns exactly one job: computing xxh64 (seed 0) of every 4 KiB
block in an in-memory buffer, bit-identical to ``xxhash.xxh64_intdigest``,
and detecting all-zero blocks in the same pass.  xxh64 is implemented here
from its public specification as Numba kernels; on AVX-512 (DQ+VL) hosts
the stripe loop runs on one <4 x i64> vector, elsewhere on 4 scalar lanes.

Rules for this module:

* No I/O of any kind (no files, sockets, logging on the hot path); callers
  hand in buffers and get numbers back.
* Every request-path kernel is ``njit(nogil=True, cache=True)`` and NOT
  parallel: Numba's threading layer aborts when parallel kernels are entered
  from several threads at once.  The only parallel kernel,
  :func:`hash_blocks_parallel`, is for single-threaded tools (scrub).
* All kernel arithmetic stays in uint64 (constants are ``np.uint64``), so
  Numba never promotes to float64; multiplication wraps mod 2**64.
* The xxhash package is a test/benchmark oracle only; it is not imported here.
"""

import os
import sys

from .jitcache import default_cache_dir as _default_cache_dir
from .jitcache import ensure as _ensure_cache_dir

_ensure_cache_dir()

import numba  # noqa: E402  (must come after NUMBA_CACHE_DIR is set)
import numpy as np  # noqa: E402
from llvmlite import ir  # noqa: E402
from llvmlite import binding as llvm  # noqa: E402
from numba import prange, types  # noqa: E402
from numba.extending import intrinsic  # noqa: E402

if not numba.config.CACHE_DIR:  # numba was imported before us
    numba.config.CACHE_DIR = os.environ["NUMBA_CACHE_DIR"]

if sys.byteorder != "little":  # lanes are read as native uint64
    raise ImportError("blockd.checksum requires a little-endian host")

__all__ = ["BLOCK_SIZE", "ZERO_BLOCK_HASH", "hash_blocks", "hash_blocks_zero",
           "verify_blocks", "count_equal", "hash_blocks_parallel", "warm"]

BLOCK_SIZE = 4096
_LANES = BLOCK_SIZE // 8  # uint64 lanes per block

# xxh64 primes (spec); every kernel constant is np.uint64 (no float promotion)
_P1, _P2, _P3, _P4 = (np.uint64(p) for p in (
    0x9E3779B185EBCA87, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9,
    0x85EBCA77C2B2AE63))
_INIT = (int(_P1) + int(_P2)) % 2**64, int(_P2), 0, -int(_P1) % 2**64
_V1, _V2, _V3, _V4 = (np.uint64(v) for v in _INIT)  # seed 0
_ZERO, _LEN = np.uint64(0), np.uint64(BLOCK_SIZE)
_S29, _S32, _S33 = np.uint64(29), np.uint64(32), np.uint64(33)


@numba.njit(inline="always")
def _rotl(x, r):
    return (x << np.uint64(r)) | (x >> np.uint64(64 - r))


@numba.njit(inline="always")
def _round(acc, lane):
    return _rotl(acc + lane * _P2, 31) * _P1


@numba.njit(inline="always")
def _merge(acc, v):
    acc = acc ^ _round(_ZERO, v)
    return acc * _P1 + _P4


@numba.njit(inline="always")
def _stripes_scalar(w, base):
    """Run the 4 accumulators over lanes w[base:base+512]; also OR of lanes."""
    v1, v2, v3, v4, z = _V1, _V2, _V3, _V4, _ZERO
    blk = w[base:base + _LANES]  # 0-based index below: no wraparound checks
    for i in range(0, _LANES, 4):
        a, b, c, d = blk[i], blk[i + 1], blk[i + 2], blk[i + 3]
        z |= (a | b) | (c | d)
        v1, v2 = _round(v1, a), _round(v2, b)
        v3, v4 = _round(v3, c), _round(v4, d)
    return v1, v2, v3, v4, z


@intrinsic
def _stripes_vec(typingctx, w, base):
    """Same as _stripes_scalar, as one <4 x i64> accumulator (AVX-512 DQ/VL:
    vpmullq + vprolq), emitted directly as LLVM IR."""
    rtype = types.UniTuple(types.uint64, 5)

    def codegen(context, builder, sig, args):
        i64, i32 = ir.IntType(64), ir.IntType(32)
        v4 = ir.VectorType(i64, 4)
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        ptr = builder.bitcast(builder.gep(data, [args[1]]), v4.as_pointer())
        entry = builder.basic_block
        loop, done = (builder.append_basic_block(n) for n in ("xxl", "xxd"))
        builder.branch(loop)
        builder.position_at_end(loop)
        idx, acc, z = builder.phi(i64), builder.phi(v4), builder.phi(v4)
        x = builder.load(builder.gep(ptr, [idx]), align=8)
        a = builder.add(acc, builder.mul(x, ir.Constant(v4, [int(_P2)] * 4)))
        a = builder.or_(builder.shl(a, ir.Constant(v4, [31] * 4)),
                        builder.lshr(a, ir.Constant(v4, [33] * 4)))
        acc2 = builder.mul(a, ir.Constant(v4, [int(_P1)] * 4))
        z2 = builder.or_(z, x)
        nxt = builder.add(idx, ir.Constant(i64, 1))
        for phi, init, new in ((idx, ir.Constant(i64, 0), nxt),
                               (acc, ir.Constant(v4, list(_INIT)), acc2),
                               (z, ir.Constant(v4, [0] * 4), z2)):
            phi.add_incoming(init, entry)
            phi.add_incoming(new, loop)
        stripes = ir.Constant(i64, _LANES // 4)
        builder.cbranch(builder.icmp_unsigned("<", nxt, stripes), loop, done)
        builder.position_at_end(done)
        vs = [builder.extract_element(acc2, ir.Constant(i32, j)) for j in range(4)]
        zs = [builder.extract_element(z2, ir.Constant(i32, j)) for j in range(4)]
        zor = builder.or_(builder.or_(zs[0], zs[1]), builder.or_(zs[2], zs[3]))
        return context.make_tuple(builder, rtype, vs + [zor])

    return rtype(w, types.int64), codegen


def _host_has_avx512():
    if numba.config.CPU_NAME not in (None, "host") or numba.config.CPU_FEATURES:
        return False  # compiling for another CPU: host features say nothing
    feats = llvm.get_host_cpu_features()
    return bool(feats.get("avx512dq") and feats.get("avx512vl"))


# Without AVX-512 a <4 x i64> multiply is emulated and slower than 4 imuls.
_stripes = _stripes_vec if _host_has_avx512() else _stripes_scalar


@numba.njit(inline="always")
def _finish(v1, v2, v3, v4):
    h = _rotl(v1, 1) + _rotl(v2, 7) + _rotl(v3, 12) + _rotl(v4, 18)
    h = _merge(_merge(_merge(_merge(h, v1), v2), v3), v4)
    h = h + _LEN  # block length; 4096 is a multiple of 32, so no tail
    h = (h ^ (h >> _S33)) * _P2
    h = (h ^ (h >> _S29)) * _P3
    return h ^ (h >> _S32)


@numba.njit(inline="always")
def _block(w, base):
    """(xxh64 of block at lane offset base, OR of its lanes)."""
    v1, v2, v3, v4, z = _stripes(w, base)
    return _finish(v1, v2, v3, v4), z


@numba.njit(inline="always")
def _lanes(data):
    """uint64 view of data (aligned) or an aligned copy (unaligned input)."""
    if data.ctypes.data & 7 == 0:
        return data.view(np.uint64)
    tmp = np.empty(data.shape[0] // 8, dtype=np.uint64)
    tmp.view(np.uint8)[:] = data
    return tmp


@numba.njit(nogil=True, cache=True)
def _hash_kernel(data, out, flags, want_flags):
    w = _lanes(data)
    nzero = 0
    for blk in range(out.shape[0]):
        h, z = _block(w, blk * _LANES)
        out[blk] = h
        isz = z == _ZERO
        nzero += isz
        if want_flags:
            flags[blk] = isz
    return nzero


@numba.njit(nogil=True, cache=True)
def _verify_kernel(data, expected):
    w = _lanes(data)
    bad = np.zeros(expected.shape[0], dtype=np.bool_)
    for blk in range(expected.shape[0]):
        h, _ = _block(w, blk * _LANES)
        bad[blk] = h != expected[blk]
    return np.flatnonzero(bad)


@numba.njit(inline="always")
def mismatches(data, expected):
    """Number of blocks whose xxh64 differs from expected (for use inside other kernels)."""
    w = _lanes(data)
    bad = 0
    for blk in range(expected.shape[0]):
        h, _ = _block(w, blk * _LANES)
        bad += h != expected[blk]
    return bad


@numba.njit(inline="always")
def equal_count(hashes, value):
    """Number of entries equal to value (for use inside other kernels)."""
    n = 0
    for i in range(hashes.shape[0]):
        n += hashes[i] == value
    return n


@numba.njit(nogil=True, cache=True)
def _count_equal_kernel(hashes, value):
    return equal_count(hashes, value)


@numba.njit(parallel=True, cache=True)
def _hash_parallel_kernel(data, out):
    w = _lanes(data)
    nzero = 0
    for blk in prange(out.shape[0]):
        h, z = _block(w, blk * _LANES)
        out[blk] = h
        nzero += z == _ZERO
    return nzero


# Twins that keep the GIL.  Releasing and re-taking the GIL costs more than
# hashing a few blocks (~0.25 us per 4 KiB), and with several nbdkit threads
# every release is a chance for a convoy; so buffers below NOGIL_MIN_BYTES
# are hashed holding it, and only big ones let other requests run meanwhile.
NOGIL_MIN_BYTES = 64 * 1024
_hash_kernel_gil = numba.njit(cache=True)(_hash_kernel.py_func)
_verify_kernel_gil = numba.njit(cache=True)(_verify_kernel.py_func)
_count_equal_gil = numba.njit(cache=True)(_count_equal_kernel.py_func)

_NOFLAGS = np.empty(0, dtype=np.uint8)
_MASK, _SHIFT = BLOCK_SIZE - 1, BLOCK_SIZE.bit_length() - 1


def _fail(n, nout):
    if n & _MASK:
        raise ValueError("length %d not a multiple of %d" % (n, BLOCK_SIZE))
    raise ValueError("%d output entries for %d blocks" % (nout, n >> _SHIFT))


def hash_blocks(data, out):
    """Fill out[i] with xxh64 of block i of data; return the zero-block count.

    data: 1-D contiguous uint8 array (e.g. ``np.frombuffer(buf, np.uint8)``)
    whose length is a multiple of BLOCK_SIZE.  out: 1-D uint64 array with one
    entry per block.  Zero detection is fused into the hashing pass.
    """
    n = len(data)
    if n & _MASK or len(out) << _SHIFT != n:
        _fail(n, len(out))
    if n < NOGIL_MIN_BYTES:
        return _hash_kernel_gil(data, out, _NOFLAGS, False)
    return _hash_kernel(data, out, _NOFLAGS, False)


def hash_blocks_zero(data, out, zero_flags):
    """Like hash_blocks, and set zero_flags[i] = 1 iff block i is all zero."""
    n = len(data)
    if n & _MASK or len(out) << _SHIFT != n or len(zero_flags) != len(out):
        _fail(n, min(len(out), len(zero_flags)))
    if n < NOGIL_MIN_BYTES:
        return _hash_kernel_gil(data, out, zero_flags, True)
    return _hash_kernel(data, out, zero_flags, True)


def verify_blocks(data, expected):
    """Return an int64 array of block indexes whose xxh64 != expected[i]."""
    n = len(data)
    if n & _MASK or len(expected) << _SHIFT != n:
        _fail(n, len(expected))
    if n < NOGIL_MIN_BYTES:
        return _verify_kernel_gil(data, expected)
    return _verify_kernel(data, expected)


def count_equal(hashes, value):
    """Number of entries of the uint64 array hashes equal to value."""
    # At most one chunk's sums (1024 entries): not worth releasing the GIL.
    return _count_equal_gil(hashes, np.uint64(value))  # keep it uint64


def hash_blocks_parallel(data, out):
    """Same contract as hash_blocks, but multi-threaded (prange over blocks).

    ONLY for single-threaded tools such as scrub.  Never call it on the
    request path or from more than one Python thread at a time: Numba's
    threading layer aborts when parallel kernels are entered concurrently.
    """
    n = len(data)
    if n & _MASK or len(out) << _SHIFT != n:
        _fail(n, len(out))
    return _hash_parallel_kernel(data, out)


def warm():
    """Call every kernel once (writable and read-only array variants, e.g. the
    store's shared read-only zero sums) so the on-disk JIT cache is populated."""
    for nblocks in (2, NOGIL_MIN_BYTES // BLOCK_SIZE):  # the GIL and the nogil twins
        data, out = np.zeros(nblocks * BLOCK_SIZE, np.uint8), np.empty(nblocks, np.uint64)
        ro_data, ro_out = data.copy(), out.copy()
        ro_data.setflags(write=False)
        ro_out.setflags(write=False)
        for d in (data, ro_data):
            hash_blocks(d, out)
            hash_blocks_zero(d, out, np.empty(nblocks, np.uint8))
            hash_blocks_parallel(d, out)
            for sums in (out, ro_out):
                verify_blocks(d, sums)
                count_equal(sums, 0)
                _count_equal_kernel(sums, np.uint64(0))


_z = np.empty(1, np.uint64)
hash_blocks(np.zeros(BLOCK_SIZE, np.uint8), _z)
ZERO_BLOCK_HASH = int(_z[0])  # xxh64 of 4096 zero bytes
del _z
