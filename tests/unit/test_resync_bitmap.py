"""Replication's failure paths on the primary: a disk that cannot take a peer's resync bitmap (full,
failing), a local write failing after the replica applied it, a corrupt edge block, overlapping
flushes, what an out-of-sync peer never flushed, an error in the link thread.  Nothing may be
acknowledged as if a miss were on record, and the copies must converge.  Two engines in one process,
each on its own data dir and real SQLite catalog, joined by a real ZeroMQ link and sink (plaintext,
loopback); the only fake parts are ENOSPC from chosen files (this sandbox has no small filesystem to
fill) and, in one test, an exception injected into the link thread."""

import errno
import glob
import os
import time

import numpy as np
import pytest

from blockd.errors import ChecksumError, NoSpace, VolumeFailed
from blockd.fileio import OsFiles
from blockd.intent import IntentLog
from blockd.replication import Manager, Settings, Sink
from conftest import free_port, run_in_threads
from enginekit import Rig

CHUNK = 64 * 1024


class BitmapFullFiles(OsFiles):
    """The real filesystem, except that once ``full`` is set a write to a resync bitmap fails ENOSPC,
    and once ``chunks_full`` is set, a write to a chunk file."""

    def __init__(self):
        self.full = False
        self.chunks_full = False
        self._bitmaps = set()  # fds of resync bitmaps
        self._chunks = set()  # fds of chunk files

    def open(self, path, create=False, size=None):
        fd = super().open(path, create, size)
        self._bitmaps.discard(fd)
        self._chunks.discard(fd)
        if os.sep + "resync" + os.sep in path:
            self._bitmaps.add(fd)
        elif path.endswith(".chunk"):
            self._chunks.add(fd)
        return fd

    def pwrite(self, fd, buf, offset):
        if (self.full and fd in self._bitmaps) or (self.chunks_full and fd in self._chunks):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().pwrite(fd, buf, offset)


class PrimaryRig(Rig):
    def _files(self):
        return BitmapFullFiles()


