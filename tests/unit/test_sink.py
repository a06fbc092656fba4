"""The replication sink over a real ZeroMQ socket (plaintext, loopback) and a real engine and catalog:
its cache of open replicas must never outlive what the catalog says about them."""

import glob
import time
import os

import numpy as np
import pytest
import zmq

from blockd import checksum
from blockd import replproto as rp
from blockd.replication import Settings, Sink
from conftest import free_port
from enginekit import Rig

REPL_ID = 77


@pytest.fixture
def sink(tmp_path):
    rig = Rig(tmp_path / "data")
    address = f"tcp://127.0.0.1:{free_port()}"
    s = Sink(rig.engine, address, None, Settings(insecure=True), []).start()
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(address)

    def ask(msg):
        dealer.send_multipart(rp.encode(msg))
        assert dealer.poll(10000), "the sink did not answer"
        return rp.decode(dealer.recv_multipart())

    yield rig, s, ask
    dealer.close(0)
    s.stop()


def _create(ask, epoch):
    info = {"name": "v", "size": 1 << 20, "type": "raw", "chunk_size": 64 * 1024, "min_copies": 1}
    return ask(rp.json_message(rp.CREATE, info, volume=REPL_ID, epoch=epoch, seq=1))


def _write(ask, epoch, seq, byte):
    data = np.full(4096, byte, np.uint8)
    sums = np.empty(1, np.uint64)
    checksum.hash_blocks(data, sums)
    return ask(rp.Message(rp.WRITE, volume=REPL_ID, epoch=epoch, seq=seq, offset=0, length=4096,
                          sums=sums.tobytes(), data=data.tobytes()))


def test_a_superseded_primary_is_refused_after_a_newer_create(sink):
    rig, s, ask = sink
    assert _create(ask, 1).type == rp.ACK
    assert _write(ask, 1, 2, 1).type == rp.ACK  # cached at epoch 1
    assert _create(ask, 2).type == rp.ACK  # a promoted primary announces epoch 2
    reply = _write(ask, 1, 3, 2)  # the old primary, still writing at epoch 1
    assert reply.type == rp.NACK and reply.json()["code"] == "stale_epoch"
    assert _write(ask, 2, 4, 3).type == rp.ACK


def test_failed_requests_do_not_pile_up_references_to_the_replica(sink):
    rig, s, ask = sink
    assert _create(ask, 1).type == rp.ACK
    assert _write(ask, 1, 2, 9).type == rp.ACK
    rig.engine.open("v", replica=True).flush()  # on disk, then let our own reference go
    volume_id = rig.engine.catalog.volume("v")["id"]
    rig.engine.release(rig.engine._open[volume_id].volume)
    (chunk,) = glob.glob(os.path.join(rig.datadir.volume_path(volume_id), "*.chunk"))
    with open(chunk, "r+b") as f:  # a flipped byte: READ fails with a checksum error
        f.seek(100)
        f.write(b"\x00")
    os.posix_fadvise(os.open(chunk, os.O_RDONLY), 0, 0, os.POSIX_FADV_DONTNEED)
    s._forget(REPL_ID)  # drop the cached Volume (and its checksum cache): the next message reopens it
    for seq in range(10, 13):
        reply = ask(rp.Message(rp.READ, volume=REPL_ID, epoch=1, seq=seq, offset=0, length=4096))
        assert reply.type == rp.NACK and reply.json()["code"] == "error"
    assert volume_id not in rig.engine._open or rig.engine._open[volume_id].refs <= 1


def _create_with(ask, seq, flags=0, **extra):
    info = {"name": "v", "size": 1 << 20, "type": "raw", "chunk_size": 64 * 1024, "min_copies": 2, **extra}
    reply = ask(rp.json_message(rp.CREATE, info, volume=REPL_ID, epoch=1, seq=seq, flags=flags))
    assert reply.type == rp.ACK, reply.json()
    return reply.json()


