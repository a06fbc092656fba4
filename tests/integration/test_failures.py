"""Failure paths of a real `blockd serve`: crashes, corruption, bad input, locks, full and read-only disks."""

import errno
import hashlib
import json
import os
import random
import subprocess
import threading
import time

import nbd
import pytest

from conftest import run_cli, wait_for

pytestmark = pytest.mark.integration

KiB = 1024
MiB = 1024 * KiB
BLOCK = 4096
CHUNK = 4 * MiB


# ---- helpers -------------------------------------------------------------------
def one_error_line(proc, code, *needles):
    """The CLI failed with ``code`` and exactly one `blockd: ` line on stderr naming every needle."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("blockd: "), lines[0]
    for needle in needles:
        assert str(needle).lower() in lines[0].lower(), (needle, lines[0])
    return lines[0]


def volume_list(data_dir, **kw):
    proc = run_cli("volume", "list", "--json", data_dir=data_dir, check=True, **kw)
    return json.loads(proc.stdout)


def volume_dir(data_dir, name):
    row = json.loads(run_cli("volume", "show", name, "--json", data_dir=data_dir, check=True).stdout)
    return os.path.join(str(data_dir), "volumes", str(row["id"]))


def scrub(data_dir, name="vol0", json_out=False):
    args = ["scrub", name] + (["--json"] if json_out else [])
    return run_cli(*args, data_dir=data_dir)


def assert_scrub_clean(data_dir, name="vol0"):
    proc = scrub(data_dir, name)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr)
    assert "corrupt" not in proc.stdout, proc.stdout[-2000:]
    assert "clean" in proc.stdout


def read_errors(h, offset, length, piece=4 * MiB):
    """Offsets (4 KiB blocks) in the range whose read fails; narrows failing pieces down to blocks."""
    bad = []
    for o in range(offset, offset + length, piece):
        n = min(piece, offset + length - o)
        try:
            h.pread(n, o)
        except nbd.Error:
            for b in range(o, o + n, BLOCK):
                try:
                    h.pread(BLOCK, b)
                except nbd.Error:
                    bad.append(b)
    return bad


def mount(*args):
    subprocess.run(["mount", *args], check=True, capture_output=True, text=True)


@pytest.fixture
def mounts():
    """Mount points to unmount at teardown (request this before server_factory so servers die first)."""
    if os.geteuid() != 0:
        pytest.skip("needs root for mount")
    points = []
    yield points
    for point in reversed(points):
        if subprocess.run(["umount", point], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", point], capture_output=True)


# ---- 1. crash: kill -9 mid-stream ---------------------------------------------------
REGION_CHUNKS = 8
REGION_BLOCKS = REGION_CHUNKS * CHUNK // BLOCK  # the writer works inside the first 32 MiB


class Writer(threading.Thread):
    """Writes known patterns (4k/64k writes, some zero writes and trims) and flushes now and then.

    Between two flushes it writes to two "hot" chunks only, so at a crash some chunks hold
    flushed data that only the durable checksums vouch for (not the intent log).
    Model: ``durable[b]`` is block b as of the last *completed* flush; ``since[b]`` every value
    issued to b after it (completed or not).  After a crash, block b must read as one of those.
    """

    def __init__(self, server, durable, seed):
        super().__init__(daemon=True)
        self.h = server.connect("vol0")
        self.durable = durable
        self.current = list(durable)
        self.since = {}
        self.rng = random.Random(seed)
        self.flushes = 0
        self.ops_since_flush = 0
        self.error = None
        self.stopped_by = None

    def _issue(self, first, values):
        for i, v in enumerate(values):
            self.since.setdefault(first + i, []).append(v)

    def run(self):
        rng = self.rng
        per_chunk = CHUNK // BLOCK
        next_flush = rng.randint(6, 20)
        hot = rng.sample(range(REGION_CHUNKS), 2)
        try:
            while True:
                kind = rng.random()
                nblocks = 1 if rng.random() < 0.6 else 16
                first = min(rng.choice(hot) * per_chunk + rng.randrange(per_chunk), REGION_BLOCKS - nblocks)
                if kind < 0.05:
                    values = [bytes(BLOCK)] * nblocks
                    self._issue(first, values)
                    self.h.trim(nblocks * BLOCK, first * BLOCK)
                else:
                    if kind < 0.10:
                        values = [bytes(BLOCK)] * nblocks  # all-zero blocks become holes
                    else:
                        values = [rng.randbytes(BLOCK) for _ in range(nblocks)]
                    self._issue(first, values)
                    self.h.pwrite(b"".join(values), first * BLOCK)
                for i, v in enumerate(values):
                    self.current[first + i] = v
                self.ops_since_flush += 1
                next_flush -= 1
                if next_flush == 0:
                    snapshot = list(self.current)  # single writer: everything issued has completed
                    self.h.flush()
                    self.durable[:] = snapshot
                    self.since = {}
                    self.flushes += 1
                    self.ops_since_flush = 0
                    next_flush = rng.randint(6, 20)
                    hot = rng.sample(range(REGION_CHUNKS), 2)
        except nbd.Error as exc:
            self.stopped_by = exc
        except BaseException as exc:  # pragma: no cover - surfaced by the test
            self.error = exc

    def candidates(self, b):
        return [self.durable[b], *self.since.get(b, ())]


def check_after_crash(server, writer):
    h = server.connect("vol0")
    size = h.get_size()
    lost, eio = [], []
    for start in range(0, REGION_BLOCKS, 256):
        try:
            data = h.pread(256 * BLOCK, start * BLOCK)
            blocks = [data[i * BLOCK : (i + 1) * BLOCK] for i in range(256)]
        except nbd.Error:
            blocks = []
            for b in range(start, start + 256):
                try:
                    blocks.append(h.pread(BLOCK, b * BLOCK))
                except nbd.Error:
                    blocks.append(None)
        for i, got in enumerate(blocks):
            b = start + i
            if got is None:
                eio.append(b * BLOCK)
            elif got not in writer.candidates(b):
                lost.append((b * BLOCK, "flushed" if b not in writer.since else "unflushed"))
    assert not eio, f"reads failed (false checksum alarm?) at offsets {eio[:10]} ({len(eio)} blocks)"
    assert not lost, f"blocks read back neither flushed nor later data: {lost[:10]} ({len(lost)} blocks)"
    # The rest of the volume was never written: readable, and zeros.
    assert read_errors(h, 0, size) == []
    for o in range(REGION_CHUNKS * CHUNK, size, 8 * MiB):
        assert h.pread(8 * MiB, o) == bytes(8 * MiB)
    h.shutdown()


def test_kill9_mid_stream_keeps_flushed_data_and_raises_no_false_alarm(server, data_dir):
    rng = random.Random(1)
    # A known baseline over the whole region, flushed: the "old" content of every block.
    baseline = [rng.randbytes(BLOCK) for _ in range(REGION_BLOCKS)]
    h = server.connect("vol0")
    for c in range(REGION_CHUNKS):
        per = CHUNK // BLOCK
        h.pwrite(b"".join(baseline[c * per : (c + 1) * per]), c * CHUNK)
    h.flush()
    h.shutdown()
    durable = list(baseline)
    for iteration in range(2):
        writer = Writer(server, durable, seed=100 + iteration)
        writer.start()
        target = 2 + rng.randrange(3)
        wait_for(
            lambda: writer.error or writer.stopped_by
            or (writer.flushes >= target and writer.ops_since_flush >= 3),
            timeout=60, what="writer to flush and keep writing",
        )
        assert writer.error is None and writer.stopped_by is None, (writer.error, writer.stopped_by)
        assert server.kill9() == -9
        writer.join(30)
        assert not writer.is_alive()
        assert writer.error is None, writer.error
        assert writer.stopped_by is not None  # it was mid-stream
        assert writer.since, "no unflushed writes at the crash"
        if iteration == 0:
            # Offline first: scrub recovers the intent log itself and must find nothing.
            assert_scrub_clean(data_dir)
            server.start()
            check_after_crash(server, writer)
        else:
            server.start()
            check_after_crash(server, writer)
            assert server.stop() == 0
            assert_scrub_clean(data_dir)
            server.start()
        # Whatever survived is the new baseline.
        h = server.connect("vol0")
        durable[:] = [h.pread(BLOCK, b * BLOCK) for b in range(REGION_BLOCKS)]
        h.shutdown()


def test_no_false_checksum_alarm_beside_the_first_write_to_a_chunk(server, data_dir):
    h = server.connect("vol0")
    payload = os.urandom(BLOCK)
    h.pwrite(payload, 0)  # the first write ever to chunk 0: blocks 1.. of it are still holes
    assert h.pread(BLOCK, BLOCK) == bytes(BLOCK)
    assert h.pread(CHUNK, 0) == payload + bytes(CHUNK - BLOCK)
    h.pwrite(payload, CHUNK + 8 * BLOCK)  # chunk 1, not at its start
    assert h.pread(CHUNK, CHUNK) == bytes(8 * BLOCK) + payload + bytes(CHUNK - 9 * BLOCK)
    h.flush()
    h.shutdown()
    assert server.stop() == 0
    assert_scrub_clean(data_dir)


# ---- 2. corruption -----------------------------------------------------------------
def test_flipped_byte_is_eio_never_wrong_data_and_scrub_names_it(server, data_dir):
    rng = random.Random(2)
    data = rng.randbytes(2 * CHUNK)
    h = server.connect("vol0")
    h.pwrite(data, 0)
    h.flush()
    h.shutdown()
    assert server.stop() == 0
    bad_offset = 5 * BLOCK
    chunk = os.path.join(volume_dir(data_dir, "vol0"), f"{0:016x}.chunk")
    with open(chunk, "r+b") as f:
        f.seek(bad_offset + 17)
        old = f.read(1)
        f.seek(bad_offset + 17)
        f.write(bytes([old[0] ^ 0x5A]))
    server.start()
    h = server.connect("vol0")
    for length, offset in ((BLOCK, bad_offset), (512, bad_offset + 1024), (1, bad_offset + 17),
                           (64 * KiB, 0), (CHUNK, 0)):
        with pytest.raises(nbd.Error) as exc:
            h.pread(length, offset)
        assert exc.value.errnum == errno.EIO, (length, offset, exc.value)
    # Every other block still reads, correctly; the neighbours too.
    assert h.pread(bad_offset, 0) == data[:bad_offset]
    assert h.pread(CHUNK - bad_offset - BLOCK, bad_offset + BLOCK) == data[bad_offset + BLOCK : CHUNK]
    assert h.pread(CHUNK, CHUNK) == data[CHUNK:]
    # Still failing on a second read (not a one-off), and the connection survives.
    with pytest.raises(nbd.Error):
        h.pread(BLOCK, bad_offset)
    assert h.pread(BLOCK, 4 * BLOCK) == data[4 * BLOCK : 5 * BLOCK]
    h.shutdown()
    assert server.stop() == 0
    proc = scrub(data_dir)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert f"corrupt block at offset {bad_offset}\n" in proc.stdout
    assert proc.stdout.count("corrupt block at offset") == 1, proc.stdout[-2000:]
    proc = scrub(data_dir, json_out=True)
    assert proc.returncode == 1
    report = json.loads(proc.stdout)
    assert report["corrupt_offsets"] == [bad_offset]
    assert report["clean"] is False


# ---- 3. bad input ------------------------------------------------------------------
BAD_SIZES = [
    ("0", ()),
    ("-1", ()),
    ("4097", ("4096",)),
    ("1.5", ()),
    ("10XB", ()),
    ("abc", ()),
    ("", ()),
    ("9EiB", ("maximum",)),
    ("8EiB", ("maximum",)),
    ("1K", ("4096",)),
    ("1KB", ("4096",)),
    ("4KB", ("4096",)),
    ("1GB", ("1000001536",)),
    ("500GB", ("500000002048",)),
    ("8191", ("8192",)),
]
BAD_NAMES = ["Bad", "-x", "a/b", "", "a" * 64, "a b", ".hidden", "x\n"]
GOOD_SIZES = [("4K", 4096), ("8KiB", 8192), ("4096", 4096), ("1G", 1 << 30), ("1GiB", 1 << 30),
              ("1.5G", 3 << 29), ("16TiB", 16 << 40), ("1000001536", 1000001536), ("2M", 2 * MiB)]


def test_bad_input_is_exit_2_with_one_line_and_changes_nothing(cli, data_dir):
    cli("volume", "create", "keep", "--size", "1MiB", check=True)
    before = volume_list(data_dir)
    for size, needles in BAD_SIZES:
        proc = cli("volume", "create", "v", "--size", size)
        one_error_line(proc, 2, *needles)
    for name in BAD_NAMES:
        proc = cli("volume", "create", name, "--size", "1MiB")
        one_error_line(proc, 2)
    # Missing or unknown arguments are bad input too.
    one_error_line(cli("volume", "create", "v"), 2)
    one_error_line(cli("volume", "create", "v", "--size", "1M", "--bogus"), 2)
    one_error_line(cli("volume", "frobnicate"), 2)
    one_error_line(cli("serve", "--listen", "unix:", timeout=20), 2)
    one_error_line(cli("serve", "--listen", "127.0.0.1:notaport", timeout=20), 2)
    one_error_line(cli("serve", "--listen", "unix:/tmp/bd-never.sock", "--threads", "0", timeout=20), 2)
    one_error_line(cli("serve", "--listen", "unix:/tmp/bd-never.sock", "--cpu-policy", "fifo", timeout=20), 2)
    # No abbreviated flags: `--forc` is not --force.
    one_error_line(cli("volume", "delete", "keep", "--forc"), 2, "--forc")
    one_error_line(cli("status", "--metrics-url", "bogus"), 2, "--metrics-url")
    one_error_line(cli("status", "--interval", "0"), 2, "--interval")
    assert volume_list(data_dir) == before
    assert sorted(os.listdir(os.path.join(data_dir, "volumes"))) == []


def test_serve_refused_for_a_busy_port_leaves_no_data_dir_behind(tmp_path):
    import socket

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        port = busy.getsockname()[1]
        fresh = tmp_path / "never"
        for flag, value in (("--metrics", f"127.0.0.1:{port}"), ("--replication-listen", f"tcp://127.0.0.1:{port}")):
            proc = run_cli("serve", "--listen", f"unix:{tmp_path}/s.sock", flag, value, "--insecure-replication",
                           data_dir=fresh, timeout=20)
            one_error_line(proc, 1, str(port))
            assert not fresh.exists()
    finally:
        busy.close()


def test_sizes_and_names_that_are_valid(cli, data_dir):
    for i, (size, expected) in enumerate(GOOD_SIZES):
        cli("volume", "create", f"v{i}", "--size", size, check=True)
    name63 = "a" * 63
    cli("volume", "create", name63, "--size", "4096", check=True)
    cli("volume", "create", "0.a_b-c", "--size", "4096", check=True)
    sizes = {v["name"]: v["size"] for v in volume_list(data_dir)}
    assert sizes == {
        **{f"v{i}": expected for i, (_, expected) in enumerate(GOOD_SIZES)},
        name63: 4096,
        "0.a_b-c": 4096,
    }
    # The largest valid size is accepted, one block more is not.
    top = (2**63 - 1) // 4096 * 4096
    cli("volume", "create", "top", "--size", str(top), check=True)
    one_error_line(cli("volume", "create", "over", "--size", str(top + 4096)), 2, "maximum")
    assert {v["name"]: v["size"] for v in volume_list(data_dir)}["top"] == top


def test_refusals_are_exit_1(cli, data_dir):
    cli("volume", "create", "dup", "--size", "1MiB", check=True)
    before = volume_list(data_dir)
    one_error_line(cli("volume", "create", "dup", "--size", "1MiB"), 1, "dup")
    one_error_line(cli("volume", "create", "dup", "--size", "2MiB"), 1, "dup")
    for cmd in ("delete", "show", "scrub"):
        proc = run_cli(*(["volume", cmd] if cmd != "scrub" else ["scrub"]), "nosuch", data_dir=data_dir)
        one_error_line(proc, 1, "nosuch")
    assert volume_list(data_dir) == before


def test_data_dir_option_before_after_and_from_env(tmp_path):
    d = str(tmp_path / "dd")
    other = str(tmp_path / "other")
    env = dict(os.environ, BLOCKD_DATA_DIR=d)
    run_cli("volume", "create", "a", "--size", "1MiB", data_dir=d, check=True)  # before the subcommand
    run_cli("volume", "create", "b", "--size", "2MiB", "--data-dir", d, check=True)  # after
    run_cli("volume", "--data-dir", d, "create", "c", "--size", "3MiB", check=True)  # in between
    run_cli("volume", "create", "e", "--size", "4MiB", env=env, check=True)  # environment
    expected = {"a": 1 * MiB, "b": 2 * MiB, "c": 3 * MiB, "e": 4 * MiB}
    for args, kw in (
        (["volume", "list", "--json"], {"data_dir": d}),
        (["volume", "list", "--json", "--data-dir", d], {}),
        (["volume", "list", "--json"], {"env": env}),
        (["volume", "list", "--json"], {"data_dir": d, "env": dict(env, BLOCKD_DATA_DIR=other)}),
    ):
        proc = run_cli(*args, check=True, **kw)
        assert {v["name"]: v["size"] for v in json.loads(proc.stdout)} == expected, (args, kw)
    shown = json.loads(run_cli("volume", "show", "b", "--json", "--data-dir", d, check=True).stdout)
    assert shown["size"] == 2 * MiB
    assert not os.path.exists(other)


# ---- 4. one server per data dir ---------------------------------------------------------
def test_second_server_on_same_data_dir_is_refused(server, data_dir, sock_dir):
    h = server.connect("vol0")
    h.pwrite(b"first" * 100, 0)
    sock2 = os.path.join(sock_dir, "second.sock")
    t0 = time.monotonic()
    proc = run_cli("serve", "--listen", f"unix:{sock2}", data_dir=data_dir, timeout=30)
    assert time.monotonic() - t0 < 15
    line = one_error_line(proc, 1, os.path.abspath(data_dir))
    assert str(server.proc.pid) in line  # names the holder
    assert not os.path.exists(sock2)
    # The first keeps serving, on the old connection and on a new one.
    assert h.pread(500, 0) == b"first" * 100
    h2 = server.connect("vol0")
    assert h2.pread(500, 0) == b"first" * 100
    h2.shutdown()
    h.shutdown()
    assert server.proc.poll() is None
    # scrub goes through the running server's control socket instead of the data dir.
    out = scrub(data_dir)
    assert out.returncode == 0 and "clean" in out.stdout, out


# ---- 5. SIGTERM and kill -9 restarts --------------------------------------------------------
def test_sigterm_with_unflushed_writes_and_a_client_attached_exits_0_and_keeps_data(server, data_dir):
    data = os.urandom(3 * MiB + 5 * BLOCK)
    h = server.connect("vol0")
    h.pwrite(data, CHUNK - MiB)  # spans chunks 0 and 1, never flushed
    h.pwrite(b"tail", 64 * MiB - 4)
    # The client stays connected (as a kernel nbd client would): SIGTERM must still stop the server.
    assert server.stop(timeout=15) == 0
    server.start()
    h = server.connect("vol0")
    assert h.pread(len(data), CHUNK - MiB) == data
    assert h.pread(4, 64 * MiB - 4) == b"tail"
    h.shutdown()
    assert server.stop(timeout=15) == 0
    assert_scrub_clean(data_dir)


def test_sigterm_after_client_left_without_flush_keeps_data(server, data_dir):
    data = os.urandom(2 * MiB)
    h = server.connect("vol0")
    h.pwrite(data, 5 * MiB)
    h.shutdown()  # no flush
    assert server.stop(timeout=15) == 0
    assert_scrub_clean(data_dir)
    server.start()
    h = server.connect("vol0")
    assert h.pread(len(data), 5 * MiB) == data
    h.shutdown()


def test_kill9_then_restart_on_the_same_socket(server, data_dir):
    data = os.urandom(MiB)
    h = server.connect("vol0")
    h.pwrite(data, 0)
    h.flush()
    old_pid = server.proc.pid
    assert server.kill9() == -9
    assert os.path.exists(server.sock)  # left behind by the crash
    server.start()
    assert server.proc.pid != old_pid
    h = server.connect("vol0")
    assert h.pread(MiB, 0) == data
    h.shutdown()


# ---- 6. deleting ---------------------------------------------------------------------
def test_delete_refused_while_attached_then_frees_everything(server, cli, data_dir):
    data = os.urandom(2 * MiB)
    vdir = volume_dir(data_dir, "vol0")
    h = server.connect("vol0")
    h.pwrite(data, 0)
    h.flush()
    assert os.path.isdir(vdir)
    one_error_line(cli("volume", "delete", "vol0"), 1, "attached")
    assert [v["name"] for v in volume_list(data_dir)] == ["vol0"]
    assert h.pread(len(data), 0) == data  # the refused delete touched nothing
    h.shutdown()

    def deleted():
        proc = cli("volume", "delete", "vol0")
        if proc.returncode == 0:
            return True
        one_error_line(proc, 1, "attached")  # still detaching: nothing else may go wrong
        return False

    wait_for(deleted, timeout=30, what="vol0 to be detached and deleted")
    assert not os.path.exists(vdir)
    assert volume_list(data_dir) == []
    with pytest.raises(nbd.Error):
        server.connect("vol0")
    # Same name again: a new, empty volume; the old data does not come back.
    cli("volume", "create", "vol0", "--size", "64MiB", check=True)
    assert volume_dir(data_dir, "vol0") != vdir
    h = server.connect("vol0")
    assert h.pread(2 * MiB, 0) == bytes(2 * MiB)
    h.shutdown()


def test_volume_deleted_while_server_runs_cannot_be_attached(server, cli, data_dir):
    cli("volume", "create", "gone", "--size", "8MiB", check=True)
    cli("volume", "delete", "gone", check=True)
    with pytest.raises(nbd.Error):
        server.connect("gone")
    # Attached once, detached, deleted: also gone for good.
    cli("volume", "create", "once", "--size", "8MiB", check=True)
    h = server.connect("once")
    h.pwrite(b"x" * BLOCK, 0)
    h.shutdown()
    wait_for(lambda: cli("volume", "delete", "once").returncode == 0, timeout=30, what="delete of once")
    with pytest.raises(nbd.Error):
        server.connect("once")
    assert [v["name"] for v in volume_list(data_dir)] == ["vol0"]
    one_error_line(cli("volume", "delete", "once"), 1, "once")


# ---- 7. read-only data dir ------------------------------------------------------------
def tree(path):
    out = {}
    for root, dirs, files in os.walk(path):
        for name in dirs:
            out[os.path.relpath(os.path.join(root, name), path)] = "dir"
        for name in files:
            p = os.path.join(root, name)
            with open(p, "rb") as f:
                out[os.path.relpath(p, path)] = (os.stat(p).st_size, hashlib.sha256(f.read()).hexdigest())
    return out


def ext4_mount(mounts, tmp_path):
    img = tmp_path / "fs.img"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with open(img, "wb") as f:
        f.truncate(32 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], check=True, capture_output=True)
    mount("-o", "loop", str(img), str(mnt))
    mounts.append(str(mnt))
    return mnt


def test_read_only_data_dir_is_refused_clearly(mounts, server_factory, tmp_path, sock_dir):
    mnt = ext4_mount(mounts, tmp_path)
    data_dir = mnt / "data"
    run_cli("volume", "create", "vol0", "--size", "16MiB", data_dir=data_dir, check=True)
    server = server_factory(data_dir).start()
    data = os.urandom(MiB)
    h = server.connect("vol0")
    h.pwrite(data, 0)
    h.flush()
    h.shutdown()
    assert server.stop() == 0
    listed = volume_list(data_dir)
    before = tree(data_dir)
    mount("-o", "remount,ro", str(mnt))

    sock = os.path.join(sock_dir, "ro.sock")
    proc = run_cli("serve", "--listen", f"unix:{sock}", data_dir=data_dir, timeout=30)
    one_error_line(proc, 1, "read-only")
    assert str(data_dir) in proc.stderr
    assert not os.path.exists(sock)
    one_error_line(run_cli("volume", "create", "vol1", "--size", "1MiB", data_dir=data_dir), 1, "read-only")
    one_error_line(run_cli("volume", "delete", "vol0", data_dir=data_dir), 1)
    assert tree(data_dir) == before

    mount("-o", "remount,rw", str(mnt))
    assert volume_list(data_dir) == listed
    server.start()
    h = server.connect("vol0")
    assert h.pread(MiB, 0) == data
    h.shutdown()


def test_read_only_data_dir_can_still_be_listed(mounts, tmp_path):
    mnt = ext4_mount(mounts, tmp_path)
    data_dir = mnt / "data"
    run_cli("volume", "create", "vol0", "--size", "16MiB", data_dir=data_dir, check=True)
    listed = volume_list(data_dir)
    mount("-o", "remount,ro", str(mnt))
    # Listing and showing only read the catalog: they must work on a read-only data dir.
    proc = run_cli("volume", "list", "--json", data_dir=data_dir)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == listed
    proc = run_cli("volume", "show", "vol0", "--json", data_dir=data_dir)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["size"] == 16 * MiB


# ---- 8. disk full --------------------------------------------------------------------
def test_disk_full_is_enospc_and_the_server_recovers(mounts, server_factory, tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    mount("-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt))
    mounts.append(str(mnt))
    data_dir = mnt / "data"
    run_cli("volume", "create", "vol0", "--size", "1GiB", data_dir=data_dir, check=True)
    server = server_factory(data_dir).start()
    rng = random.Random(8)
    h = server.connect("vol0")
    written = []
    failure = None
    for i in range(64):
        piece = rng.randbytes(MiB)
        try:
            h.pwrite(piece, i * MiB)
        except nbd.Error as exc:
            failure = (i, exc)
            break
        written.append(piece)
    assert failure is not None, "64 MiB fit on a 24 MiB tmpfs?"
    failed_at, exc = failure
    assert exc.errnum == errno.ENOSPC, exc
    assert 8 <= failed_at <= 24, failed_at
    # Still serving: the same connection and a new one; earlier data intact (and verified).
    h2 = server.connect("vol0")
    for i, piece in enumerate(written):
        assert h2.pread(MiB, i * MiB) == piece, i
    assert h.pread(MiB, 0) == written[0]
    # The failed write may have landed partly: reading there must not fail.
    h2.pread(MiB, failed_at * MiB)
    # Free space, and writing works again.
    h2.trim(8 * MiB, 0)
    assert h2.pread(MiB, 0) == bytes(MiB)
    retry = rng.randbytes(MiB)
    h.pwrite(retry, failed_at * MiB)
    h.flush()
    assert h2.pread(MiB, failed_at * MiB) == retry
    for i in range(8, failed_at):
        assert h2.pread(MiB, i * MiB) == written[i], i
    h.shutdown()
    h2.shutdown()
    assert server.stop() == 0
    server.start()
    h = server.connect("vol0")
    assert h.pread(MiB, failed_at * MiB) == retry
    assert h.pread(MiB, 8 * MiB) == written[8]
    h.shutdown()
