"""Real, standard NBD clients against a real `blockd serve`.

fio (nbd ioengine), nbdfuse + loop + ext4, nbdinfo, qemu-io / qemu-img,
nbdcopy and plain libnbd.  Each test skips if its client is not installed.
"""

import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import threading

import pytest
from conftest import wait_for

pytestmark = pytest.mark.integration

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB


def need(*tools):
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")


def run(cmd, timeout=120, check=True, **kw):
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}\nstdout: {proc.stdout[-3000:]}\nstderr: {proc.stderr[-3000:]}")
    return proc


def volumes_usage(data_dir):
    """Physical bytes (st_blocks * 512) of every file under DATA_DIR/volumes/."""
    total = 0
    for root, _dirs, files in os.walk(os.path.join(str(data_dir), "volumes")):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


# ---- 1. fio, nbd ioengine -------------------------------------------------------


def _fio(server, *extra, expect_ok=True):
    cmd = [
        "fio",
        "--name=blockd",
        "--ioengine=nbd",
        f"--uri={server.uri('vol0')}",
        "--rw=randwrite",
        "--bssplit=4k/50:64k/50",
        "--size=8M",
        "--numjobs=4",
        "--offset_increment=8M",
        "--iodepth=8",
        "--verify=crc32c",
        "--randseed=1234",
        "--output-format=json",
        *extra,
    ]
    proc = run(cmd, timeout=120, check=False)
    if expect_ok:
        assert proc.returncode == 0, f"fio exited {proc.returncode}: {proc.stderr[-3000:]}\n{proc.stdout[-3000:]}"
    # fio prints "fio: connected to NBD server" lines before the JSON document.
    report = json.loads(proc.stdout[proc.stdout.index("{") :])
    jobs = report["jobs"]
    assert len(jobs) == 4, jobs
    if expect_ok:
        for job in jobs:
            assert job["error"] == 0, (job["jobname"], job["error"], proc.stderr)
        assert "verify" not in proc.stderr.lower(), proc.stderr
    return proc, jobs


def test_fio_nbd_engine_random_writes_verify(server):
    need("fio")
    _, jobs = _fio(server, "--do_verify=1")
    for job in jobs:
        assert job["write"]["io_bytes"] == 8 * MiB, job["write"]
        assert job["read"]["io_bytes"] == 8 * MiB, job["read"]  # the in-run verify read everything back
    # A fresh run, new connections: only read back and check every block's crc32c.
    _, jobs = _fio(server, "--verify_only=1")
    for job in jobs:
        assert job["read"]["io_bytes"] == 8 * MiB, job["read"]
    # The verify-only pass really reads through blockd: corrupt one block of
    # the third job's range and only that job fails.
    h = server.connect("vol0")
    try:
        h.pwrite(os.urandom(4096), 2 * 8 * MiB + 64 * KiB)
        h.flush()
    finally:
        h.shutdown()
    proc, jobs = _fio(server, "--verify_only=1", expect_ok=False)
    assert proc.returncode != 0
    assert [job["error"] != 0 for job in jobs] == [False, False, True, False], [j["error"] for j in jobs]


# ---- 2. nbdfuse + loop + ext4 --------------------------------------------------


