"""The write-intent log: durable adds, removes, compaction, torn tails."""

import os

from blockd.fileio import OsFiles
from blockd.intent import COMPACT_AFTER_RECORDS, IntentLog


def test_add_remove_reload(tmp_path):
    path = str(tmp_path / "intent.log")
    log = IntentLog(OsFiles(), path)
    log.add([3, 5, 7])
    log.remove([5])
    log.add([9, 3])
    log.close()
    assert IntentLog(OsFiles(), path).load() == {3, 7, 9}


def test_torn_tail_only_adds(tmp_path):
    path = str(tmp_path / "intent.log")
    log = IntentLog(OsFiles(), path)
    log.add([4])
    log.remove([4])
    log.close()
    with open(path, "ab") as f:
        f.write(b"\x00" * 5)  # a partial record: ignored
    assert IntentLog(OsFiles(), path).load() == set()
    with open(path, "ab") as f:
        f.write(b"\x00" * 3)  # now a whole zero record: "chunk 0 added" (safe)
    assert IntentLog(OsFiles(), path).load() == {0}


def test_compaction_keeps_the_set_and_shrinks_the_file(tmp_path):
    path = str(tmp_path / "intent.log")
    log = IntentLog(OsFiles(), path)
    for i in range(COMPACT_AFTER_RECORDS):
        log.add([i, i + 1_000_000])
        log.remove([i])
    log.close()
    assert os.path.getsize(path) < 3 * COMPACT_AFTER_RECORDS * 8  # less than the 3 records per round appended
    assert IntentLog(OsFiles(), path).load() == {i + 1_000_000 for i in range(COMPACT_AFTER_RECORDS)}


def test_missing_file_is_empty(tmp_path):
    assert IntentLog(OsFiles(), str(tmp_path / "none.log")).load() == set()