def test_an_empty_copy_stays_empty_until_a_create_sent_after_its_full_resync(sink):
    """A copy recreated empty where the primary had one answers `created` until the primary says in sync
    in a CREATE sent after it read that answer (applied_through covers it): a CREATE the primary sent
    before (a resize, a new quorum, saying in_sync from what it knew) must not make it look in sync
    while the full resync still runs (a promotion there would take a copy half filled)."""
    rig, s, ask = sink
    state = lambda: rig.engine.catalog.volume("v")["sync_state"]  # noqa: E731
    assert _create_with(ask, 5, flags=rp.SESSION, state="in_sync", seeded=True, applied_through=4)["created"]
    assert state() == "empty"
    early = _create_with(ask, 6, state="in_sync", seeded=True, applied_through=4)  # 5 not answered yet
    assert early["created"] and state() == "empty"
    done = _create_with(ask, 9, state="in_sync", seeded=True, applied_through=8)  # after the resync
    assert not done["created"] and state() == "in_sync"


def test_a_session_create_saying_in_sync_does_not_clear_an_empty_copy(sink):
    """An open or a reconnect says in sync from what the primary knew (a copy lost while this node was
    down): still created."""
    rig, s, ask = sink
    assert _create_with(ask, 5, flags=rp.SESSION, state="in_sync", seeded=True, applied_through=4)["created"]
    again = _create_with(ask, 20, flags=rp.SESSION, state="in_sync", seeded=True, applied_through=19)
    assert again["created"] and rig.engine.catalog.volume("v")["sync_state"] == "empty"


def _announce(ask, epoch, token):
    return ask(rp.json_message(rp.STATE, {"claim": token}, volume=REPL_ID, epoch=epoch, seq=1)).json()


def test_two_promotions_announcing_one_epoch_the_second_is_told_so_and_takes_nothing(sink):
    """Copies b and c promoted at once both compute epoch 2 and announce it here.  The first takes it;
    the second hears `claimed_by_another` (it must not count this copy: two primaries at epoch 2 would
    never fence each other); a repeat of the first's announcement still counts; a newer epoch is taken."""
    rig, s, ask = sink
    assert _create(ask, 1).type == rp.ACK
    first = _announce(ask, 2, "b-token")
    assert first["epoch"] == 2 and not first.get("claimed_by_another")
    second = _announce(ask, 2, "c-token")
    assert second["claimed_by_another"] and second["epoch"] == 2
    assert not _announce(ask, 2, "b-token").get("claimed_by_another")  # the same promotion, asked again
    assert _announce(ask, 1, "old-token")["claimed_by_another"]  # older than what was claimed
    newer = _announce(ask, 3, "c-token")
    assert newer["epoch"] == 3 and not newer.get("claimed_by_another")
    assert rig.engine.catalog.volume("v")["epoch"] == 3
    plain = ask(rp.json_message(rp.STATE, {}, volume=REPL_ID, seq=1)).json()  # a question, no announcement
    assert plain["epoch"] == 3 and not plain.get("claimed_by_another")
    assert not s.claim(REPL_ID, 3, "b-token") and s.claim(REPL_ID, 4, "b-token")  # this node's own promotion


def _create_info(ask, epoch=1, **info):
    base = {"name": "v", "size": 8 << 30, "type": "raw", "chunk_size": 64 * 1024, "min_copies": 1}
    base.update(info)
    return ask(rp.json_message(rp.CREATE, {k: v for k, v in base.items() if v is not ...}, volume=REPL_ID,
                               epoch=epoch, seq=1))


def test_a_replica_copy_keeps_its_primarys_type_iops_and_throughput(sink):
    """From a black-box run: replica copies were made without IOPS, so an io2 copy could not even be
    shown, nor opened once promoted.  The CREATE carries them; a later one (modified on the primary)
    updates them."""
    rig, s, ask = sink
    assert _create_info(ask, type="io2", iops=3000, throughput=None).type == rp.ACK
    row = rig.engine.catalog.volume("v")
    assert (row["type"], row["iops"], row["throughput"]) == ("io2", 3000, None)
    assert _create_info(ask, type="gp3", iops=4000, throughput=250).type == rp.ACK
    row = rig.engine.catalog.volume("v")
    assert (row["type"], row["iops"], row["throughput"]) == ("gp3", 4000, 250)
    assert _create_info(ask, type="raw", iops=..., throughput=...).type == rp.ACK  # an older primary: kept
    assert rig.engine.catalog.volume("v")["iops"] == 4000


