"""Deterministic interleavings of concurrent requests (found by review), each forced with a hook."""

import errno
import threading

import pytest

from blockd.errors import BlockdError
from enginekit import Rig

CHUNK = 64 * 1024


def fresh(tmp_path, kind="os"):
    rig = Rig(tmp_path / "data", kind=kind, chunk_size=CHUNK)
    rig.create("v", 1 << 20)
    return rig, rig.open("v")


def read(vol, offset, length):
    buf = bytearray(length)
    vol.read(buf, offset)
    return bytes(buf)


def test_trim_elsewhere_in_the_chunk_cannot_unlink_it_under_a_write(tmp_path):
    """Write W has written its data; a trim of another block of the same chunk runs before W's checksums."""
    rig, vol = fresh(tmp_path)
    store = vol.store
    original = store.unpin
    fired = []

    def unpin_then_trim(chunk_index):
        original(chunk_index)
        if not fired and threading.current_thread().name == "W":
            fired.append(True)
            vol.trim(4096, 4096)  # block 1 of the same chunk: no range overlap

    store.unpin = unpin_then_trim
    w = threading.Thread(target=vol.write, args=(b"\x07" * 4096, 0), name="W")
    w.start()
    w.join()
    store.unpin = original
    assert fired
    assert store.exists(0)
    assert read(vol, 0, 4096) == b"\x07" * 4096
    assert vol.scrub() == []
    rig.close()


def flush_stuck_in(files, method):
    """Start a flush (thread "F1") that blocks inside ``files.<method>``; returns (thread, release)."""
    gate, entered = threading.Event(), threading.Event()
    original = getattr(files, method)

    def stuck(arg):
        if threading.current_thread().name == "F1" and not entered.is_set():
            entered.set()
            gate.wait()
        return original(arg)

    setattr(files, method, stuck)
    return entered, gate


def race(vol, files, method, second):
    """Run ``second`` while a flush is stuck in ``files.<method>``; the crash image when it returned."""
    entered, gate = flush_stuck_in(files, method)
    f1 = threading.Thread(target=vol.flush, name="F1")
    f1.start()
    entered.wait()
    images = []
    t = threading.Thread(target=lambda: (second(), images.append(files.cut())))
    t.start()
    t.join(0.3)
    still_waiting = t.is_alive()
    gate.set()
    f1.join()
    t.join()
    return still_waiting, images[0]


def test_a_second_flush_waits_for_the_first(tmp_path):
    """Two connections flush at once: the one that finds nothing dirty must not return early."""
    rig, vol = fresh(tmp_path, kind="fault")
    vol.write(b"\x05" * 4096, 0)
    still_waiting, image = race(vol, rig.files, "fdatasync", vol.flush)
    assert still_waiting, "the second flush returned while the first was still syncing"
    rig.crash(image=image)  # power cut the instant the second flush returned
    assert read(rig.open("v"), 0, 4096) == b"\x05" * 4096
    rig.close()


def test_fua_waits_for_a_directory_fsync_in_progress(tmp_path):
    rig, vol = fresh(tmp_path, kind="fault")
    vol.write(b"\x09" * 4096, 2 * CHUNK)  # creates chunk 2: the directory is dirty
    _, image = race(vol, rig.files, "fsync_dir", lambda: vol.write(b"\x0a" * 4096, 2 * CHUNK + 4096, fua=True))
    rig.crash(image=image)  # power cut the instant the FUA write was acknowledged
    assert read(rig.open("v"), 2 * CHUNK + 4096, 4096) == b"\x0a" * 4096
    rig.close()


def test_failed_punch_leaves_checksums_matching_the_data(tmp_path):
    rig, vol = fresh(tmp_path)
    vol.write(b"\x03" * CHUNK, 0)
    vol.flush()
    store = vol.store
    store.pin(0)  # e.g. a concurrent flush holding the chunk: it cannot be dropped
    original = store.punch

    def bad_punch(*args):
        raise OSError(errno.EIO, "injected EIO")

    store.punch = bad_punch
    with pytest.raises(BlockdError):
        vol.trim(0, CHUNK)
    store.punch = original
    store.unpin(0)
    assert read(vol, 0, CHUNK) == b"\x03" * CHUNK  # no false alarm: the data is still there
    assert vol.scrub() == []
    rig.close()


def test_a_primary_fenced_between_opens_role_check_and_its_lock_is_not_opened(tmp_path):
    """Review finding: serve's start-up epoch check fences the copy (the row becomes a replica) after
    open() read the row as a primary but before it took the volume lock; the fence found nothing open
    to retire.  Before, the open went on and served the superseded copy writable."""
    rig = Rig(tmp_path / "data", chunk_size=CHUNK)
    rig.create("v", 1 << 20)
    catalog = rig.engine.catalog
    original = catalog.find_volume

    def read_then_fenced(name):
        row = original(name)
        assert catalog.adopt_epoch(row["id"], row["epoch"] + 1)  # what engine.fence does first
        return row

    catalog.find_volume = read_then_fenced
    with pytest.raises(BlockdError, match=r"holds a replica of it"):
        rig.engine.open("v")
    catalog.find_volume = original
    assert rig.engine.export_names() == []  # nothing left open or exported
