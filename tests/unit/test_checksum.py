"""blockd.checksum against the xxhash C library (the oracle)."""

import os
import threading

import numba
import numpy as np
import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockd import checksum as cs
from conftest import run_in_threads

BS = cs.BLOCK_SIZE
SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
# byte offsets inside a block: first/last byte, 8-byte lane and 32-byte
# stripe boundaries, the middle
POSITIONS = sorted({0, 1, 7, 8, 9, 15, 16, 23, 24, 31, 32, 33, 63, 64, 2047,
                    2048, 4056, 4063, 4064, 4071, 4072, 4080, 4087, 4088,
                    4095})


def oracle(data):
    return [xxhash.xxh64_intdigest(data[i:i + BS]) for i in range(0, len(data), BS)]


def zero_mask(data):
    return [not data[i:i + BS].any() for i in range(0, len(data), BS)]


def random_buf(nblocks, seed):
    return np.random.default_rng(seed).integers(0, 256, nblocks * BS, np.uint8)


def run_all(data):
    """hash_blocks, hash_blocks_zero and the parallel kernel must agree."""
    n = len(data) // BS
    out, out2, out3 = (np.full(n, 12345, np.uint64) for _ in range(3))
    flags = np.full(n, 7, np.uint8)
    nz = cs.hash_blocks(data, out)
    assert cs.hash_blocks_zero(data, out2, flags) == nz
    assert cs.hash_blocks_parallel(data, out3) == nz
    assert out.tolist() == out2.tolist() == out3.tolist()
    return out.tolist(), nz, flags.tolist()


def check(data):
    hashes, nz, flags = run_all(data)
    assert hashes == oracle(data)
    mask = zero_mask(data)
    assert nz == sum(mask)
    assert flags == [int(m) for m in mask]


def test_zero_block_hash():
    assert isinstance(cs.ZERO_BLOCK_HASH, int)
    assert cs.ZERO_BLOCK_HASH == xxhash.xxh64_intdigest(bytes(BS))


@SETTINGS
@given(st.integers(1, 64), st.integers(0, 2**32 - 1), st.data())
def test_random_buffers(nblocks, seed, draw):
    data = random_buf(nblocks, seed)
    for b in draw.draw(st.sets(st.integers(0, nblocks - 1))):
        data[b * BS:(b + 1) * BS] = 0
    check(data)


@pytest.mark.parametrize("nblocks", [1, 2, 17, 64])
def test_all_zero(nblocks):
    data = np.zeros(nblocks * BS, np.uint8)
    hashes, nz, flags = run_all(data)
    assert hashes == [cs.ZERO_BLOCK_HASH] * nblocks
    assert nz == nblocks and flags == [1] * nblocks


def test_all_ff():
    data = np.full(3 * BS, 0xFF, np.uint8)
    check(data)
    assert run_all(data)[1] == 0


@pytest.mark.parametrize("pos", POSITIONS)
@pytest.mark.parametrize("value", [0x01, 0x80, 0xFF])
def test_single_nonzero_byte(pos, value):
    data = np.zeros(3 * BS, np.uint8)
    data[BS + pos] = value  # middle block only
    hashes, nz, flags = run_all(data)
    assert hashes == oracle(data)
    assert hashes[1] != cs.ZERO_BLOCK_HASH
    assert nz == 2 and flags == [1, 0, 1]


def test_zero_detection_each_lane():
    """A block with one non-zero byte anywhere is never reported as zero."""
    data = np.zeros(BS * BS, np.uint8)  # block i has byte i set
    data[np.arange(BS) * BS + np.arange(BS)] = 0x40
    hashes, nz, flags = run_all(data)
    assert nz == 0 and not any(flags)
    assert hashes == oracle(data)


