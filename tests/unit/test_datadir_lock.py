"""The data-dir lock across a killed `blockd serve`: a new server waits for a dying nbdkit to let go,
never for a live holder.  Real processes hold the lock (flock is per open file, so a holder must be
another process)."""

import os
import subprocess
import sys
import threading

import pytest

from blockd.datadir import DataDir
from blockd.errors import Busy

HOLD = "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); " \
       "print('held', flush=True); sys.stdin.read()"


def _holder(path):
    """A process holding the lock until its stdin closes."""
    p = subprocess.Popen([sys.executable, "-c", HOLD, path], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline() == "held\n"
    return p


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.fixture
def dd(tmp_path):
    d = DataDir(str(tmp_path / "data"))
    d.init()
    return d


def test_a_lock_held_on_behalf_of_a_dead_serve_is_waited_for(dd):
    """The lock file names a serve that is gone; its nbdkit (here: the holder) still exits: wait."""
    holder = _holder(dd.lock_path)
    try:
        with open(dd.lock_path, "w") as f:
            f.write(f"{_dead_pid():>10}\n{holder.pid:>10}\n")
        waiter = threading.Thread(target=dd.wait_for_dead_holder, args=(60,))
        waiter.start()
        waiter.join(0.2)
        assert waiter.is_alive()  # still waiting: the lock is held
        holder.stdin.close()
        holder.wait()
        waiter.join(60)
        assert not waiter.is_alive()
        fd = dd.lock()
        assert dd._holder_pids(fd) == [str(os.getpid())]
    finally:
        holder.kill()
        holder.wait()


def test_a_live_holder_is_refused_at_once_naming_it(dd):
    holder = _holder(dd.lock_path)
    try:
        with open(dd.lock_path, "w") as f:
            f.write(f"{holder.pid:>10}\n{_dead_pid():>10}\n")
        dd.wait_for_dead_holder(60)  # returns at once: its taker lives
        with pytest.raises(Busy, match=f"in use by blockd pid {holder.pid}"):
            dd.lock()
    finally:
        holder.kill()
        holder.wait()


def test_record_holder_names_serve_then_its_child_in_place(dd):
    fd = dd.lock()
    DataDir.record_holder(fd, 12345)
    assert dd._holder_pids(fd) == [str(os.getpid()), "12345"]
    DataDir.record_holder(fd, 7)  # a restart: same width, nothing left of the longer pid
    assert dd._holder_pids(fd) == [str(os.getpid()), "7"]