@pytest.fixture
def fs_stack(tmp_path, data_dir, server_factory, cli):
    """nbdfuse exposing volume `fs` (256 MiB) as a file, attached to a loop device."""
    need("nbdfuse", "losetup", "mkfs.ext4", "e2fsck", "fusermount3", "mount", "umount")
    cli("volume", "create", "fs", "--size", "256MiB", check=True)
    srv = server_factory(data_dir).start()
    fuse_dir = tmp_path / "fuse"
    mnt = tmp_path / "mnt"
    fuse_dir.mkdir()
    mnt.mkdir()
    pidfile = tmp_path / "nbdfuse.pid"
    state = {"fuse": None, "loop": None, "mounted": False}
    try:
        state["fuse"] = subprocess.Popen(
            ["nbdfuse", "-P", str(pidfile), str(fuse_dir), srv.uri("fs")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

        def fuse_ready():
            if state["fuse"].poll() is not None:
                raise AssertionError(f"nbdfuse exited {state['fuse'].returncode}: {state['fuse'].stderr.read()}")
            return pidfile.exists() and os.path.ismount(fuse_dir)

        wait_for(fuse_ready, 30, what="nbdfuse mount")
        disk = fuse_dir / "nbd"
        assert os.path.getsize(disk) == 256 * MiB
        state["loop"] = run(["losetup", "-f", "--show", disk]).stdout.strip()
        assert state["loop"].startswith("/dev/loop")

        def mount():
            run(["mount", "-t", "ext4", state["loop"], mnt])
            state["mounted"] = True

        def umount():
            run(["umount", mnt])
            state["mounted"] = False

        yield {"loop": state["loop"], "mnt": mnt, "mount": mount, "umount": umount, "server": srv, "data_dir": data_dir}
    finally:
        if state["mounted"]:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        if state["loop"]:
            subprocess.run(["losetup", "-d", state["loop"]], capture_output=True)
        if state["fuse"] is not None:
            subprocess.run(["fusermount3", "-u", str(fuse_dir)], capture_output=True)
            try:
                state["fuse"].wait(30)
            except subprocess.TimeoutExpired:
                subprocess.run(["fusermount3", "-uz", str(fuse_dir)], capture_output=True)
                state["fuse"].kill()
                state["fuse"].wait()
            state["fuse"].stderr.close()


def test_ext4_on_nbdfuse_loop(fs_stack):
    loop, mnt = fs_stack["loop"], fs_stack["mnt"]
    run(["mkfs.ext4", "-q", "-F", loop], timeout=120)
    fs_stack["mount"]()
    rng = random.Random(42)
    manifest = {}
    for i in range(20):
        size = rng.choice([0, 1, 4095, 4096, 4097]) if i < 5 else rng.randrange(1, 768 * KiB)
        data = rng.randbytes(size)
        sub = mnt / f"d{i % 3}"
        sub.mkdir(exist_ok=True)
        path = sub / f"f{i:02d}.bin"
        path.write_bytes(data)
        manifest[str(path.relative_to(mnt))] = hashlib.sha256(data).hexdigest()
    os.sync()
    fs_stack["umount"]()
    fsck = run(["e2fsck", "-fn", loop], check=False, timeout=120)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    # Drop whatever the loop device caches so the second mount reads through blockd.
    run(["blockdev", "--flushbufs", loop], check=False)
    fs_stack["mount"]()
    found = {}
    for root, _dirs, files in os.walk(mnt):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, mnt)] = hashlib.sha256(f.read()).hexdigest()
    assert found == manifest
    fs_stack["umount"]()
    # The filesystem really lives in blockd: the ext4 superblock magic, read over a fresh connection.
    h = fs_stack["server"].connect("fs")
    try:
        assert h.pread(2, 1024 + 56) == b"\x53\xef"
    finally:
        h.shutdown()
    assert volumes_usage(fs_stack["data_dir"]) > 4 * MiB  # ~7 MiB of file data plus ext4 metadata


# ---- 3. nbdinfo --map ----------------------------------------------------------


def _nbdinfo_map(uri):
    out = run(["nbdinfo", "--map", uri]).stdout
    runs = []
    for line in out.splitlines():
        m = re.match(r"\s*(\d+)\s+(\d+)\s+(\d+)\s+(.*)$", line)
        assert m, f"unexpected nbdinfo --map line: {line!r}\n{out}"
        runs.append((int(m.group(1)), int(m.group(2)), int(m.group(3)), m.group(4).strip()))
    return runs, out


def _types_over(runs, offset, length):
    """The (type, description) of every map run overlapping [offset, offset+length)."""
    return {(t, d) for start, n, t, d in runs if start < offset + length and start + n > offset}


def test_nbdinfo_map_shows_holes_and_data(server):
    need("nbdinfo")
    h = server.connect("vol0")
    try:
        h.pwrite(os.urandom(8 * MiB), 0)
        h.trim(1 * MiB, 1 * MiB)  # count, offset
        h.zero(2 * MiB, 4 * MiB)
        h.flush()
    finally:
        h.shutdown()
    runs, out = _nbdinfo_map(server.uri("vol0"))
    # The map covers the whole export, contiguously.
    assert runs[0][0] == 0
    for (s1, n1, _, _), (s2, _, _, _) in zip(runs, runs[1:]):
        assert s1 + n1 == s2, out
    assert runs[-1][0] + runs[-1][1] == 64 * MiB, out
    assert _types_over(runs, 0, 1 * MiB) == {(0, "data")}, out
    assert _types_over(runs, 1 * MiB, 1 * MiB) == {(3, "hole,zero")}, out
    assert _types_over(runs, 4 * MiB, 2 * MiB) == {(3, "hole,zero")}, out
    assert _types_over(runs, 2 * MiB, 2 * MiB) == {(0, "data")}, out
    assert _types_over(runs, 6 * MiB, 2 * MiB) == {(0, "data")}, out
    assert _types_over(runs, 8 * MiB, 56 * MiB) == {(3, "hole,zero")}, out