def _wait_for(what, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


@pytest.fixture(params=[1])
def pair(tmp_path, request):
    replica = Rig(tmp_path / "b")
    address = f"tcp://127.0.0.1:{free_port()}"
    settings = Settings(insecure=True, ack_timeout=0.5, write_timeout=2.0, heartbeat=30.0)
    sink = Sink(replica.engine, address, None, settings, []).start()
    primary = PrimaryRig(tmp_path / "a")
    assert os.sep + "resync" + os.sep in primary.datadir.resync_path(1, "b")  # what BitmapFullFiles spots
    primary.engine.catalog.add_peer("b", address, None)
    primary.engine.catalog.create_volume("v", 1 << 20, replicas=["b"], min_copies=request.param)
    managers = []

    def start_primary():
        manager = Manager(primary.engine, None, settings)
        primary.engine.replication = manager
        managers.append(manager)
        return primary.engine.open("v")

    yield primary, sink, start_primary
    for manager in managers:
        for link in manager.links().values():
            link.stop()
    sink.stop()


def _written_in_sync(start_primary):
    """Open the volume, write a block and flush (the replica confirmed the epoch and has it): the
    volume, its replication and peer b's state."""
    volume = start_primary()
    volume.write(np.full(4096, 1, np.uint8), 0)
    volume.flush()
    return volume, volume.replication, volume.replication.peers["b"]


def test_a_miss_that_cannot_be_recorded_fails_the_volume_instead_of_being_acknowledged(pair):
    primary, sink, start_primary = pair
    volume = start_primary()
    peer = volume.replication.peers["b"]
    volume.write(np.full(4096, 1, np.uint8), 0)  # waits until the replica confirms the epoch
    volume.flush()
    assert peer.state.counts and not peer.pending_chunks()

    sink.stop()  # the replica is gone ...
    primary.files.full = True  # ... and its resync bitmap cannot grow
    with pytest.raises(VolumeFailed, match="resync bitmap for peer b"):
        volume.write(np.full(4096, 2, np.uint8), 3 * CHUNK)  # min-copies 1 would have acknowledged it
    assert 3 in peer.pending_chunks()  # this process still resyncs it when the peer returns

    sent = peer.link.sent
    with pytest.raises(VolumeFailed, match="writes refused"):  # from now on, before any peer gets it
        volume.write(np.full(4096, 3, np.uint8), 5 * CHUNK)
    assert peer.link.sent == sent
    with pytest.raises(VolumeFailed):
        volume.flush()
    out = bytearray(4096)
    volume.read(memoryview(out), 5 * CHUNK)
    assert out == bytes(4096)  # the refused write changed nothing
    volume.read(memoryview(out), 0)
    assert out == b"\x01" * 4096  # reads still work

    # Room again: the next record also writes what could not be recorded before.
    primary.files.full = False
    peer.record({4})
    again = IntentLog(OsFiles(), primary.datadir.resync_path(volume.volume_id, "b"))
    assert {3, 4} <= again.load()

    # Power cut, and the disk still full at the next start: opening fails, and the write-intent log,
    # which no flush cleared, still holds chunk 3 for the open after that.
    primary.crash()
    primary.files.full = True
    os.truncate(primary.datadir.resync_path(volume.volume_id, "b"), 0)  # lost: only the intent log is left
    with pytest.raises(OSError):
        start_primary()
    primary.files.full = False
    volume = start_primary()
    assert 3 in volume.replication.peers["b"].pending_chunks()
    assert 3 in volume.store.intent.chunks  # until the next flush, with the bitmap durable first


@pytest.mark.parametrize("pair", [2], indirect=True)
def test_a_write_that_fails_here_after_the_replica_applied_it_is_resynced_from_here(pair):
    """ENOSPC on this node's data after the replica applied the write: the client gets the error, and
    the replica, which holds what this copy never wrote, is resynced from this copy."""
    primary, sink, start_primary = pair
    volume = start_primary()
    volume.write(np.full(4096, 1, np.uint8), 0)
    volume.flush()
    peer = volume.replication.peers["b"]
    failures = peer.link.failures
    primary.files.chunks_full = True
    with pytest.raises(NoSpace):
        volume.write(np.full(8192, 7, np.uint8), 0)
    primary.files.chunks_full = False
    _wait_for(lambda: peer.state.counts and not peer.pending_chunks())  # out of sync, then resynced
    out = bytearray(4096)
    volume.read(memoryview(out), 0)
    assert out == b"\x01" * 4096
    assert volume.replication.verify() == {"b": []}
    assert peer.link.failures == failures  # resynced over the link it has: not reset (other volumes use it)


@pytest.mark.parametrize("pair", [2], indirect=True)
def test_a_zero_whose_edge_block_is_corrupt_here_fails_before_anything_is_sent(pair):
    primary, sink, start_primary = pair
    volume = start_primary()
    volume.write(np.full(4096, 5, np.uint8), 0)
    volume.flush()
    (chunk,) = glob.glob(os.path.join(primary.datadir.volume_path(volume.volume_id), "*.chunk"))
    fd = os.open(chunk, os.O_RDWR)
    try:
        os.pwrite(fd, b"\x06", 100)  # a flipped byte in the block the zero's edge reads
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    peer = volume.replication.peers["b"]
    sent = peer.link.sent
    with pytest.raises(ChecksumError):
        volume.zero(1000, 100)  # a partial block: read, merged, rewritten
    assert peer.link.sent == sent and peer.state.counts  # the replica was not touched


@pytest.mark.parametrize("pair", [2], indirect=True)
def test_overlapping_flushes_do_not_wait_for_each_other(pair):
    """Many connections flushing at once: each flush waits for its peers' answers to what came before,
    never for another flush's (which waits for the flush lock): none leaves its batch behind."""
    primary, sink, start_primary = pair
    volume = start_primary()
    volume.write(np.full(4096, 1, np.uint8), 0)  # confirmed

    def writer(n):
        for i in range(15):
            volume.write(np.full(4096, n * 16 + i, np.uint8), ((n * 15 + i) % 16) * CHUNK)
            volume.flush()

    assert run_in_threads(writer, [(n,) for n in range(4)]) == []
    assert volume.store.deferred_flushes == 0
    volume.flush()
    assert volume.store.intent.chunks == set()
    assert volume.replication.verify() == {"b": []}


@pytest.mark.parametrize("pair", [2], indirect=True)
def test_what_an_out_of_sync_peer_acknowledged_but_never_flushed_is_recorded_at_the_next_request(pair):
    """A peer can be out of sync while this open still remembers chunks it acknowledged and never
    flushed (its resync stopped, say): the next request, a flush included, records them for it before
    the flush can make the intent log forget them."""
    primary, sink, start_primary = pair
    volume = start_primary()
    volume.write(np.full(4096, 1, np.uint8), 0)
    volume.flush()
    peer = volume.replication.peers["b"]
    volume.write(np.full(4096, 2, np.uint8), 6 * CHUNK)  # acknowledged there, not flushed
    assert peer.unflushed == {6}
    with volume.replication._cond:
        peer.state.on("missed")  # out of sync with nothing recorded: what a stopped resync left
    with pytest.raises(VolumeFailed, match="copies"):  # 1 of the 2 it needs, after --write-timeout
        volume.flush()  # (nothing starts a resync meanwhile: the bitmap below is what the flush left)
    assert 6 in IntentLog(OsFiles(), primary.datadir.resync_path(volume.volume_id, "b")).load()
    assert not peer.unflushed


@pytest.mark.parametrize("pair", [2], indirect=True)
def test_an_error_in_the_link_thread_fails_its_requests_and_the_link_reconnects(pair):
    """A bug in the link thread must not end it: every volume on that peer waits for its callbacks."""
    primary, sink, start_primary = pair
    volume = start_primary()
    volume.write(np.full(4096, 1, np.uint8), 0)
    link = volume.replication.peers["b"].link
    real, raised = link.next_seq, []

    def broken():
        if not raised:
            raised.append(1)
            raise RuntimeError("injected")
        return real()

    link.next_seq = broken  # the next heartbeat probe raises, on the link thread
    link.reset("test: reconnect")  # (a request thread's reset: the link thread fails and reconnects)
    _wait_for(lambda: raised and link.up)
    volume.write(np.full(4096, 2, np.uint8), CHUNK)  # min-copies 2: the replica answers again
    volume.flush()
    assert volume.replication.verify() == {"b": []}


def test_a_late_miss_through_a_closed_open_keeps_what_the_next_open_recorded(pair):
    """An answer can come after its volume's last connection closed and the volume was opened again:
    its miss is recorded through the old open's peer state.  Both opens write one bitmap file, so they
    must share one bitmap object: two, each appending at its own idea of the file's end, overwrote each
    other's records (a chunk the peer missed was then never resynced)."""
    primary, sink, start_primary = pair
    volume = start_primary()
    volume.write(np.full(4096, 1, np.uint8), 0)
    volume.flush()
    old = volume.replication.peers["b"]
    old.record([5])  # a miss and its resync in this open: the bitmap file now has two records
    old.forget([5])
    primary.engine.release(volume)  # the last connection closes ...

    volume = primary.engine.open("v")  # ... and another opens it
    new = volume.replication.peers["b"]
    sink.stop()
    volume.write(np.full(4096, 2, np.uint8), 3 * CHUNK)  # min-copies 1: acknowledged; 3 recorded for b
    _wait_for(lambda: 3 in new.pending_chunks())  # at its ack deadline
    old.record([9])  # the closed open's late miss
    on_disk = IntentLog(OsFiles(), primary.datadir.resync_path(volume.volume_id, "b")).load()
    assert {3, 9} <= on_disk
    assert {3, 9} <= set(new.pending_chunks())  # this open resyncs the late miss too


def test_a_deleted_volumes_bitmaps_take_nothing_more(pair):
    primary, sink, start_primary = pair
    volume = start_primary()
    volume.write(np.full(4096, 1, np.uint8), 0)
    peer = volume.replication.peers["b"]
    path = primary.datadir.resync_path(volume.volume_id, "b")
    primary.engine.release(volume)
    primary.engine.delete("v")
    peer.record([4])  # a late answer after the delete
    assert not os.path.exists(path)


def test_a_write_from_before_a_reconnect_is_refused_after_it(pair):
    """A request sent before the link dropped may still sit in the sink's queue for its old connection
    while the primary reconnects and resyncs over a new one; the primary counted it as missed, so the
    sink must refuse it after the new session's CREATE, not apply it over newer data (a raw socket
    delivers that late message here)."""
    import zmq

    from blockd import checksum
    from blockd import replproto as rp

    primary, sink, start_primary = pair
    volume, repl, peer = _written_in_sync(start_primary)
    old_seq = repl.last_seq()  # a seq from this session
    link = peer.link
    link.reset("test: the link drops")
    _wait_for(lambda: link.up and peer.session_created and peer.state.counts)  # a new session, in sync
    volume.write(np.full(4096, 2, np.uint8), 0)  # newer data, on both copies
    volume.flush()

    stale = np.full(4096, 9, np.uint8)
    sums = np.empty(1, dtype=np.uint64)
    checksum.hash_blocks(stale, sums)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(sink.address)
    try:
        msg = rp.Message(rp.WRITE, volume=repl.repl_id, epoch=repl.epoch, seq=old_seq, offset=0, length=4096,
                         sums=sums.tobytes(), data=stale.tobytes())
        sock.send_multipart(rp.encode(msg))
        assert sock.poll(5000)
        reply = rp.decode(sock.recv_multipart())
    finally:
        sock.close()
    assert reply.type == rp.NACK and reply.json()["code"] == "stale_seq"
    assert repl.verify() == {"b": []}  # the replica still holds the newer data


@pytest.mark.parametrize("pair", [2], indirect=True)
def test_a_write_refused_as_older_than_the_session_is_resynced_without_resetting_the_link(pair):
    """A request whose seq was taken before the peer's current session began, delivered after it, is
    refused there (stale_seq): a miss, resynced over the link it has, which is not reset (every volume
    on that peer shares it).  The sink's floor is set just past the next seq, as a session CREATE
    queued a moment earlier would."""
    primary, sink, start_primary = pair
    volume, repl, peer = _written_in_sync(start_primary)
    failures = peer.link.failures
    sink._floor[repl.repl_id] = (repl.epoch, repl.last_seq() + 2)
    volume.write(np.full(4096, 2, np.uint8), 0)  # seq last + 1: refused, resynced, then 2 copies
    assert sink.refused["stale_seq"] == 1
    _wait_for(lambda: peer.state.counts and not peer.pending_chunks())
    assert peer.link.failures == failures
    assert repl.verify() == {"b": []}


@pytest.mark.parametrize("pair", [2], indirect=True)
def test_after_a_promotion_the_peers_chunk_list_joins_its_bitmap_page_by_page(pair, monkeypatch):
    """What a promotion of a big volume leaves (a marker: ask the peer for its chunks): the first
    resync lists the peer's chunks, one page at a time, and compares them too, so a chunk only the
    peer holds is overwritten from here."""
    import blockd.replication as replication

    primary, sink, start_primary = pair
    volume = start_primary()
    repl = volume.replication
    peer = repl.peers["b"]
    for c in (0, 3):
        volume.write(np.full(4096, c + 1, np.uint8), c * CHUNK)
    volume.flush()
    # Chunks only the peer holds (what an old primary wrote and never got acknowledged).
    other = sink.engine.open("v", replica=True)
    try:
        for c in (5, 7):
            other.write(np.full(4096, 9, np.uint8), c * CHUNK)
        other.flush()
    finally:
        sink.engine.release(other)
    assert repl.verify()["b"]  # they differ
    monkeypatch.setattr(replication, "CHUNKS_PAGE", 1)  # one chunk index per answer: four pages
    marker = primary.datadir.chunk_list_path(volume.volume_id, "b")
    open(marker, "w").close()
    peer.record([0])  # promotion put ours in the bitmap
    with repl._cond:
        peer.state.on("missed")
    repl.start_resync("b")
    _wait_for(lambda: peer.state.counts and not peer.pending_chunks())
    assert not os.path.exists(marker)
    assert repl.verify() == {"b": []}


def test_a_replica_that_refuses_a_write_records_that_it_lacks_it(pair):
    """Promotion there reads the replica's own sync state: a write it refused (corrupt on receipt here)
    must make it out of sync at once, not when its primary gets round to saying so."""
    import zmq

    from blockd import replproto as rp

    primary, sink, start_primary = pair
    volume, repl, peer = _written_in_sync(start_primary)
    assert sink.engine.catalog.volume("v")["sync_state"] == "in_sync"
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(sink.address)
    seq = repl.last_seq() + 10
    try:
        msg = rp.Message(rp.WRITE, volume=repl.repl_id, epoch=repl.epoch, seq=seq, offset=0,
                         length=4096, sums=bytes(8), data=bytes(range(256)) * 16)  # the sum does not match
        sock.send_multipart(rp.encode(msg))
        assert sock.poll(5000)
        reply = rp.decode(sock.recv_multipart())
        assert reply.type == rp.NACK and reply.json()["code"] == "corrupt"
        assert sink.engine.catalog.volume("v")["sync_state"] == "out_of_sync"
        # A CREATE the primary built before that write (an older seq) saying in sync arrives after it:
        # the refusal stands.
        info = dict(repl._info(), state="in_sync", seeded=True)
        sock.send_multipart(rp.encode(rp.json_message(rp.CREATE, info, volume=repl.repl_id, epoch=repl.epoch,
                                                      seq=seq - 1)))
        assert sock.poll(5000)
        assert rp.decode(sock.recv_multipart()).type == rp.ACK
    finally:
        sock.close()
    assert sink.engine.catalog.volume("v")["sync_state"] == "out_of_sync"


def test_a_reopened_primary_sends_seqs_above_what_its_replica_applied_whatever_the_clock(pair, monkeypatch):
    """Seqs start from the clock at each open; one set back (an hour here) must not make this primary's
    new writes look older than those the replica already applied (promotion compares them)."""
    import time as _time

    import blockd.replication as replication

    primary, sink, start_primary = pair
    volume, repl, peer = _written_in_sync(start_primary)
    before = sink.last_applied(repl.repl_id, sink.engine.catalog.volume_by_repl_id(repl.repl_id))
    primary.engine.release(volume)
    real = _time.time_ns
    monkeypatch.setattr(replication.time, "time_ns", lambda: real() - 3600 * 10**9)
    volume = primary.engine.open("v")
    volume.write(np.full(4096, 2, np.uint8), 0)  # min-copies 1: the replica applies it a moment later
    row = sink.engine.catalog.volume_by_repl_id(repl.repl_id)
    _wait_for(lambda: sink.last_applied(repl.repl_id, row) > before, timeout=5.0)


def test_a_chunk_list_still_to_merge_makes_the_peer_out_of_sync_at_open(pair):
    """A promotion of a big volume leaves a marker per peer; if the new primary has no chunk of its own,
    the bitmap is empty, and the marker alone must start the resync that merges the peer's list."""
    primary, sink, start_primary = pair
    volume, repl, peer = _written_in_sync(start_primary)
    primary.engine.release(volume)
    marker = primary.datadir.chunk_list_path(volume.volume_id, "b")
    open(marker, "w").close()
    volume = primary.engine.open("v")
    peer = volume.replication.peers["b"]
    _wait_for(lambda: not os.path.exists(marker) and peer.state.counts)
    assert volume.replication.verify() == {"b": []}


def test_a_recreated_empty_copy_says_so_until_its_full_resync_ends(pair):
    """A copy recreated empty where the primary had one answers CREATE with created: the primary then
    resyncs every chunk.  If that answer is lost, the next CREATE must say so again (the copy is
    still empty), until the primary, its full resync done, says it is in sync."""
    import zmq

    from blockd import replproto as rp

    primary, sink, start_primary = pair
    pool = sink.engine.catalog.pool()
    info = {"name": "w", "size": 1 << 20, "type": "raw", "chunk_size": pool["chunk_size"], "min_copies": 1,
            "copies": [], "seeded": True}
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(sink.address)

    def create(state, seq, **extra):
        sock.send_multipart(rp.encode(rp.json_message(rp.CREATE, dict(info, state=state, **extra), volume=777,
                                                      epoch=1, seq=seq)))
        assert sock.poll(5000)
        reply = rp.decode(sock.recv_multipart())
        assert reply.type == rp.ACK, reply.json()
        return reply.json()["created"], sink.engine.catalog.volume("w")["sync_state"]

    try:
        assert create("in_sync", 1) == (True, "empty")  # (this answer "lost")
        assert create("out_of_sync", 2) == (True, "empty")  # said again
        assert create("in_sync", 3, applied_through=2) == (False, "in_sync")  # full resync done, seq 2 answered
        assert create("out_of_sync", 4) == (False, "out_of_sync")
        # Resynced and in sync again, by the primary's count through seq 9: as far along as a copy that
        # applied every write up to 9 (promotion compares this; a resync carries no client seqs).
        assert create("in_sync", 10, applied_through=9) == (False, "in_sync")
        assert sink.last_applied(777, sink.engine.catalog.volume_by_repl_id(777)) == (1, 9)
    finally:
        sock.close()


def test_a_chunk_a_resync_finds_equal_stays_at_risk_until_the_next_flush(pair):
    """Review finding: a resync that found a chunk's checksums equal forgot it, though the peer may hold
    it only in its page cache (the flush that would have made it durable there was missed); a FLUSH
    missing that peer later then recorded nothing for it.  Now it joins the chunks the next flush must
    make durable there (a RESYNC is sent with FUA, so a resent chunk is durable already)."""
    primary, sink, start_primary = pair
    volume, vr, peer = _written_in_sync(start_primary)
    peer.record({0})  # chunk 0 due for comparison (what a miss would leave)
    assert vr._resync_chunk("b", peer, 0)
    assert peer.skipped_chunks == 1 and 0 not in peer.pending_chunks()
    assert 0 in peer.unflushed
    volume.flush()
    assert not peer.unflushed  # made durable there by the flush