@SETTINGS
@given(st.integers(1, 64), st.integers(0, 2**32 - 1), st.data())
def test_verify_reports_exactly_flipped_blocks(nblocks, seed, draw):
    data = random_buf(nblocks, seed)
    expected = np.array(oracle(data), np.uint64)
    assert cs.verify_blocks(data, expected).tolist() == []
    bits = draw.draw(st.lists(st.integers(0, nblocks * BS * 8 - 1),
                              min_size=1, max_size=8, unique=True))
    for bit in bits:
        data[bit // 8] ^= np.uint8(1 << (bit % 8))
    bad = cs.verify_blocks(data, expected)
    assert bad.dtype == np.int64
    assert bad.tolist() == sorted({bit // (BS * 8) for bit in bits})


def test_verify_detects_wrong_expected():
    data = random_buf(8, 1)
    expected = np.array(oracle(data), np.uint64)
    expected[[0, 5, 7]] ^= np.uint64(1 << 63)
    assert cs.verify_blocks(data, expected).tolist() == [0, 5, 7]


@SETTINGS
@given(st.lists(st.sampled_from([0, 1, 2**63, 2**64 - 1, cs.ZERO_BLOCK_HASH]),
                max_size=200),
       st.sampled_from([0, 1, 2**63, 2**64 - 1, cs.ZERO_BLOCK_HASH]))
def test_count_equal(values, value):
    hashes = np.array(values, np.uint64)
    want = values.count(value)
    assert cs.count_equal(hashes, value) == want
    assert cs.count_equal(hashes, np.uint64(value)) == want


@pytest.mark.parametrize("n", [1, 4095, 4097, 2 * BS - 1, 2 * BS + 8])
def test_length_not_multiple_raises(n):
    data = np.zeros(n, np.uint8)
    out = np.zeros(max(1, n // BS), np.uint64)
    for call in (lambda: cs.hash_blocks(data, out),
                 lambda: cs.hash_blocks_zero(data, out, np.zeros(len(out), np.uint8)),
                 lambda: cs.verify_blocks(data, out),
                 lambda: cs.hash_blocks_parallel(data, out)):
        with pytest.raises(ValueError):
            call()


def test_wrong_output_length_raises():
    data = np.zeros(4 * BS, np.uint8)
    with pytest.raises(ValueError):
        cs.hash_blocks(data, np.zeros(3, np.uint64))
    with pytest.raises(ValueError):
        cs.hash_blocks_zero(data, np.zeros(4, np.uint64), np.zeros(5, np.uint8))
    with pytest.raises(ValueError):
        cs.verify_blocks(data, np.zeros(5, np.uint64))


def test_empty_buffer():
    assert cs.hash_blocks(np.zeros(0, np.uint8), np.zeros(0, np.uint64)) == 0
    assert cs.verify_blocks(np.zeros(0, np.uint8), np.zeros(0, np.uint64)).size == 0


def test_frombuffer_views_unaligned_and_readonly():
    raw = random_buf(5, 9).tobytes()
    want = oracle(np.frombuffer(raw, np.uint8))
    buf = bytearray(b"\0" + raw)  # writable; offset 1 is unaligned for uint64
    views = [np.frombuffer(memoryview(buf)[1:], dtype=np.uint8),
             np.frombuffer(bytearray(raw), dtype=np.uint8),
             np.frombuffer(raw, dtype=np.uint8)]  # read-only
    for data in views:
        assert run_all(data)[0] == want
        assert cs.verify_blocks(data, np.array(want, np.uint64)).size == 0


def test_scalar_fallback_path():
    """The portable path used on hosts without AVX-512 must match too."""
    @numba.njit
    def scalar(data, out, flags):
        w = data.view(np.uint64)
        for b in range(out.shape[0]):
            v1, v2, v3, v4, z = cs._stripes_scalar(w, b * cs._LANES)
            out[b] = cs._finish(v1, v2, v3, v4)
            flags[b] = z == 0
    data = random_buf(len(POSITIONS) + 2, 3)
    data[:BS] = 0
    for i, pos in enumerate(POSITIONS):  # one non-zero byte per block
        data[(i + 1) * BS:(i + 2) * BS] = 0
        data[(i + 1) * BS + pos] = 1
    out, flags = np.zeros(len(data) // BS, np.uint64), np.zeros(len(data) // BS, np.uint8)
    scalar(data, out, flags)
    assert out.tolist() == oracle(data)
    assert flags.tolist() == [int(m) for m in zero_mask(data)]


def test_concurrent_threads():
    bufs = [random_buf(256, 100 + i) for i in range(4)]
    for i, b in enumerate(bufs):
        b[i * BS:(i + 1) * BS] = 0  # thread i sees exactly one zero block
    wants = [oracle(b) for b in bufs]
    errors, barrier = [], threading.Barrier(4)

    def worker(i):
        out = np.zeros(256, np.uint64)
        barrier.wait()
        for _ in range(30):
            out[:] = 0
            if cs.hash_blocks(bufs[i], out) != 1 or out.tolist() != wants[i]:
                errors.append(i)
            if cs.verify_blocks(bufs[i], out).size:
                errors.append(i)

    assert run_in_threads(worker, [(i,) for i in range(4)]) == []
    assert errors == []


def test_kernel_options():
    for k in (cs._hash_kernel, cs._verify_kernel, cs._count_equal_kernel):
        assert k.targetoptions.get("nogil") is True
        assert not k.targetoptions.get("parallel")
        assert k._cache.__class__.__name__ != "NullCache"
    for k in (cs._hash_kernel_gil, cs._verify_kernel_gil, cs._count_equal_gil):
        assert not k.targetoptions.get("nogil") and not k.targetoptions.get("parallel")
    assert cs._hash_parallel_kernel.targetoptions.get("parallel")
    assert "single-threaded" in cs.hash_blocks_parallel.__doc__


def test_cache_dir(monkeypatch, tmp_path):
    pkg = os.path.dirname(os.path.abspath(cs.__file__))
    assert not os.path.abspath(numba.config.CACHE_DIR).startswith(pkg)
    monkeypatch.setenv("BLOCKD_CACHE_DIR", str(tmp_path / "b"))
    assert cs._default_cache_dir() == str(tmp_path / "b" / "numba")
    monkeypatch.delenv("BLOCKD_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cs._default_cache_dir() == str(tmp_path / "x" / "blockd" / "numba")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert cs._default_cache_dir() == str(tmp_path / "h" / ".cache" / "blockd" / "numba")
    assert os.path.isdir(tmp_path / "h" / ".cache" / "blockd" / "numba")


def test_warm_covers_readonly_variants():
    cs.warm()
    assert len(cs._verify_kernel.signatures) >= 4  # (rw|ro data) x (rw|ro sums)
    assert len(cs._count_equal_kernel.signatures) >= 2
    ro = np.zeros(2, np.uint64)
    ro.setflags(write=False)
    assert cs.count_equal(ro, 0) == 2


@pytest.mark.parametrize("nblocks", [cs.NOGIL_MIN_BYTES // BS - 1, cs.NOGIL_MIN_BYTES // BS, cs.NOGIL_MIN_BYTES // BS + 1])
def test_gil_and_nogil_twins_agree_at_the_threshold(nblocks):
    data = np.frombuffer(np.random.default_rng(nblocks).bytes(nblocks * BS), dtype=np.uint8)
    out = np.empty(nblocks, np.uint64)
    cs.hash_blocks(data, out)
    assert [int(x) for x in out] == [xxhash.xxh64_intdigest(data[i * BS : (i + 1) * BS].tobytes()) for i in range(nblocks)]
    twin = np.empty(nblocks, np.uint64)
    cs._hash_kernel_gil(data, twin, cs._NOFLAGS, False)
    assert (twin == out).all()
    assert cs.verify_blocks(data, out).size == 0
