"""Promotion's decisions on one node: a real engine and SQLite catalog holding a replica copy.  The
other copies' answers come from a stand-in for `query_copies` (the STATE round trips to their sinks):
the interleavings tested here (a write acknowledged between two questions) cannot be timed with real
nodes; tests/integration/test_replication.py promotes across real processes."""

import json
import os

import pytest

from blockd.errors import BadInput, Refused
from blockd.intent import IntentLog
from blockd.fileio import OsFiles
from enginekit import Rig

OTHERS = [{"name": "b", "key": "KB", "address": "tcp://127.0.0.1:1"},
          {"name": "c", "key": "KC", "address": "tcp://127.0.0.1:2"}]
PRIMARY = {"name": None, "key": "KA", "address": "tcp://127.0.0.1:3"}


@pytest.fixture
def replica(tmp_path):
    """Copy b of a 3-copy volume (min copies 2), in sync, whose last applied write was epoch 1 seq 100."""
    rig = Rig(tmp_path / "b")
    cat = rig.engine.catalog
    for name, key in (("a", "KA"), ("c", "KC")):
        cat.add_peer(name, PRIMARY["address"] if name == "a" else OTHERS[1]["address"], key)
    row = cat.create_replica("v", 1 << 20, "raw", 42, 1, 2)
    cat.set_replica_view(row["id"], "in_sync", 2, json.dumps([OTHERS[0], OTHERS[1], PRIMARY]))
    cat.set_applied(row["id"], (1, 100))
    os.makedirs(rig.datadir.volume_path(row["id"]))  # where its data is (chunks, the applied file)
    return rig, row


def test_a_copy_whose_data_is_gone_is_refused_whatever_the_others_say(replica):
    """Its volume directory is missing though it applied writes (wiped): not a copy of anything."""
    rig, row = replica
    os.rmdir(rig.datadir.volume_path(row["id"]))
    with pytest.raises(Refused, match=r"its data is gone here"):
        rig.engine.promote("v", own_key="KB", survivors=lambda copies, rid, epoch=0, claim=None: answers(100, epoch or 1))
    assert rig.engine.catalog.volume("v")["role"] == "replica"


def answers(c_seq, c_epoch=1, primary=None):
    """What the other copies say: c at (1, c_seq); the old primary silent unless given."""
    out = {OTHERS[1]["address"]: {"epoch": c_epoch, "role": "replica", "sync_state": "in_sync",
                                  "applied_epoch": 1, "applied_seq": c_seq},
           PRIMARY["address"]: primary}
    return out


def test_a_write_acknowledged_between_the_question_and_the_announcement_refuses(replica):
    rig, row = replica
    calls = []

    def survivors(copies, repl_id, epoch=0, claim=None):
        calls.append(epoch)
        # First question: c is where b is.  Meanwhile the old primary gets c to acknowledge one more.
        return answers(100 if not epoch else 101, c_epoch=epoch or 1)

    with pytest.raises(Refused, match=r"applied later writes .*seq 101.*now hold epoch 2"):
        rig.engine.promote("v", own_key="KB", survivors=survivors)
    assert calls == [0, 2]
    after = rig.engine.catalog.volume("v")
    # Still a replica, at the announced epoch (like the copies that took it: the old primary is refused
    # here too), in sync as before: the copy that is ahead can be promoted next.
    assert after["role"] == "replica" and after["epoch"] == 2 and after["sync_state"] == "in_sync"
    assert not os.path.exists(rig.datadir.resync_path(row["id"], "c"))  # no bitmaps written


def test_promotion_fills_every_bitmap_before_it_takes_the_epoch(replica):
    rig, row = replica
    report = rig.engine.promote("v", own_key="KB", survivors=lambda copies, rid, epoch=0, claim=None: answers(100, epoch or 1))
    assert report["epoch"] == 2 and not report["forced"]
    after = rig.engine.catalog.volume("v")
    assert after["role"] == "primary" and after["epoch"] == 2
    for peer in ("a", "c"):
        assert IntentLog(OsFiles(), rig.datadir.resync_path(row["id"], peer)).load() == set(range(16))


def test_a_bad_compare_limit_is_one_clear_error_and_changes_nothing(replica, monkeypatch):
    rig, row = replica
    monkeypatch.setenv("BLOCKD_FULL_COMPARE_LIMIT", "256G")
    with pytest.raises(BadInput, match="BLOCKD_FULL_COMPARE_LIMIT"):
        rig.engine.promote("v", own_key="KB", survivors=lambda copies, rid, epoch=0, claim=None: answers(100, epoch or 1))
    assert rig.engine.catalog.volume("v")["role"] == "replica"


def test_a_later_epoch_outranks_a_larger_seq(replica):
    """Seqs come from each primary's clock: a write at epoch 2 is later than any at epoch 1."""
    rig, row = replica

    def survivors(copies, repl_id, epoch=0, claim=None):
        out = answers(5, c_epoch=epoch or 2)
        out[OTHERS[1]["address"]]["applied_epoch"] = 2
        return out

    with pytest.raises(Refused, match=r"applied later writes \(epoch 2 seq 5 > epoch 1 seq 100\)"):
        rig.engine.promote("v", own_key="KB", survivors=survivors)


def test_another_promotion_announcing_the_same_epoch_first_refuses(replica):
    """Two copies promoted at once both compute epoch 2; the one whose announcement reaches the other
    first wins, and the other must not take epoch 2 as well (two primaries at one epoch never fence)."""
    rig, row = replica

    def survivors(copies, repl_id, epoch=0, claim=None):
        if not epoch:
            rig.engine.catalog.adopt_epoch(row["id"], 2)  # the other promotion's announcement lands here
        return answers(100, epoch or 1)

    with pytest.raises(Refused, match="another promotion announced epoch 2"):
        rig.engine.promote("v", own_key="KB", survivors=survivors)
    assert rig.engine.catalog.volume("v")["role"] == "replica"


