"""The engine contract: the same tests over the real filesystem and the fault-injecting layer."""

import os
import random

import numpy as np
import pytest

from blockd import checksum
from blockd.errors import ChecksumError, OutOfRange, VolumeFailed
from conftest import run_in_threads
from enginekit import Rig

KiB = 1024
MiB = 1024 * KiB
CHUNK = 64 * KiB


@pytest.fixture(params=["os", "fault"])
def rig(request, tmp_path):
    r = Rig(tmp_path / "data", kind=request.param, chunk_size=CHUNK)
    yield r
    try:
        r.close()
    except Exception:
        pass


def read(vol, offset, length):
    buf = bytearray(length)
    vol.read(buf, offset)
    return bytes(buf)


def test_never_written_reads_zero_without_files(rig):
    rig.create("v", 1 << 40)
    vol = rig.open("v")
    assert read(vol, (1 << 40) - 8192, 8192) == bytes(8192)
    assert read(vol, 12345, 100) == bytes(100)
    assert not os.path.exists(rig.datadir.volume_path(1))  # nothing on disk until a write


def test_random_io_matches_a_model(rig):
    size = 2 * MiB
    rig.create("v", size)
    vol = rig.open("v")
    model = bytearray(size)
    rng = random.Random(1)
    for step in range(400):
        op = rng.random()
        offset = rng.randrange(size)
        length = rng.randrange(1, min(size - offset, 3 * CHUNK) + 1)
        if op < 0.55:
            kind = rng.random()
            data = bytes(length) if kind < 0.15 else rng.randbytes(length)
            vol.write(data, offset, fua=rng.random() < 0.1)
            model[offset : offset + length] = data
        elif op < 0.65:
            vol.zero(offset, length)
            model[offset : offset + length] = bytes(length)
        elif op < 0.75:
            vol.trim(offset, length)
            first = (offset + 4095) // 4096 * 4096
            last = (offset + length) // 4096 * 4096
            if last > first:
                model[first:last] = bytes(last - first)
        elif op < 0.8:
            vol.flush()
        else:
            assert read(vol, offset, length) == bytes(model[offset : offset + length]), step
    assert read(vol, 0, size) == bytes(model)
    rig.restart()
    vol = rig.open("v")
    assert read(vol, 0, size) == bytes(model)
    assert vol.scrub() == []


def test_all_zero_blocks_become_holes_and_empty_chunks_vanish(rig):
    rig.create("v", 4 * CHUNK)
    vol = rig.open("v")
    vol.write(os.urandom(2 * CHUNK), 0)
    assert vol.store.chunk_indexes() == [0, 1]
    vol.write(bytes(CHUNK), CHUNK)  # zeros: the chunk file goes away
    assert vol.store.chunk_indexes() == [0]
    vol.trim(0, CHUNK)
    assert vol.store.chunk_indexes() == []
    assert read(vol, 0, 2 * CHUNK) == bytes(2 * CHUNK)
    assert vol.extents(0, 4 * CHUNK) == [(0, 4 * CHUNK, 3)]


def test_extents_distinguish_data_and_holes(rig):
    rig.create("v", 4 * CHUNK)
    vol = rig.open("v")
    vol.write(b"\1" * 8192, CHUNK + 4096)
    assert vol.extents(0, 4 * CHUNK) == [(0, CHUNK + 4096, 3), (CHUNK + 4096, 8192, 0), (CHUNK + 12288, 3 * CHUNK - 12288, 3)]
    assert vol.extents(CHUNK + 5000, 10, req_one=True) == [(CHUNK + 5000, 10, 0)]


def test_out_of_range_is_refused(rig):
    rig.create("v", CHUNK)
    vol = rig.open("v")
    with pytest.raises(OutOfRange):
        vol.write(b"x", CHUNK)
    with pytest.raises(OutOfRange):
        read(vol, CHUNK - 1, 2)


def test_bit_flip_is_detected_on_read_and_scrub(rig, tmp_path):
    rig.create("v", 4 * CHUNK)
    vol = rig.open("v")
    data = os.urandom(2 * CHUNK)
    vol.write(data, 0)
    vol.flush()
    path = os.path.join(rig.datadir.volume_path(1), "0000000000000001.chunk")
    with open(path, "r+b") as f:
        f.seek(3 * 4096 + 100)
        byte = f.read(1)
        f.seek(3 * 4096 + 100)
        f.write(bytes([byte[0] ^ 0x10]))
    rig.restart()
    vol = rig.open("v")
    bad = CHUNK + 3 * 4096
    with pytest.raises(ChecksumError) as info:
        read(vol, bad + 10, 512)
    assert info.value.offsets == (bad,)
    assert read(vol, 0, CHUNK) == data[:CHUNK]  # other blocks still fine
    assert read(vol, bad + 4096, 4096) == data[bad + 4096 : bad + 8192]
    assert vol.scrub() == [bad]
    with pytest.raises(ChecksumError):
        vol.write(b"y", bad + 5)  # a partial write must not launder a corrupt block