@pytest.mark.parametrize("bad", [
    {"size": 4096.5}, {"size": "4096"}, {"size": float("nan")}, {"size": 0}, {"size": True},
    {"type": "io9"}, {"min_copies": 0}, {"copies": -1},
    {"chunk_size": "x"}, {"name": 7}, {"type": "gp3", "iops": 10 ** 9}, {"iops": -1},
    {"state": "bogus"}, {"copies": [1, 2]}, {"min_copies": 1000000},
])
def test_a_create_with_a_bad_field_is_refused_and_changes_nothing(sink, bad):
    rig, s, ask = sink
    before = s.refused["malformed"]
    reply = _create_info(ask, **bad)
    assert reply.type == rp.NACK and reply.json()["code"] == "malformed", reply.json()
    assert rig.engine.catalog.find_volume("v") is None
    assert s.refused["malformed"] == before + 1


def test_limits_that_do_not_go_together_are_not_stored_but_the_create_is_taken(sink):
    """Review finding: a copy made before copies kept their IOPS, once promoted, says io2 with none; every
    sink refusing its CREATE would leave it unconfirmed for good.  Taken, without those limits."""
    rig, s, ask = sink
    assert _create_info(ask, type="io2", iops=None).type == rp.ACK
    row = rig.engine.catalog.volume("v")
    assert (row["type"], row["iops"]) == ("io2", None)
    from blockd import voltypes

    assert voltypes.limits("io2", row["size"], None)["iops"] == 100  # shown and served at the lowest figure


def test_a_write_at_an_epoch_never_announced_is_refused_and_takes_nothing(sink):
    """From a black-box run: a WRITE past the end at epoch 99 was refused as out of range, yet the copy
    took epoch 99 (which fenced its real primary).  A new primary's CREATE comes first: a data message
    at a newer epoch is refused and changes nothing, nor marks the copy behind."""
    rig, s, ask = sink
    assert _create(ask, 1).type == rp.ACK
    rig.engine.catalog.set_replica_view(rig.engine.catalog.volume("v")["id"], "in_sync", 1, "[]")
    reply = _write(ask, 99, 5, 1)
    assert reply.type == rp.NACK and reply.json()["code"] == "unknown_epoch"
    row = rig.engine.catalog.volume("v")
    assert row["epoch"] == 1 and row["sync_state"] == "in_sync"
    assert _write(ask, 1, 6, 2).type == rp.ACK  # its primary goes on


def test_a_flood_of_garbage_is_counted_in_full_but_logged_only_so_much(sink, capfd):
    """From a black-box run: 20,000 garbage messages made 20,000 log lines.  Every one is still
    refused and counted; the log gets at most REFUSAL_LOG_PER_SECOND lines a second of them."""
    from blockd.replication import REFUSAL_LOG_PER_SECOND

    rig, s, ask = sink
    started = time.monotonic()
    for i in range(200):
        reply = ask(rp.Message(rp.WRITE, volume=REPL_ID, epoch=1, seq=i + 1, offset=0, length=4096,
                               sums=b"x" * 8, data=b"y" * 4096))  # no such volume here: refused
        assert reply.type == rp.NACK
    elapsed = time.monotonic() - started
    assert s.refused["unknown_volume"] == 200
    lines = [ln for ln in capfd.readouterr().err.splitlines() if "refused WRITE" in ln]
    assert 1 <= len(lines) <= REFUSAL_LOG_PER_SECOND * (int(elapsed) + 2), len(lines)
    assert _create(ask, 1).type == rp.ACK  # and it serves on


def test_a_delete_never_deletes_nor_fences_a_primary_here(sink):
    """Review finding: a tombstone's DELETE delivered days later to a copy promoted here with --force
    (at a lower epoch) fenced it and deleted it.  A DELETE only ever deletes a replica copy."""
    rig, s, ask = sink
    assert _create(ask, 1).type == rp.ACK
    rig.engine.catalog.promote("v", [], 2)
    reply = ask(rp.Message(rp.DELETE, volume=REPL_ID, epoch=5, seq=9))
    assert reply.type == rp.NACK and reply.json()["code"] == "not_replica"
    row = rig.engine.catalog.volume("v")
    assert row["role"] == "primary" and row["epoch"] == 2