def test_a_copy_that_answers_empty_vouches_for_nothing(replica):
    """3 copies, min 2: a write acknowledged by a and c, then a dies and c comes back wiped (empty, its
    position gone).  c answering must not count as covering it: with a silent, the write may be on no
    copy that answered, so promoting b is refused."""
    rig, row = replica

    def survivors(copies, repl_id, epoch=0, claim=None):
        out = answers(0, epoch or 1)
        out[OTHERS[1]["address"]].update(sync_state="empty", applied_epoch=0)
        return out

    with pytest.raises(Refused, match=r"did not answer \(or are empty\)"):
        rig.engine.promote("v", own_key="KB", survivors=survivors)
    assert rig.engine.catalog.volume("v")["role"] == "replica"


def test_the_start_up_epoch_check_fences_superseded_primaries_and_survives_failures(tmp_path):
    """`Manager.check_epochs` (run as serve starts): asking about one volume failing (a bug, a refusal)
    does not end the check of the others; a copy at a newer epoch fences this primary (a replica now);
    an unseeded copy is never asked (it has no copy to answer about); a silent copy is asked again, each
    pass, until the deadline."""
    from blockd.replication import Manager, Settings

    rig = Rig(tmp_path / "a")
    cat = rig.engine.catalog
    cat.add_peer("b", "tcp://127.0.0.1:1", "KB")
    cat.add_peer("c", "tcp://127.0.0.1:2", "KC")
    rows = {n: cat.create_volume(n, 1 << 20, replicas=["b"] if n != "lonely" else ["c"])
            for n in ("broken", "superseded", "current", "lonely")}
    for n in ("broken", "superseded", "current"):
        cat.set_seeded(rows[n]["id"], cat.volume_replicas(rows[n]["id"])[0]["peer_id"])
    manager = Manager(rig.engine, None, Settings(ack_timeout=0.1))
    asked = []

    def query(copies, repl_id, epoch=0, refusals=False):
        name = cat.volume_by_repl_id(repl_id)["name"]
        asked.append(name)
        assert epoch == 0 and refusals  # a question, never an announcement
        if name == "broken":
            raise RuntimeError("boom")
        return {copies[0]["address"]: {"epoch": 7 if name == "superseded" else 1, "role": "primary"}}

    manager.query_copies = query
    manager.check_epochs(give_up_after=1.5)
    assert cat.volume("superseded")["role"] == "replica" and cat.volume("superseded")["epoch"] == 7
    assert cat.volume("current")["role"] == "primary" and cat.volume("broken")["role"] == "primary"
    assert "lonely" not in asked
    assert asked.count("superseded") == 1 and asked.count("current") == 1  # answered: not asked again
    assert asked.count("broken") >= 2  # failed: asked again on the next pass


def test_promotion_takes_the_largest_size_a_copy_says_it_has(replica):
    """Review finding: a copy that missed a resize (down then) promoted would shrink the volume.  c says
    it is 4 MiB (this copy 1 MiB): the promoted volume is 4 MiB, every chunk of it due for comparison."""
    rig, row = replica

    def survivors(copies, repl_id, epoch=0, claim=None):
        out = answers(100, epoch or 1)
        out[OTHERS[1]["address"]]["size"] = 4 << 20
        return out

    report = rig.engine.promote("v", own_key="KB", survivors=survivors)
    assert report["epoch"] == 2 and not report["forced"]
    assert rig.engine.catalog.volume("v")["size"] == 4 << 20
    assert IntentLog(OsFiles(), rig.datadir.resync_path(row["id"], "c")).load() == set(range(64))


def test_a_copy_that_heard_another_promotion_announce_the_epoch_first_does_not_count(replica):
    """b and c promoted at once, both at epoch 2; c's announcement reached the old primary a first.
    a answers b `claimed_by_another`: b must not count it (nor c, which holds 2 for itself), so b
    has 1 of the 2 holders it needs and is refused; without this both became primaries at epoch 2."""
    rig, row = replica

    def survivors(copies, repl_id, epoch=0, claim=None):
        if not epoch:
            return answers(100, 1, primary={"epoch": 1, "role": "primary"})
        assert claim  # the promotion's token goes with its announcement
        taken = {"epoch": epoch, "role": "replica", "sync_state": "in_sync", "applied_epoch": 1,
                 "applied_seq": 100, "claimed_by_another": True}
        return {OTHERS[1]["address"]: dict(taken), PRIMARY["address"]: dict(taken)}

    with pytest.raises(Refused, match=r"only 1 of the 3 copies hold epoch 2"):
        rig.engine.promote("v", own_key="KB", survivors=survivors)
    assert rig.engine.catalog.volume("v")["role"] == "replica"


def test_a_promotion_here_refuses_once_this_node_heard_another_claim_the_epoch(replica):
    """This node's sink already took c's announcement of epoch 2 (its claim) before this promotion
    adopts it: refused, nothing changes here."""
    from blockd.replication import Settings, Sink

    rig, row = replica
    rig.engine.sink = Sink(rig.engine, "tcp://127.0.0.1:1", None, Settings(insecure=True), [])
    assert rig.engine.sink.claim(row["repl_id"], 2, "c-token")
    with pytest.raises(Refused, match="another promotion announced epoch 2"):
        rig.engine.promote("v", own_key="KB", survivors=lambda copies, rid, epoch=0, claim=None: answers(100, epoch or 1))
    after = rig.engine.catalog.volume("v")
    assert after["role"] == "replica" and after["epoch"] == 1