# ---- 4. qemu-io / qemu-img -----------------------------------------------------


def _qemu_io(uri, *commands):
    cmd = ["qemu-io", "-f", "raw", uri]
    for c in commands:
        cmd += ["-c", c]
    proc = run(cmd, check=False, timeout=60)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text
    assert "Pattern verification failed" not in text, text
    assert "error" not in text.lower() and "failed" not in text.lower(), text
    return text


def test_qemu_io_patterns(server, tmp_path):
    need("qemu-io", "qemu-img")
    uri = server.uri("vol0")
    _qemu_io(uri, "write -P 0xab 0 1M", "read -P 0xab 0 1M")
    # Unaligned, straddling blocks and a chunk boundary (4 MiB).
    _qemu_io(
        uri,
        "write -P 0x5c 4097 10000",
        "write -P 0x77 4194000 1000",
        "flush",
    )
    _qemu_io(
        uri,
        "read -P 0xab 0 4097",
        "read -P 0x5c 4097 10000",
        "read -P 0xab 14097 1034479",
        "read -P 0x00 1M 3145424",
        "read -P 0x77 4194000 1000",
        "read -P 0x00 4195000 1000",
    )
    # qemu-io really checks: a wrong pattern is reported.
    proc = run(["qemu-io", "-f", "raw", uri, "-c", "read -P 0xab 4097 16"], check=False)
    assert "Pattern verification failed" in proc.stdout + proc.stderr

    # qemu-img compare against a local image with the same content, then one that differs.
    model = bytearray(64 * MiB)
    model[0 : 1 * MiB] = b"\xab" * MiB
    model[4097 : 4097 + 10000] = b"\x5c" * 10000
    model[4194000 : 4194000 + 1000] = b"\x77" * 1000
    same = tmp_path / "same.raw"
    same.write_bytes(model)
    proc = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", same, uri], check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    model[5 * MiB + 3] = 1
    differs = tmp_path / "differs.raw"
    differs.write_bytes(model)
    proc = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", differs, uri], check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr

    # qemu-img map: the written head is data, the untouched tail reads as zero.
    proc = run(["qemu-img", "map", "--output=json", "-f", "raw", uri])
    extents = json.loads(proc.stdout)
    assert sum(e["length"] for e in extents) == 64 * MiB
    head = [e for e in extents if e["start"] == 0][0]
    assert head["data"] is True and head["zero"] is False, extents
    tail = [e for e in extents if e["start"] <= 32 * MiB < e["start"] + e["length"]][0]
    assert tail["zero"] is True and tail["data"] is False, extents


# ---- 5. nbdcopy ----------------------------------------------------------------


def test_nbdcopy_round_trip(data_dir, server_factory, cli, tmp_path):
    need("nbdcopy")
    cli("volume", "create", "copy", "--size", "16MiB", check=True)
    srv = server_factory(data_dir).start()
    rng = random.Random(5)
    data = bytearray(rng.randbytes(16 * MiB))
    data[3 * MiB : 5 * MiB] = bytes(2 * MiB)  # zeros: nbdcopy sends these as zero requests
    data[9 * MiB + 100 : 9 * MiB + 70000] = bytes(69900)  # unaligned zero run
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    run(["nbdcopy", "--flush", src, srv.uri("copy")], timeout=120)
    dst = tmp_path / "dst.bin"
    run(["nbdcopy", srv.uri("copy"), dst], timeout=120)
    back = dst.read_bytes()
    assert len(back) == len(data)
    assert hashlib.sha256(back).digest() == hashlib.sha256(data).digest()
    # Also via a fresh libnbd connection, one piece that nbdcopy wrote as zeros.
    h = srv.connect("copy")
    try:
        assert h.pread(2 * MiB, 3 * MiB) == bytes(2 * MiB)
        assert h.pread(4096, 15 * MiB) == bytes(data[15 * MiB : 15 * MiB + 4096])
    finally:
        h.shutdown()


# ---- 6. thin provisioning ------------------------------------------------------