def test_failed_fdatasync_fails_the_volume(tmp_path):
    rig = Rig(tmp_path / "data", kind="fault", chunk_size=CHUNK)
    rig.create("v", 4 * CHUNK)
    vol = rig.open("v")
    vol.write(b"a" * 4096, 0)
    vol.flush()
    vol.write(b"b" * 4096, 4096)
    rig.files.fail_fdatasync = True
    with pytest.raises(VolumeFailed):
        vol.flush()
    rig.files.fail_fdatasync = False  # a later success must not be trusted
    with pytest.raises(VolumeFailed):
        vol.write(b"c" * 4096, 8192)
    with pytest.raises(VolumeFailed):
        vol.flush()
    assert read(vol, 0, 4096) == b"a" * 4096  # reads continue


def test_a_flush_whose_replicas_are_not_settled_keeps_its_chunks_in_the_intent_log(rig):
    """``ChunkStore.flush(settled)``: replication's hook; until every peer's answer (or recorded miss)
    is in, the chunks stay in the intent log (a crash then hands them to every peer's resync)."""
    rig.create("v", 4 * CHUNK)
    vol = rig.open("v")
    vol.write(b"a" * 4096, 0)
    vol.write(b"b" * 4096, 2 * CHUNK)
    calls = []
    vol.store.flush(lambda: calls.append(1) or False)
    assert calls == [1] and vol.store.intent.chunks == {0, 2}
    vol.store.flush(lambda: True)  # the next flush, settled: cleared
    assert vol.store.intent.chunks == set()
    vol.write(b"c" * 4096, CHUNK)
    with pytest.raises(RuntimeError):
        vol.store.flush(lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    assert vol.store.intent.chunks == {1} and not vol.store.failed
    vol.store.flush()
    assert vol.store.intent.chunks == set() and read(vol, CHUNK, 4096) == b"c" * 4096


def test_concurrent_overlapping_writers_leave_consistent_blocks(rig):
    rig.create("v", 8 * CHUNK)
    vol = rig.open("v")

    def writer(seed):
        rng = random.Random(seed)
        for _ in range(200):
            offset = rng.randrange(0, 8 * CHUNK - 20000)
            vol.write(bytes([seed]) * rng.randrange(1, 20000), offset)

    assert not run_in_threads(writer, [(s,) for s in range(1, 5)])
    read(vol, 0, 8 * CHUNK)  # every block verifies
    assert vol.scrub() == []
    vol.flush()
    rig.restart()
    assert rig.open("v").scrub() == []


def test_write_intent_log_recovery_recomputes_checksums(tmp_path):
    """Crash with the page cache intact (kill -9): dirty chunks are re-hashed, no false alarm."""
    rig = Rig(tmp_path / "data", kind="os", chunk_size=CHUNK)
    rig.create("v", 4 * CHUNK)
    vol = rig.open("v")
    vol.write(os.urandom(CHUNK), 0)
    vol.flush()
    data = os.urandom(CHUNK)
    vol.write(data, 0)  # checksums for this are only in memory
    rig.crash()  # like kill -9: page cache intact, nothing flushed
    vol = rig.open("v")
    assert vol.store.recovered_chunks == 1
    assert read(vol, 0, CHUNK) == data
    assert vol.scrub() == []
    # Listed in the intent log until the next flush (a replicated primary records them for its
    # peers first), then forgotten.
    assert vol.store.intent.chunks == {0}
    vol.flush()
    assert vol.store.intent.chunks == set()


def test_descriptor_cap_closes_dirty_chunks_and_flush_still_syncs_them(rig, monkeypatch):
    import blockd.store

    monkeypatch.setattr(blockd.store, "MAX_OPEN_CHUNKS", 4)
    rig.create("v", 64 * CHUNK)
    vol = rig.open("v")
    blocks = {c: os.urandom(4096) for c in range(0, 64, 2)}
    for c, data in blocks.items():
        vol.write(data, c * CHUNK + 4096)
    assert len(vol.store._fds) <= 4
    vol.flush()
    rig.crash()
    vol = rig.open("v")
    for c, data in blocks.items():
        assert read(vol, c * CHUNK + 4096, 4096) == data
    assert vol.scrub() == []


def test_sparse_checksums_cost_one_page_per_lonely_block(tmp_path):
    rig = Rig(tmp_path / "data", kind="os", chunk_size=4 * MiB)
    rig.create("v", 1 << 40)
    vol = rig.open("v")
    for c in range(0, 200):
        vol.write(os.urandom(4096), c * 997 * 4 * MiB)
    vol.flush()
    sums = os.path.join(rig.datadir.volume_path(1), "checksums")
    assert os.stat(sums).st_blocks * 512 <= 200 * 4096 + 64 * 1024  # + filesystem extent blocks
    rig.restart()
    assert rig.open("v").scrub() == []


def test_reattach_while_the_last_connection_is_closing(tmp_path):
    """A new connection arriving while the previous one is flushing must wait, not fail."""
    rig = Rig(tmp_path / "data", kind="os", chunk_size=CHUNK)
    rig.create("v", 16 * CHUNK)

    def cycle(seed):
        for i in range(30):
            vol = rig.engine.open("v")
            vol.write(bytes([seed]) * 4096, (seed * 30 + i) * 4096 % (16 * CHUNK))
            rig.engine.release(vol)

    assert run_in_threads(cycle, [(s,) for s in range(4)]) == []
    rig.close()


def test_lock_free_read_path_falls_back_when_it_cannot_decide(rig):
    """The fast path never returns unverified data: corrupt, uncached or racing reads take the locked path."""
    from blockd import fastio

    rig.create("v", 4 * CHUNK)
    vol = rig.open("v")
    data = os.urandom(CHUNK)
    vol.write(data, 0)
    fd, sums = vol.store.peek(0)
    arr = np.empty(4096, np.uint8)
    assert fastio.read_verify(fd, arr, 4096, sums[1:2]) == fastio.OK
    assert arr.tobytes() == data[4096:8192]
    wrong = sums[1:2] ^ np.uint64(1)
    assert fastio.read_verify(fd, arr, 4096, wrong) == fastio.MISMATCH
    assert fastio.read_verify(987654, arr, 4096, sums[1:2]) == fastio.NOT_CACHED  # a closed descriptor
    zeros = np.full(1, checksum.ZERO_BLOCK_HASH, np.uint64)
    arr[:] = 7
    assert fastio.read_verify(fd, arr, 4096, zeros) == fastio.OK and not arr.any()  # a hole: no I/O
    # Through the volume: a corrupted sum makes the fast path decline, the locked path raise.
    vol.store._sums[0][2] ^= np.uint64(1)
    with pytest.raises(ChecksumError):
        read(vol, 2 * 4096, 4096)


def test_checksum_cache_is_bounded_and_reloads_from_disk(rig, monkeypatch):
    import blockd.store

    monkeypatch.setattr(blockd.store, "MAX_CACHED_SUMS", 3)
    rig.create("v", 32 * CHUNK)
    vol = rig.open("v")
    model = bytearray(32 * CHUNK)
    rng = random.Random(5)
    for step in range(300):
        offset = rng.randrange(0, 32 * CHUNK - 9000)
        data = rng.randbytes(rng.randrange(1, 9000))
        vol.write(data, offset)
        model[offset : offset + len(data)] = data
        if step % 7 == 0:
            vol.flush()  # clean chunks become evictable
        if step % 5 == 0:
            o = rng.randrange(0, 32 * CHUNK - 20000)
            assert read(vol, o, 20000) == bytes(model[o : o + 20000])
    vol.flush()
    assert read(vol, 0, 32 * CHUNK) == bytes(model)
    assert len(vol.store._sums) <= 3 + 1
    assert vol.scrub() == []
    rig.crash()
    vol = rig.open("v")
    assert read(vol, 0, 32 * CHUNK) == bytes(model)


def test_block_status_of_a_huge_sparse_volume_stays_cheap(rig):
    """Scanning holes must not grow per-chunk state (a 16 TiB volume has 4M chunks)."""
    rig.create("v", 16 << 40)
    vol = rig.open("v")
    vol.write(b"x" * 4096, 5 << 40)
    offset = 0
    for _ in range(3):
        runs = vol.extents(offset, (16 << 40) - offset)
        offset = runs[-1][0] + runs[-1][1]
    assert len(vol.store._sums) <= 1
    assert vol.extents(5 << 40, 4096) == [(5 << 40, 4096, 0)]
