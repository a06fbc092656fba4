"""fio writing with periodic flushes, the server killed with SIGKILL mid-run.

fio's verify cannot know which writes were flushed before the kill, so this
test checks what fio can prove plus what blockd promises: after a restart the
whole volume reads without a single checksum error (no false alarm), scrub is
clean, and a region written and flushed *before* the fio run is intact.
(The byte-exact "acknowledged by a completed flush" check with a recording
writer is tests/integration/test_failures.py::test_kill9_mid_stream_...)
"""

import hashlib
import os
import subprocess

import pytest

from conftest import run_cli, wait_for

pytestmark = pytest.mark.integration

MiB = 1024 * 1024


def test_fio_with_periodic_fsync_then_kill9(data_dir, cli, server_factory):
    cli("volume", "create", "vol0", "--size", "64MiB", check=True)
    srv = server_factory(data_dir).start()
    h = srv.connect("vol0")
    anchor = os.urandom(4 * MiB)
    h.pwrite(anchor, 60 * MiB)  # outside fio's range, flushed before the crash
    h.flush()
    h.shutdown()
    fio = subprocess.Popen(
        [
            "fio", "--name=crash", "--ioengine=nbd", f"--uri={srv.uri('vol0')}",
            "--rw=randwrite", "--bsrange=4k-64k", "--iodepth=16",
            "--fsync=8", "--time_based", "--runtime=60", "--numjobs=2", "--offset_increment=28M",
            "--size=28M",
        ],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        # Kill once fio's own flushes have completed mid-stream: the checksums
        # file grows when a flush persists the checksums of new chunks.
        sums = os.path.join(str(data_dir), "volumes", "1", "checksums")
        first = os.stat(sums).st_blocks
        wait_for(lambda: os.stat(sums).st_blocks > first + 64, timeout=60, what="fio's flushes")
        assert fio.poll() is None  # still writing: the kill lands mid-stream
        assert srv.kill9() == -9
    finally:
        fio.kill()
        fio.wait()
    srv.start()
    h = srv.connect("vol0")
    for offset in range(0, 64 * MiB, 4 * MiB):
        h.pread(4 * MiB, offset)  # raises on EIO: a false checksum alarm
    assert hashlib.sha256(h.pread(4 * MiB, 60 * MiB)).digest() == hashlib.sha256(anchor).digest()
    h.shutdown()
    assert srv.stop() == 0
    scrub = run_cli("scrub", "vol0", data_dir=data_dir)
    assert scrub.returncode == 0, scrub.stdout + scrub.stderr