def test_thin_provisioning_one_tib(data_dir, server_factory, cli):
    cli("volume", "create", "thin", "--size", "1TiB", check=True)
    srv = server_factory(data_dir).start()
    h = srv.connect("thin")
    try:
        assert h.get_size() == TiB
        base = volumes_usage(data_dir)
        piece = os.urandom(4 * MiB)
        for i in range(16):
            h.pwrite(piece, i * 4 * MiB)
        h.flush()
        seq = volumes_usage(data_dir)
        print(f"\nthin: baseline {base} B; after 64 MiB sequential write {seq / MiB:.2f} MiB")
        assert 64 * MiB <= seq < 80 * MiB, seq
        assert h.pread(4096, 63 * MiB) == piece[3 * MiB : 3 * MiB + 4096]

        h.trim(64 * MiB, 0)
        h.flush()
        trimmed = volumes_usage(data_dir)
        print(f"thin: after trim of the 64 MiB {trimmed / KiB:.1f} KiB")
        assert trimmed < 1 * MiB, trimmed
        assert h.pread(4096, 0) == bytes(4096)
    finally:
        h.shutdown()

    # 16384 scattered 4 KiB writes across the whole TiB, over 4 connections.
    rng = random.Random(99)
    blocks = rng.sample(range(TiB // 4096), 16384)
    payload = os.urandom(16384 * 4096)
    errors = []

    def writer(part):
        hh = srv.connect("thin")
        try:
            for k in range(part, len(blocks), 4):
                hh.pwrite(payload[k * 4096 : (k + 1) * 4096], blocks[k] * 4096)
            hh.flush()
        except Exception as exc:  # reported below
            errors.append(exc)
        finally:
            hh.shutdown()

    threads = [threading.Thread(target=writer, args=(p,)) for p in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    written = len(blocks) * 4096
    used = volumes_usage(data_dir) - trimmed
    ratio = used / written
    print(f"thin: scattered 4 KiB writes: written {written / MiB:.0f} MiB, physical +{used / MiB:.1f} MiB, ratio {ratio:.2f}x")
    h = srv.connect("thin")
    try:
        for k in rng.sample(range(len(blocks)), 64):
            assert h.pread(4096, blocks[k] * 4096) == payload[k * 4096 : (k + 1) * 4096]
    finally:
        h.shutdown()
    # Each lonely 4 KiB block costs its data page plus one 4 KiB page of
    # checksums (zero pages of the checksum file are holes): 2x is the floor
    # of a page-granular sidecar; anything well above it is a regression.
    assert ratio < 2.2, f"thin overhead {ratio:.2f}x for scattered 4 KiB writes"


# ---- 7. multi-connection -------------------------------------------------------


def test_multi_conn_write_one_flush_other(server):
    h1 = server.connect("vol0")
    h2 = server.connect("vol0")
    try:
        assert h1.can_multi_conn() and h2.can_multi_conn()
        a = os.urandom(1 * MiB + 3)
        h1.pwrite(a, 4 * MiB - 5)
        h2.flush()
        assert h1.pread(len(a), 4 * MiB - 5) == a
        assert h2.pread(len(a), 4 * MiB - 5) == a
        b = os.urandom(9000)
        h2.pwrite(b, 100)
        h1.flush()
        assert h1.pread(9000, 100) == b
        assert h2.pread(9000, 100) == b
        # Zero on one connection is seen by the other.
        h2.pwrite(os.urandom(64 * KiB), 20 * MiB)
        h1.zero(64 * KiB, 20 * MiB)
        assert h2.pread(64 * KiB, 20 * MiB) == bytes(64 * KiB)
    finally:
        h1.shutdown()
        h2.shutdown()
    # After a crash and restart the flushed data is still there, checksums intact.
    server.kill9()
    server.start()
    h = server.connect("vol0")
    try:
        assert h.pread(len(a), 4 * MiB - 5) == a
        assert h.pread(9000, 100) == b
    finally:
        h.shutdown()


def test_many_chunks_written_between_flushes_under_default_fd_limit(data_dir, server_factory, cli):
    """A guest that touches more chunks between flushes than the usual 1024-descriptor limit."""
    import resource

    cli("volume", "create", "wide", "--size", "1TiB", check=True)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))  # inherited by the server
    try:
        srv = server_factory(data_dir).start()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    h = srv.connect("wide")
    try:
        chunks = random.Random(8).sample(range(TiB // (4 * MiB)), 1500)
        for c in chunks:
            h.pwrite(c.to_bytes(8, "little") * 512, c * 4 * MiB)
        h.flush()
        for c in chunks[::50]:
            assert h.pread(4096, c * 4 * MiB) == c.to_bytes(8, "little") * 512
    finally:
        h.shutdown()
