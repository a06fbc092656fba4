"""Invariants 1 and 2 under a simulated power cut (tests/faultfs.py).

A random workload runs against the engine over the fault-injecting layer;
at a random point the power is cut (everything not covered by a completed
fdatasync/fsync is discarded, optionally tearing unsynced pages at 4 KiB),
and the engine restarts on what is left.  Then:

1. every byte acknowledged by a completed flush or a FUA write, and not
   overwritten since, reads back intact;
2. no read fails a checksum (no false alarm), and scrub is clean.
"""

import random

import numpy as np
import pytest

from enginekit import Rig

KiB = 1024
CHUNK = 64 * KiB
SIZE = 1024 * KiB


def run_workload(vol, rng, steps, must, valid):
    """Apply random ops; keep ``must``/``valid``: bytes that must survive a crash."""
    current = bytearray(must)
    for _ in range(steps):
        op = rng.random()
        offset = rng.randrange(SIZE)
        length = rng.randrange(1, min(SIZE - offset, 2 * CHUNK + 5000) + 1)
        fua = rng.random() < 0.2
        if op < 0.6:
            data = bytes(length) if rng.random() < 0.1 else rng.randbytes(length)
            vol.write(data, offset, fua=fua)
            current[offset : offset + length] = data
            if fua:
                must[offset : offset + length] = data
                valid[offset : offset + length] = True
            else:
                valid[offset : offset + length] = False
        elif op < 0.7:
            vol.zero(offset, length, fua=fua)
            current[offset : offset + length] = bytes(length)
            if fua:
                must[offset : offset + length] = bytes(length)
                valid[offset : offset + length] = True
            else:
                valid[offset : offset + length] = False
        elif op < 0.78:
            first = (offset + 4095) // 4096 * 4096
            last = (offset + length) // 4096 * 4096
            vol.trim(offset, length, fua=fua)
            if last > first:
                current[first:last] = bytes(last - first)
                valid[first:last] = False  # trim promises nothing about durability of contents
        else:
            vol.flush()
            must[:] = current
            valid[:] = True
    return current


@pytest.mark.parametrize("tear", [False, True], ids=["clean-cut", "torn-pages"])
@pytest.mark.parametrize("seed", range(12))
def test_power_cut_keeps_acknowledged_data_and_raises_no_false_alarm(tmp_path, seed, tear):
    rng = random.Random(seed * 1000 + tear)
    rig = Rig(tmp_path / "data", kind="fault", chunk_size=CHUNK, seed=seed)
    rig.create("v", SIZE)
    must = bytearray(SIZE)
    valid = np.ones(SIZE, dtype=bool)
    for cycle in range(3):
        vol = rig.open("v")
        run_workload(vol, rng, rng.randrange(5, 60), must, valid)
        rig.crash(tear=tear)
        vol = rig.open("v")
        got = bytearray(SIZE)
        vol.read(got, 0)  # invariant 2: raises ChecksumError on a false alarm
        got_arr = np.frombuffer(bytes(got), dtype=np.uint8)
        must_arr = np.frombuffer(bytes(must), dtype=np.uint8)
        lost = np.flatnonzero((got_arr != must_arr) & valid)
        assert lost.size == 0, f"cycle {cycle}: acknowledged bytes lost at offsets {lost[:10].tolist()}"
        assert vol.scrub() == []
        # What survived is now the floor for the next cycle.
        must[:] = got
        valid[:] = True
        rig.engine.release(vol)
    rig.close()


def test_unflushed_chunk_creation_does_not_survive_without_dir_sync(tmp_path):
    """The model itself: a created-but-never-synced chunk file vanishes at the cut."""
    rig = Rig(tmp_path / "data", kind="fault", chunk_size=CHUNK)
    rig.create("v", SIZE)
    vol = rig.open("v")
    vol.write(b"\x55" * 4096, 0)
    rig.crash()
    vol = rig.open("v")
    buf = bytearray(4096)
    vol.read(buf, 0)
    assert bytes(buf) == bytes(4096)  # lost, as it was never flushed: and no checksum error
    vol.write(b"\x66" * 4096, 0, fua=True)
    rig.crash()
    vol = rig.open("v")
    vol.read(buf, 0)
    assert bytes(buf) == b"\x66" * 4096  # FUA made it durable, directory entry included


@pytest.mark.parametrize("seed", range(10))
def test_power_cut_during_concurrent_writes_and_flushes_raises_no_false_alarm(tmp_path, seed):
    """Writes in flight while a flush runs must stay covered by the intent log."""
    import threading

    rig = Rig(tmp_path / "data", kind="fault", chunk_size=CHUNK, seed=seed)
    rig.create("v", SIZE)
    vol = rig.open("v")
    rig.files.jitter = 0.0005
    stop = threading.Event()
    errors = []

    def writer(n):
        rng = random.Random(seed * 100 + n)
        try:
            while not stop.is_set():
                offset = rng.randrange(0, SIZE - 3 * 4096)
                vol.write(rng.randbytes(rng.choice([4096, 8192, 5000])), offset)
        except Exception as exc:  # reported below
            errors.append(exc)

    def flusher():
        try:
            while not stop.is_set():
                vol.flush()
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(3)] + [threading.Thread(target=flusher)]
    for t in threads:
        t.start()
    deadline = rig.files.syncs + 150
    while rig.files.syncs < deadline and not errors:
        stop.wait(0.01)
    # Cut the power while everything is still running: pages written back
    # (torn at random) and synced state as of this instant.
    image = rig.files.cut(tear=True)
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors
    rig.crash(image=image)
    vol = rig.open("v")
    got = bytearray(SIZE)
    vol.read(got, 0)  # a false alarm raises ChecksumError
    assert vol.scrub() == []
    rig.close()


@pytest.mark.parametrize("seed", range(4))
def test_power_cut_with_a_tiny_checksum_cache(tmp_path, seed, monkeypatch):
    """Evicting clean chunks' checksums (reloaded from disk) keeps invariants 1 and 2."""
    import blockd.store

    monkeypatch.setattr(blockd.store, "MAX_CACHED_SUMS", 2)
    test_power_cut_keeps_acknowledged_data_and_raises_no_false_alarm(tmp_path, 100 + seed, True)
