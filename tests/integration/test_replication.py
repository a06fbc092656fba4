"""Replication between real `blockd serve` processes on loopback: real ZeroMQ, CURVE, SIGKILL.

Each node has its own data dir, key dir, NBD unix socket and replication
port.  Ack deadlines are set short (1 s) so failures are detected quickly.
"""

import json
import os
import shutil
import subprocess
import threading
import time

import nbd
import pytest
import zmq

from blockd import keys as keyfiles
from blockd import replproto as rp
from conftest import Server, control, free_port, js, run_cli, wait_for

MiB = 1 << 20
CHUNK = 4 * MiB
ACK = "1"






class Node:
    def __init__(self, root, sock_dir, name):
        self.name = name
        self.data = os.path.join(root, f"data-{name}")
        self.key_dir = os.path.join(root, f"keys-{name}")
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        run_cli("keys", "generate", "--key-dir", self.key_dir, check=True)
        self.public = keyfiles.load_public(self.key_dir)
        run_cli("volume", "create", f"local-{name}", "--size", "1MiB", data_dir=self.data, check=True)
        self.server = Server(self.data, os.path.join(sock_dir, f"{name}.sock"), extra=[
            "--key-dir", self.key_dir, "--replication-listen", self.address, "--ack-timeout", ACK,
            "--heartbeat", "0.2", "--write-timeout", "60",
        ])

    def cli(self, *args, **kw):
        return run_cli(*args, data_dir=self.data, **kw)

    def start(self):
        self.server.start()
        return self

    def connect(self, volume):
        return self.server.connect(volume)


@pytest.fixture
def cluster(tmp_path, sock_dir):
    nodes = []

    def make(n):
        made = [Node(str(tmp_path), sock_dir, name) for name in "abc"[:n]]
        for node in made:
            for other in made:
                if other is not node:
                    node.cli("peer", "add", other.name, other.address, "--public-key", other.public, check=True)
        nodes.extend(made)
        return made

    yield make
    for node in nodes:
        node.server.stop(9)


def replication(node, volume):
    return js(node.cli("volume", "show", volume, "--json"))["replication"]


def wait_in_sync(node, volume, timeout=60):
    def ok():
        peers = replication(node, volume)["peers"]
        return all(p["state"] == "in_sync" and not p.get("resync_remaining_chunks") for p in peers.values())

    wait_for(ok, timeout, interval=0.1, what=f"{volume} in sync on every peer")


def start_in_sync(primary, replicas, volume, chunks, nbytes):
    """Start the replicas, then the primary; write ``nbytes`` of random data at the start of each of
    the first ``chunks`` chunks, flush, wait until every peer is in sync; the open handle."""
    for node in replicas:
        node.start()
    primary.start()
    h = primary.connect(volume)
    for c in range(chunks):
        h.pwrite(os.urandom(nbytes), c * CHUNK)
    h.flush()
    wait_in_sync(primary, volume)
    return h


def verify(node, volume):
    out = node.cli("verify", volume, "--json", timeout=300)
    assert out.returncode in (0, 1), out.stderr
    return json.loads(out.stdout)


def test_fio_verify_through_the_primary_then_copies_are_identical(cluster):
    if shutil.which("fio") is None:
        pytest.skip("fio not installed")
    a, b = cluster(2)
    a.cli("volume", "create", "v", "--size", "64MiB", "--replica", "b", check=True)
    b.start()
    a.start()
    hold = a.connect("v")
    proc = subprocess.run(
        ["fio", "--name=r", "--ioengine=nbd", f"--uri={a.server.uri('v')}", "--rw=randwrite",
         "--bssplit=4k/60:64k/30:1m/10", "--size=48M", "--iodepth=16", "--numjobs=2", "--offset_increment=16M",
         "--verify=crc32c", "--randseed=7", "--verify_state_save=0", "--output-format=json"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    # Overlapping writes from many threads at once: the same order on both copies.
    errors = []

    def writer(seed):
        h = a.connect("v")
        try:
            for i in range(60):
                off = ((seed * 7919 + i * 104729) % 64) * 4096 + 8 * MiB
                h.pwrite(bytes([seed + i & 0xFF]) * 12288, off)
        except Exception as exc:  # reported below
            errors.append(exc)
        finally:
            h.shutdown()

    threads = [threading.Thread(target=writer, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    hold.trim(2 * MiB, 20 * MiB)
    hold.zero(1 * MiB, 30 * MiB + 512)
    hold.flush()
    result = verify(a, "v")
    assert result["identical"] and result["differences"] == {"b": []}
    assert "v" not in [v["name"] for v in js(b.cli("volume", "list", "--json")) if v["role"] != "replica"]
    with pytest.raises(nbd.Error):  # a replica is not an export on its node
        b.connect("v")
    hold.shutdown()


def test_replica_killed_with_2_of_2_writes_wait_then_resync_only_dirty_chunks(cluster):
    a, b = cluster(2)
    a.cli("volume", "create", "v", "--size", "1GiB", "--replica", "b", check=True)
    b.start()
    a.start()
    h = a.connect("v")
    for i in range(64):  # 256 MiB across 64 chunks, in sync
        h.pwrite(os.urandom(64 * 1024), i * CHUNK)
    h.flush()
    wait_in_sync(a, "v")
    b.server.kill9()
    done = threading.Event()
    error = []

    def blocked_write():
        try:
            h.pwrite(b"W" * 4096, 5 * CHUNK + 4096)  # needs 2 copies: waits for b
        except Exception as exc:
            error.append(exc)
        done.set()

    t = threading.Thread(target=blocked_write)
    t.start()
    assert not done.wait(3.0)  # never acknowledged with one copy
    state = replication(a, "v")["peers"]["b"]
    assert state["state"] == "out_of_sync"
    b.start()
    assert done.wait(60) and not error
    t.join()
    wait_in_sync(a, "v")
    st = replication(a, "v")["peers"]["b"]
    assert st["resynced_bytes"] <= 2 * CHUNK  # the dirty chunk, not the 1 GiB volume
    h2 = a.connect("v")
    h2.pwrite(b"after" * 1000, 700 * MiB)
    h2.flush()
    assert verify(a, "v")["identical"]
    h.shutdown()
    h2.shutdown()


def test_three_copies_two_required_writes_continue_without_one(cluster):
    a, b, c = cluster(3)
    a.cli("volume", "create", "v", "--size", "256MiB", "--replica", "b", "--replica", "c", "--min-copies", "2",
          check=True)
    b.start()
    c.start()
    a.start()
    h = a.connect("v")
    h.pwrite(os.urandom(CHUNK), 0)
    h.flush()
    wait_in_sync(a, "v")
    c.server.kill9()
    t0 = time.monotonic()
    for i in range(20):
        h.pwrite(os.urandom(65536), 8 * MiB + i * 65536)
    h.flush()
    assert time.monotonic() - t0 < 30  # a and b suffice: no waiting for c
    wait_for(lambda: replication(a, "v")["peers"]["c"]["state"] == "out_of_sync", 30, what="c's ack deadline")
    peers = replication(a, "v")["peers"]
    assert peers["b"]["state"] == "in_sync"
    assert peers["c"]["resync_remaining_chunks"] >= 1
    c.start()
    wait_in_sync(a, "v")
    result = verify(a, "v")
    assert result["identical"] and set(result["differences"]) == {"b", "c"}
    h.shutdown()


def test_min_copies_1_is_the_explicit_choice_to_continue_alone(cluster):
    a, b = cluster(2)
    a.cli("volume", "create", "v", "--size", "64MiB", "--replica", "b", check=True)
    b.start()
    a.start()
    h = a.connect("v")
    h.pwrite(b"x" * 4096, 0)
    h.flush()
    b.server.kill9()
    wait_for(lambda: replication(a, "v")["peers"]["b"]["state"] == "out_of_sync", 30, what="b missed")
    a.cli("volume", "set", "v", "--min-copies", "1", check=True)
    t0 = time.monotonic()
    for i in range(16):  # writes to chunks b has not seen touched: every one must reach it by resync
        h.pwrite(bytes([i + 1]) * 4096, i * CHUNK + 4096)
    h.flush()
    assert time.monotonic() - t0 < 10
    assert replication(a, "v")["min_copies"] == 1
    assert replication(a, "v")["peers"]["b"]["resync_remaining_chunks"] == 16
    bad = a.cli("volume", "set", "v", "--min-copies", "3")
    assert bad.returncode == 2 and "2 copies" in bad.stderr
    b.start()
    wait_in_sync(a, "v")
    assert verify(a, "v")["identical"]
    h.shutdown()


def test_write_fails_with_eio_after_the_write_timeout(cluster):
    a, b = cluster(2)
    a.server.extra[a.server.extra.index("--write-timeout") + 1] = "2"
    a.cli("volume", "create", "v", "--size", "64MiB", "--replica", "b", check=True)
    b.start()
    a.start()
    h = a.connect("v")
    h.pwrite(b"ok" * 2048, 0)
    b.server.kill9()
    t0 = time.monotonic()
    with pytest.raises(nbd.Error) as err:
        h.pwrite(b"z" * 4096, 4096)  # 2 of 2 required: never acknowledged with one
    assert err.value.errno == "EIO" and time.monotonic() - t0 >= 2
    assert h.pread(4096, 0) == b"ok" * 2048  # reads go on
    h.shutdown()
    # A primary restarted while no peer answers cannot know it is still the primary: read-only.
    a.server.stop()
    a.start()
    h = a.connect("v")
    assert h.pread(4096, 0) == b"ok" * 2048
    with pytest.raises(nbd.Error) as err:
        h.pwrite(b"z" * 4096, 4096)
    assert err.value.errno in ("EPERM", "EROFS")  # NBD has no EROFS: nbdkit sends it as EPERM
    assert replication(a, "v")["confirmed"] is False
    h.shutdown()


def _raw_dealer(node, keys_from):
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    if keys_from is not None:
        public, secret = keyfiles.load(keys_from.key_dir)
        s.curve_publickey, s.curve_secretkey = public, secret
    else:
        s.curve_publickey, s.curve_secretkey = zmq.curve_keypair()
    s.curve_serverkey = node.public.encode()
    s.connect(node.address)
    return s


def _ask(sock, frames, timeout=3000):
    sock.send_multipart(frames)
    if not sock.poll(timeout):
        return None
    return rp.decode(sock.recv_multipart())


def test_hostile_messages_are_refused_and_the_sink_survives(cluster):
    a, b = cluster(2)
    a.cli("volume", "create", "v", "--size", "64MiB", "--replica", "b", check=True)
    b.start()
    a.start()
    h = a.connect("v")
    h.pwrite(b"good" * 1024, 0)
    h.flush()
    wait_in_sync(a, "v")
    repl_id = replication(a, "v")["repl_id"]
    s = _raw_dealer(b, keys_from=a)
    header = rp.HEADER.pack
    cases = [
        [b"short"],
        [b"x" * 40, b"", b""],
        [header(9, rp.WRITE, 0, repl_id, 1, 1, 0, 4096), b"", b""],  # wrong version
        [header(1, 77, 0, repl_id, 1, 1, 0, 0), b"", b""],  # unknown type
        [header(1, rp.WRITE, 0, repl_id, 1, 1, 0, 4096), bytes(8), bytes(100)],  # truncated data
        [header(1, rp.WRITE, 0, repl_id, 1, 1, 0, 4096), bytes(8), bytes(4096)],  # wrong checksum: corrupt
        [header(1, rp.WRITE, 0, repl_id, 0, 1, 0, 4096), b"", bytes(4096)],  # bad sums frame
        [header(1, rp.WRITE, 0, 12345, 1, 1, 0, 4096), bytes(8), bytes(4096)],  # unknown volume (and corrupt)
    ]
    for frames in cases:
        reply = _ask(s, frames)
        assert reply is not None and reply.type == rp.NACK, frames[0][:8]
    # A correct checksum but a stale epoch (the replica is at epoch 1): fencing refuses it.
    from blockd import checksum
    import numpy as np

    data = np.full(4096, 0xEE, dtype=np.uint8)
    sums = np.empty(1, dtype=np.uint64)
    checksum.hash_blocks(data, sums)
    stale = _ask(s, [header(1, rp.WRITE, 0, repl_id, 0, 99, 0, 4096), sums.tobytes(), data.tobytes()])
    assert stale.type == rp.NACK and stale.json()["code"] == "stale_epoch"
    # An unknown CURVE key gets no answer at all, and is counted.
    stranger = _raw_dealer(b, keys_from=None)
    assert _ask(stranger, rp.encode(rp.Message(rp.HEARTBEAT, seq=1)), timeout=1500) is None
    sink = js(b.cli("volume", "list", "--json"))  # the sink's node still answers its CLI
    assert sink is not None
    status = control(b.data, {"op": "sink"})
    assert status["refused"].get("unknown_key", 0) >= 1
    assert status["refused"].get("corrupt", 0) >= 1 and status["refused"].get("stale_epoch", 0) >= 1
    assert status["refused"].get("malformed", 0) >= 4
    # Nothing changed the replica: the copies are still identical, and writes still replicate.
    assert h.pread(4096, 0) == b"good" * 1024
    h.pwrite(b"more" * 1024, 4096)
    h.flush()
    assert verify(a, "v")["identical"]
    h.shutdown()




def test_refusals_for_replication_setup(tmp_path):
    d = tmp_path / "d"
    assert run_cli("volume", "create", "v", "--size", "1GiB", "--replica", "ghost", data_dir=d).returncode == 1
    bad = run_cli("peer", "add", "p", "http://x:1", "--public-key", "x" * 40, data_dir=d)
    assert bad.returncode == 2 and "tcp://HOST:PORT" in bad.stderr
    bad = run_cli("peer", "add", "p", "tcp://127.0.0.1:9", "--public-key", "short", data_dir=d)
    assert bad.returncode == 2 and "public key" in bad.stderr
    key_dir = tmp_path / "k"
    made = run_cli("keys", "generate", "--key-dir", key_dir)
    assert made.returncode == 0 and made.stdout.strip() == keyfiles.load_public(str(key_dir))
    assert len(made.stdout.splitlines()) == 1 and str(key_dir) in made.stderr  # scripts take stdout
    assert oct(os.stat(key_dir / "node.secret").st_mode & 0o777) == "0o600"
    again = run_cli("keys", "generate", "--key-dir", key_dir)
    assert again.returncode == 1 and "--force" in again.stderr
    pub = run_cli("keys", "show", "--key-dir", key_dir).stdout.strip()
    assert run_cli("peer", "add", "p", "tcp://127.0.0.1:9", "--public-key", pub, data_dir=d).returncode == 0
    assert run_cli("peer", "add", "p", "tcp://127.0.0.1:9", "--public-key", pub, data_dir=d).returncode == 1
    bad = run_cli("volume", "create", "v", "--size", "1GiB", "--replica", "p", "--min-copies", "3", data_dir=d)
    assert bad.returncode == 2 and "min-copies" in bad.stderr
    assert run_cli("volume", "list", "--json", data_dir=d).stdout.strip() == "[]"
    nokeys = run_cli("serve", "--listen", f"unix:{tmp_path}/s.sock", "--replication-listen", "tcp://127.0.0.1:9",
                     "--key-dir", tmp_path / "none", data_dir=d)
    assert nokeys.returncode == 1 and "keys generate" in nokeys.stderr


def _flip(node, volume, offset):
    vol_id = js(node.cli("volume", "show", volume, "--json"))["id"]
    chunk, within = divmod(offset, CHUNK)
    path = os.path.join(node.data, "volumes", str(vol_id), f"{chunk:016x}.chunk")
    fd = os.open(path, os.O_RDWR)
    try:
        b = os.pread(fd, 1, within)
        os.pwrite(fd, bytes([b[0] ^ 0x40]), within)
    finally:
        os.close(fd)


def test_a_rotten_block_on_a_replica_is_found_by_scrub_there_and_the_copy_rebuilt(cluster):
    """From a black-box run: scrub refused a replica copy, and verify (stored checksums) cannot see rot
    there.  Now scrub checks the copy in place on its node; --repair is refused there (one line, saying
    how to rebuild); dropping the copy makes its primary resync it whole."""
    a, b = cluster(2)
    a.cli("volume", "create", "v", "--size", "16MiB", "--replica", "b", check=True)
    h = start_in_sync(a, [b], "v", 2, 64 * 1024)
    _flip(b, "v", CHUNK + 8192 + 5)
    scrubbed = b.cli("scrub", "v", "--json")
    out = json.loads(scrubbed.stdout)
    assert scrubbed.returncode == 1 and out["online"] and not out["clean"], scrubbed
    assert out["corrupt_offsets"] == [CHUNK + 8192], out
    refused = b.cli("scrub", "v", "--repair")
    assert refused.returncode == 1 and len(refused.stderr.splitlines()) == 1 and "delete v --force" in refused.stderr
    assert verify(a, "v")["identical"]  # stored checksums agree: only a read of the data sees the rot
    dropped = js(b.cli("volume", "delete", "v", "--force", "--json", check=True))
    assert dropped["deleted"] and dropped["connections_cut"] == 0  # the sink's hold is not a client
    h.pwrite(b"after" * 819 + b"!", 0)  # refused on b (no copy): a makes it anew and resyncs it whole
    h.flush()
    wait_for(lambda: replication(a, "v")["peers"]["b"].get("resynced_bytes", 0) >= 2 * 64 * 1024, 60,
             interval=0.1, what="a full resync of b")
    wait_in_sync(a, "v")
    assert verify(a, "v")["identical"]
    assert js(b.cli("scrub", "v", "--json"))["clean"]
    h.shutdown()
    assert b.server.stop() == 0
    offline = js(b.cli("scrub", "v", "--json"))  # no server on b: the copy is checked offline too
    assert offline["clean"] and not offline["online"] and offline["scanned_bytes"] > 0


def test_read_repair_and_scrub_repair_from_the_replica(cluster):
    a, b = cluster(2)
    a.cli("volume", "create", "v", "--size", "64MiB", "--replica", "b", check=True)
    b.start()
    a.start()
    h = a.connect("v")
    data = os.urandom(CHUNK)
    h.pwrite(data, 0)
    h.flush()
    wait_in_sync(a, "v")
    _flip(a, "v", 8192 + 17)
    assert h.pread(4096, 8192) == data[8192:12288]  # correct data, via the replica
    assert h.pread(CHUNK, 0) == data
    status = js(a.cli("volume", "show", "v", "--json"))
    assert status["replication"]["peers"]["b"]["state"] == "in_sync"
    # The local block was rewritten: a scrub of the primary finds nothing.
    clean = js(a.cli("scrub", "v", "--json"))
    assert clean["clean"]
    # scrub --repair fixes blocks nobody read.
    _flip(a, "v", 3 * 4096 + 5)
    _flip(a, "v", 100 * 4096 + 5)
    out = a.cli("scrub", "v", "--repair", "--json")
    res = json.loads(out.stdout)
    assert out.returncode == 0 and res["corrupt_offsets"] == [3 * 4096, 100 * 4096]
    assert res["repaired_offsets"] == res["corrupt_offsets"]
    assert js(a.cli("scrub", "v", "--json"))["clean"]
    assert verify(a, "v")["identical"]
    h.shutdown()


def test_a_rotten_checksum_entry_on_the_primary_is_repaired_from_the_replica(cluster):
    """From a black-box run: a flipped byte in the primary's checksums file (its data intact) gave EIO on
    every read of that block, and scrub --repair could not fix it: the replica's block was accepted only
    if it matched the rotten checksum.  Now a replica block equal to the data on disk here is taken; and
    where data and checksum both rotted, an in-sync replica's block its own checksum vouches for, once
    every write sent to it was answered."""
    a, b = cluster(2)
    a.cli("volume", "create", "v", "--size", "64MiB", "--replica", "b", check=True)
    data = os.urandom(2 * CHUNK)
    start_in_sync(a, [b], "v", 0, 0).shutdown()
    h = a.connect("v")
    h.pwrite(data, 0)
    h.flush()
    wait_in_sync(a, "v")
    h.shutdown()
    assert a.server.stop() == 0  # the sums are cached while it runs: rot them at rest
    vol_id = js(a.cli("volume", "show", "v", "--json"))["id"]
    sums = os.path.join(a.data, "volumes", str(vol_id), "checksums")
    blocks_per_chunk = CHUNK // 4096
    for chunk, block in ((0, 2), (1, 0), (1, 5), (1, 7)):
        where = (chunk * blocks_per_chunk + block) * 8 + 3
        fd = os.open(sums, os.O_RDWR)
        try:
            os.pwrite(fd, bytes([os.pread(fd, 1, where)[0] ^ 0x10]), where)
        finally:
            os.close(fd)
    # Block 7 of chunk 1: its data rotted too (black-box round 4: EIO for good, with a good replica).
    _flip(a, "v", CHUNK + 7 * 4096 + 100)
    a.start()
    h = a.connect("v")
    assert h.pread(4096, 2 * 4096) == data[2 * 4096:3 * 4096]  # read-repair: the data was right all along
    out = a.cli("scrub", "v", "--repair", "--json")
    res = json.loads(out.stdout)
    assert out.returncode == 0 and res["corrupt_offsets"] == [CHUNK, CHUNK + 5 * 4096, CHUNK + 7 * 4096], res
    assert res["repaired_offsets"] == res["corrupt_offsets"]
    assert js(a.cli("scrub", "v", "--json"))["clean"]
    assert h.pread(2 * CHUNK, 0) == data
    assert verify(a, "v")["identical"]
    h.shutdown()


def test_failover_promote_then_the_old_primary_is_fenced_and_resynced(cluster):
    a, b = cluster(2)
    a.cli("volume", "create", "v", "--size", "128MiB", "--replica", "b", check=True)
    b.start()
    a.start()
    h = a.connect("v")
    acked = {}
    stop = threading.Event()

    def writer():
        i = 0
        while not stop.is_set() and i < 4000:
            offset = i * 8192
            data = os.urandom(4096)
            try:
                h.pwrite(data, offset)  # 2 of 2: returns only once b has it too
            except nbd.Error:
                return
            acked[offset] = data
            i += 1

    t = threading.Thread(target=writer)
    t.start()
    wait_for(lambda: len(acked) > 300, 60, what="acknowledged writes")
    a.server.kill9()  # mid-stream
    stop.set()
    t.join()
    assert replication(b, "v")["sync_state"] == "in_sync"
    out = js(b.cli("volume", "promote", "v", "--json"))
    assert out["epoch"] == 2 and out["replicas"] == ["a"] and not out["forced"]
    b.cli("volume", "set", "v", "--min-copies", "1", check=True)  # a is down: continue alone, explicitly
    hb = b.connect("v")
    for offset, data in acked.items():  # every acknowledged write survived the primary's loss
        assert hb.pread(4096, offset) == data, offset
    hb.pwrite(b"new primary" * 300, 100 * MiB)
    hb.flush()
    # The old primary comes back: fenced by the newer epoch, a replica, resynced.
    a.start()
    wait_for(lambda: js(a.cli("volume", "show", "v", "--json"))["role"] == "replica", 60, what="a fenced")
    with pytest.raises(nbd.Error):
        a.connect("v")  # never serves it again
    b.cli("volume", "set", "v", "--min-copies", "2", check=True)
    wait_in_sync(b, "v")
    assert verify(b, "v")["identical"]
    hb.shutdown()


def test_a_restarted_old_primary_learns_at_start_that_it_was_superseded(cluster):
    """From a black-box run: a killed, b promoted, nobody opens the volume on b; a restarts.  Before,
    `volume show` on a said primary at epoch 1 until a client opened it there (its writes refused then,
    fenced).  Now a asks its copies at start: b holds epoch 2, so a is a replica at once, unopened."""
    a, b = cluster(2)
    a.cli("volume", "create", "v", "--size", "16MiB", "--replica", "b", check=True)
    start_in_sync(a, [b], "v", 1, 4096).shutdown()
    a.server.kill9()
    assert js(b.cli("volume", "promote", "v", "--json", check=True))["epoch"] == 2
    a.start()
    wait_for(lambda: js(a.cli("volume", "show", "v", "--json"))["role"] == "replica", 30, what="a fenced")
    shown = replication(a, "v")
    assert shown["role"] == "replica" and shown["epoch"] == 2, shown
    assert "holds epoch 2 > 1: fenced" in a.server.log()
    with pytest.raises(nbd.Error):
        a.connect("v")  # not exported: a replica now
    assert replication(b, "v")["role"] == "primary"


def test_after_promoting_a_big_volume_a_chunk_only_the_old_primary_holds_is_compared(cluster, monkeypatch):
    """Above BLOCKD_FULL_COMPARE_LIMIT a promotion compares the chunks either copy holds, not every
    chunk: a chunk only the old primary wrote (never acknowledged by the new one) must be among them."""
    monkeypatch.setenv("BLOCKD_FULL_COMPARE_LIMIT", "0")  # every volume is "big" (servers and CLI inherit it)
    a, b = cluster(2)
    a.cli("volume", "create", "v", "--size", "64MiB", "--replica", "b", check=True)
    h = start_in_sync(a, [b], "v", 1, 4096)
    b.server.kill9()
    wait_for(lambda: replication(a, "v")["peers"]["b"]["state"] == "out_of_sync", 30, what="a to miss b")
    a.cli("volume", "set", "v", "--min-copies", "1", check=True)
    h.pwrite(b"only on a" * 455 + b"o", 5 * CHUNK)  # a new chunk b never gets
    h.flush()
    a.server.kill9()
    b.start()
    out = js(b.cli("volume", "promote", "v", "--force", "--json"))
    assert out["epoch"] == 2
    b.cli("volume", "set", "v", "--min-copies", "1", check=True)
    hb = b.connect("v")
    hb.pwrite(b"new on b" * 512, 9 * CHUNK)
    hb.flush()
    a.start()  # fenced by b's epoch at first contact, then resynced from b
    wait_for(lambda: js(a.cli("volume", "show", "v", "--json"))["role"] == "replica", 60, what="a fenced")
    wait_in_sync(b, "v", timeout=120)
    assert verify(b, "v")["identical"]  # chunk 5 too: compared, and b's (a hole) won
    assert hb.pread(4096, 5 * CHUNK) == bytes(4096)
    hb.shutdown()
    h.shutdown()


def test_promotion_of_an_out_of_sync_copy_is_refused_without_force(cluster):
    a, b = cluster(2)
    a.server.extra += ["--resync-rate", "0.5"]  # a slow resync, so it is still running when a dies
    a.cli("volume", "create", "v", "--size", "256MiB", "--replica", "b", check=True)
    b.start()
    a.start()
    h = a.connect("v")
    h.pwrite(b"x" * 4096, 0)
    b.server.kill9()
    wait_for(lambda: replication(a, "v")["peers"]["b"]["state"] == "out_of_sync", 30, what="heartbeats to miss b")
    a.cli("volume", "set", "v", "--min-copies", "1", check=True)
    for i in range(12):
        h.pwrite(os.urandom(4096), i * CHUNK)  # b misses these
    h.flush()
    b.start()
    assert "holds 1 replica copy for peers" in b.server.log()  # the banner counts what it is not exporting
    wait_for(lambda: replication(b, "v")["sync_state"] == "out_of_sync", 30, what="b told it is behind")
    a.server.kill9()
    refused = b.cli("volume", "promote", "v")
    assert refused.returncode == 1 and "out_of_sync" in refused.stderr
    assert replication(b, "v")["role"] == "replica"
    forced = js(b.cli("volume", "promote", "v", "--force", "--json"))
    assert forced["forced"] and forced["warnings"] and forced["epoch"] == 2
    h.shutdown()


def test_replication_metrics_and_the_names_dashboards_use(cluster):
    import re
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from conftest import ROOT

    a, b = cluster(2)
    ports = {}
    for node in (a, b):
        ports[node.name] = free_port()
        node.server.extra += ["--metrics", f"127.0.0.1:{ports[node.name]}"]
    a.cli("volume", "create", "v", "--size", "64MiB", "--replica", "b", check=True)
    b.start()
    a.start()
    h = a.connect("v")
    h.pwrite(b"m" * 8192, 0)
    h.flush()
    wait_in_sync(a, "v")

    def scrape(node):
        with urllib.request.urlopen(f"http://127.0.0.1:{ports[node.name]}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}

    sa, sb = scrape(a), scrape(b)
    assert sa[("blockd_replica_in_sync", (("peer", "b"), ("volume", "v")))] == 1
    assert sa[("blockd_replica_state", (("peer", "b"), ("state", "in_sync"), ("volume", "v")))] == 1
    assert sa[("blockd_volume_min_copies", (("volume", "v"),))] == 2
    assert sa[("blockd_peer_connected", (("peer", "b"),))] == 1
    assert sa[("blockd_peer_acks_total", (("peer", "b"),))] >= 2
    assert sb[("blockd_sink_applied_total", (("type", "WRITE"),))] >= 1
    assert sb[("blockd_sink_refused_total", (("reason", "corrupt"),))] == 0
    # `blockd status` reads the same metrics.
    st = js(a.cli("status", "--json", "--interval", "0.2", check=True))["replication"]
    assert st["volumes"]["v"]["min_copies"] == 2 and st["volumes"]["v"]["peers"]["b"]["state"] == "in_sync"
    assert st["peers"]["b"]["connected"] is True and st["peers"]["b"]["failures"] == 0
    assert js(b.cli("status", "--json", "--interval", "0.2", check=True))["replication"]["sink"]["refused"] == 0
    b.server.kill9()
    wait_for(lambda: scrape(a)[("blockd_replica_in_sync", (("peer", "b"), ("volume", "v")))] == 0, 30,
             what="the metric to follow the replica")
    st = js(a.cli("status", "--json", "--interval", "0.2", check=True))["replication"]
    assert st["volumes"]["v"]["peers"]["b"]["state"] == "out_of_sync"
    text = a.cli("status", "--interval", "0.2", check=True).stdout
    assert "replication v: min copies 2" in text and "b: out_of_sync" in text
    exported = {n for n, _ in scrape(a)} | {n for n, _ in sb}
    used = set()
    with open(os.path.join(ROOT, "tools", "grafana", "blockd.json")) as f:
        used |= set(re.findall(r"\bblockd_[a-z0-9_]+", f.read()))
    with open(os.path.join(ROOT, "tools", "prometheus", "blockd-rules.yml")) as f:
        used |= set(re.findall(r"\bblockd_[a-z0-9_]+", f.read()))
    from blockd.metrics import REPLICATION_PREFIXES

    wanted = {n for n in used if n.startswith(REPLICATION_PREFIXES)}
    assert len(wanted) >= 8
    assert not sorted(wanted - exported), sorted(wanted - exported)
    h.shutdown()


@pytest.fixture
def netns_pair():
    """Two network namespaces joined by a veth pair (10.231.<n>.1 and .2), made and removed here."""
    tag = f"{os.getpid() % 10000}{int(time.time() * 1000) % 1000}"
    na, nb = f"bdt{tag}a", f"bdt{tag}b"
    subnet = int(tag) % 200 + 20
    cmds = [
        ["ip", "netns", "add", na], ["ip", "netns", "add", nb],
        ["ip", "link", "add", f"v{tag}a", "type", "veth", "peer", "name", f"v{tag}b"],
        ["ip", "link", "set", f"v{tag}a", "netns", na], ["ip", "link", "set", f"v{tag}b", "netns", nb],
        ["ip", "-n", na, "addr", "add", f"10.231.{subnet}.1/24", "dev", f"v{tag}a"],
        ["ip", "-n", nb, "addr", "add", f"10.231.{subnet}.2/24", "dev", f"v{tag}b"],
        ["ip", "-n", na, "link", "set", f"v{tag}a", "up"], ["ip", "-n", nb, "link", "set", f"v{tag}b", "up"],
        ["ip", "-n", na, "link", "set", "lo", "up"], ["ip", "-n", nb, "link", "set", "lo", "up"],
    ]
    try:
        for cmd in cmds:
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                pytest.skip(f"network namespaces not permitted here: {' '.join(cmd)}: {proc.stderr.strip()}")
        yield {"a": (na, f"10.231.{subnet}.1", f"v{tag}a"), "b": (nb, f"10.231.{subnet}.2", f"v{tag}b")}
    finally:
        for ns in (na, nb):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_two_nodes_in_namespaces_link_cut_then_restored(tmp_path, sock_dir, netns_pair):
    nodes = {}
    for name in "ab":
        ns, ip, _ = netns_pair[name]
        node = Node(str(tmp_path), sock_dir, name)
        node.address = f"tcp://{ip}:10810"
        node.server.extra[node.server.extra.index("--replication-listen") + 1] = node.address
        node.server.prefix = ["ip", "netns", "exec", ns]
        nodes[name] = node
    a, b = nodes["a"], nodes["b"]
    a.cli("peer", "add", "b", b.address, "--public-key", b.public, check=True)
    b.cli("peer", "add", "a", a.address, "--public-key", a.public, check=True)
    a.cli("volume", "create", "v", "--size", "512MiB", "--replica", "b", check=True)
    try:
        h = start_in_sync(a, [b], "v", 32, 65536)
        ns_a, _, dev_a = netns_pair["a"]
        subprocess.run(["ip", "-n", ns_a, "link", "set", dev_a, "down"], check=True)
        done = threading.Event()
        errors = []

        def write():
            try:
                h.pwrite(b"cut" * 1365 + b"c", 3 * CHUNK + 8192)
            except Exception as exc:
                errors.append(exc)
            done.set()

        t = threading.Thread(target=write)
        t.start()
        assert not done.wait(3.0)  # 2 of 2 with the link down: waits
        wait_for(lambda: replication(a, "v")["peers"]["b"]["state"] == "out_of_sync", 30, what="link loss noticed")
        subprocess.run(["ip", "-n", ns_a, "link", "set", dev_a, "up"], check=True)
        assert done.wait(60) and not errors
        t.join()
        wait_in_sync(a, "v")
        st = replication(a, "v")["peers"]["b"]
        assert st["resynced_bytes"] <= 2 * CHUNK  # the chunk written during the cut, not the volume
        assert verify(a, "v")["identical"]
        h.shutdown()
    finally:
        for node in (a, b):
            node.server.stop(9)


def test_three_copies_promotion_requires_the_most_up_to_date_survivor(cluster):
    a, b, c = cluster(3)
    a.cli("volume", "create", "v", "--size", "128MiB", "--replica", "b", "--replica", "c", "--min-copies", "2",
          check=True)
    b.start()
    c.start()
    a.start()
    h = a.connect("v")
    h.pwrite(os.urandom(65536), 0)
    h.flush()
    wait_in_sync(a, "v")
    b.server.kill9()  # b falls behind: a and c carry on (2 of 3)
    wait_for(lambda: replication(a, "v")["peers"]["b"]["state"] == "out_of_sync", 30, what="b missed")
    for i in range(10):
        h.pwrite(os.urandom(65536), CHUNK + i * 65536)  # acknowledged by a and c; no flush
    a.server.kill9()  # the primary dies before b returns: nobody told b it fell behind
    c.server.kill9()  # and c is killed too: how far it got must survive that, unflushed, as its data does
    offline = js(c.cli("volume", "show", "v", "--json"))["replication"]  # no server: what promotion would see
    assert offline["role"] == "replica" and offline["peers"] == {} and offline["applied_seq"] > 0
    c.start()
    assert replication(c, "v")["applied_seq"] == offline["applied_seq"]
    b.start()
    assert replication(b, "v")["sync_state"] == "unconfirmed"  # restarted: its primary has not said since
    # b believes it is in sync, but c (asked over its sink) is ahead: b must not be promoted.
    refused = b.cli("volume", "promote", "v")
    assert refused.returncode == 1 and "applied later writes" in refused.stderr, refused.stderr
    assert f"c ({c.address})" in refused.stderr and "promote that one" in refused.stderr  # by peer name
    assert replication(b, "v")["role"] == "replica" and replication(b, "v")["epoch"] == 1  # nothing announced
    out = js(c.cli("volume", "promote", "v", "--json"))
    assert out["epoch"] == 2 and not out["forced"]
    # c announced epoch 2 to b: b no longer takes the old primary's writes, and is not promotable
    # while c is the primary.
    assert replication(b, "v")["epoch"] == 2
    # No client on c: its own open (the catch-up after a promotion) compares and resyncs b.
    wait_for(lambda: replication(c, "v")["peers"]["b"]["state"] == "in_sync", 60, interval=0.1,
             what="c to catch b up without a client")
    assert replication(b, "v")["sync_state"] == "in_sync"
    h.shutdown()


def test_promotion_with_the_old_primary_alive_fences_it_at_once(cluster):
    """A planned failover (or a partition the operator's node sees across): the promoted copy announces
    its epoch to every copy before it takes it, so the old primary, still serving, is fenced then and
    there: its next write fails instead of being acknowledged by a copy that never heard of the
    promotion.  Then the three copies converge under the new primary."""
    a, b, c = cluster(3)
    a.cli("volume", "create", "v", "--size", "64MiB", "--replica", "b", "--replica", "c", "--min-copies", "2",
          check=True)
    h = start_in_sync(a, [b, c], "v", 2, 4096)
    h.pwrite(b"before" * 682 + b"....", 0)
    h.flush()
    wait_in_sync(a, "v")
    out = js(c.cli("volume", "promote", "v", "--json"))
    assert out["epoch"] == 2 and not out["forced"]
    with pytest.raises(nbd.Error):
        h.pwrite(b"after" * 800 + b"." * 96, 4096)  # the old primary is fenced: never acknowledged
    wait_for(lambda: js(a.cli("volume", "show", "v", "--json"))["role"] == "replica", 30, what="a fenced")
    assert replication(b, "v")["epoch"] == 2
    hc = c.connect("v")
    assert hc.pread(4096, 0) == b"before" * 682 + b"...."
    hc.pwrite(b"new" * 1365 + b"n", 8192)
    hc.flush()
    wait_in_sync(c, "v", timeout=120)
    assert verify(c, "v")["identical"]
    hc.shutdown()
    h.shutdown()


def test_resize_reaches_replicas_and_delete_removes_their_copies(cluster):
    a, b = cluster(2)
    a.cli("volume", "create", "v", "--size", "64MiB", "--replica", "b", check=True)
    b.start()
    a.start()
    h = a.connect("v")
    h.pwrite(b"r" * 4096, 0)
    wait_in_sync(a, "v")
    assert js(a.cli("volume", "resize", "v", "--size", "128MiB", "--json"))["online"]
    h2 = a.connect("v")
    h2.pwrite(b"beyond" * 682 + b"....", 100 * MiB)  # past the old end: the replica grew first
    h2.flush()
    assert replication(a, "v")["peers"]["b"]["state"] == "in_sync"
    assert js(b.cli("volume", "show", "v", "--json"))["size"] == 128 * MiB
    assert verify(a, "v")["identical"]
    h.shutdown()
    h2.shutdown()
    wait_for(lambda: not js(a.cli("volume", "show", "v", "--json"))["attached"], what="detach")
    assert js(a.cli("volume", "delete", "v", "--json"))["deleted"]
    wait_for(lambda: "v" not in [x["name"] for x in js(b.cli("volume", "list", "--json"))], 30,
             what="the replica deleted on b")


def test_a_resize_grows_the_copies_first_even_with_the_volume_closed_and_survives_failover(cluster):
    """From a black-box run: a resize while the volume was closed on the primary reached no replica, and
    after a failover the volume had shrunk back (a filesystem grown onto the new end would lose it).
    Now the replicas grow first (min copies of them, or the resize is refused, changing nothing); a
    replica copy is not resized where it is held; an offline resize of a replicated volume is refused."""
    a, b = cluster(2)
    a.cli("volume", "create", "v", "--size", "16MiB", "--replica", "b", check=True)
    start_in_sync(a, [b], "v", 1, 4096).shutdown()  # the last connection: closed on a
    out = js(a.cli("volume", "resize", "v", "--size", "32MiB", "--json", check=True))
    assert out["online"] and out["size"] == 32 * MiB
    assert js(b.cli("volume", "show", "v", "--json", check=True))["size"] == 32 * MiB  # at once, not later
    a.cli("volume", "modify", "v", "--size", "40MiB", check=True)  # Elastic Volumes: the same rule
    assert js(b.cli("volume", "show", "v", "--json", check=True))["size"] == 40 * MiB
    for verb in ("resize", "modify"):  # on the replica's node
        refused = b.cli("volume", verb, "v", "--size", "48MiB")
        assert refused.returncode == 1 and len(refused.stderr.splitlines()) == 1, refused.stderr
        assert "on its primary" in refused.stderr
    b.server.kill9()
    refused = a.cli("volume", "resize", "v", "--size", "64MiB")  # 2 of 2: b cannot grow
    assert refused.returncode == 1 and len(refused.stderr.splitlines()) == 1, refused.stderr
    assert "not resized: 0 of 1 replica(s) took 64MiB (b did not answer)" in refused.stderr
    assert js(a.cli("volume", "show", "v", "--json", check=True))["size"] == 40 * MiB  # nothing changed
    a.server.stop()
    for verb in ("resize", "modify"):  # no server: the copies are out of reach
        refused = a.cli("volume", verb, "v", "--size", "64MiB")
        assert refused.returncode == 1 and "while this node's server runs" in refused.stderr, refused.stderr
    b.start()
    out = js(b.cli("volume", "promote", "v", "--force", "--json", check=True))  # a is down
    assert out["epoch"] == 2
    b.cli("volume", "set", "v", "--min-copies", "1", check=True)  # a is down: go on alone
    hb = b.connect("v")
    assert hb.get_size() == 40 * MiB  # the grow survived the failover
    hb.pwrite(b"end" * 1365 + b"!", 40 * MiB - 4096)
    hb.shutdown()


def test_a_volume_never_opened_is_resized_before_its_replica_copy_exists(cluster):
    """b holds no copy until a's first open sends CREATE: its `unknown volume` answer to the RESIZE is
    not a refusal; the copy is then made with the new size."""
    a, b = cluster(2)
    a.cli("volume", "create", "v", "--size", "16MiB", "--replica", "b", check=True)
    b.start()
    a.start()
    out = a.cli("volume", "resize", "v", "--size", "40MiB")
    assert out.returncode == 0, out.stderr
    h = a.connect("v")
    h.pwrite(b"z" * 4096, 40 * MiB - 4096)  # the last block: b must have the new size
    h.flush()
    wait_in_sync(a, "v")
    assert js(b.cli("volume", "show", "v", "--json", check=True))["size"] == 40 * MiB
    assert verify(a, "v")["identical"]
    h.shutdown()


def test_a_replica_that_cannot_grow_says_it_is_out_of_sync_until_it_has_grown(cluster):
    """From a black-box run: b's pool was full, so b refused the RESIZE (min copies 1: the resize went
    on) and then missed writes past its end, yet said in_sync.  Now the refusal marks its copy behind
    (promotion reads that); once it has room, the primary's next open grows it and it is in sync."""
    a, b = cluster(2)
    a.cli("volume", "create", "v", "--size", "16MiB", "--replica", "b", "--min-copies", "1", check=True)
    start_in_sync(a, [b], "v", 1, 4096).shutdown()
    wait_for(lambda: replication(b, "v")["sync_state"] == "in_sync", 30, interval=0.1, what="b in sync")
    full = js(b.cli("capacity", "show", "--json", check=True))["logical_provisioned"]
    b.cli("capacity", "set", str(full), check=True)  # b's pool is full: it cannot grow
    a.cli("volume", "resize", "v", "--size", "24MiB", check=True)  # 0 of 1 needed: goes on
    assert replication(b, "v")["sync_state"] == "out_of_sync"
    assert js(b.cli("volume", "show", "v", "--json", check=True))["size"] == 16 * MiB
    b.cli("capacity", "set", "unlimited", check=True)
    h = a.connect("v")  # its CREATE carries 24 MiB: b grows now
    wait_for(lambda: replication(b, "v")["sync_state"] == "in_sync", 30, interval=0.1, what="b grown, in sync")
    assert js(b.cli("volume", "show", "v", "--json", check=True))["size"] == 24 * MiB
    h.pwrite(b"t" * 4096, 24 * MiB - 4096)
    h.flush()
    wait_in_sync(a, "v")
    assert verify(a, "v")["identical"]
    h.shutdown()


def test_a_peer_that_never_answers_is_logged_once_with_what_to_check(cluster):
    """From a black-box run: one side --insecure-replication, the other CurveZMQ: the logs said only
    "no answer", nothing pointing at the mismatch."""
    a, b = cluster(2)
    b.server.extra += ["--insecure-replication"]
    a.cli("volume", "create", "v", "--size", "16MiB", "--replica", "b", check=True)
    b.start()
    a.start()
    h = a.connect("v")  # its link to b starts: the probes go unanswered
    wait_for(lambda: "both or neither with --insecure-replication" in a.server.log(), 30, what="the hint")
    assert a.server.log().count("both or neither with --insecure-replication") == 1
    h.shutdown()


def test_verify_reports_a_copy_whose_size_differs(cluster):
    """From a black-box run: copies of different sizes were reported identical.  (b's copy is made
    larger by hand while b is down: what a copy that took a resize the others refused looks like.)"""
    import sqlite3

    a, b = cluster(2)
    a.cli("volume", "create", "v", "--size", "16MiB", "--replica", "b", check=True)
    start_in_sync(a, [b], "v", 1, 4096).shutdown()
    assert verify(a, "v")["identical"]
    assert b.server.stop() == 0
    db = sqlite3.connect(os.path.join(b.data, "catalog.db"))
    db.execute("UPDATE volumes SET size=? WHERE name='v'", (24 * MiB,))
    db.commit()
    db.close()
    b.start()
    out = a.cli("verify", "v")
    assert out.returncode == 1 and "b: size 24MiB differs from 16MiB" in out.stdout, out.stdout
    result = verify(a, "v")
    assert not result["identical"] and result["sizes"] == {"b": 24 * MiB} and result["size"] == 16 * MiB
    assert result["differences"] == {"b": []}  # the blocks both have are the same


def test_a_resync_stops_when_its_volume_closes_and_the_catch_up_finishes_it_without_a_client(cluster):
    """A resync reads through the Volume object it started with; once the volume closes, another
    open has its own (and its own checksums): the old resync must stop, not race the new one.  The
    last client going does not leave b behind: the server's own open (the catch-up) finishes it."""
    a, b = cluster(2)
    a.server.extra += ["--resync-rate", "8"]  # MiB/s: 16 dirty chunks take ~8 s
    a.cli("volume", "create", "v", "--size", "64MiB", "--replica", "b", check=True)
    h = start_in_sync(a, [b], "v", 1, 4096)
    a.cli("volume", "set", "v", "--min-copies", "1", check=True)
    b.server.kill9()
    wait_for(lambda: replication(a, "v")["peers"]["b"]["state"] == "out_of_sync", 30, interval=0.1,
             what="heartbeats to notice b is gone")
    for c in range(16):
        h.pwrite(os.urandom(64 * 1024), c * CHUNK)
    h.flush()
    b.start()
    wait_for(lambda: replication(a, "v")["peers"]["b"]["resynced_bytes"] > 0, 60, interval=0.1,
             what="the resync to send its first chunk")
    h.shutdown()
    wait_for(lambda: control(a.data, {"op": "attached", "name": "v"})["connections"] == 0, 30,
             what="the client's connection to close")
    wait_in_sync(a, "v", timeout=120)  # no client: the catch-up's open resynced the rest
    wait_for(lambda: "replicas caught up" in a.server.log(), 30, what="the catch-up to close the volume")
    shown = js(a.cli("volume", "show", "v", "--json", check=True))
    assert shown["attached"] is False and shown["connections"] == 0  # the server's own open is no client
    assert replication(b, "v")["sync_state"] == "in_sync"
    assert verify(a, "v")["identical"]
    assert "Traceback" not in a.server.log()


def test_a_replica_back_after_the_last_client_left_catches_up_without_one(cluster):
    """b misses writes (min-copies 1), the client disconnects, then b returns: a resyncs what b missed
    in the background (before, b stayed out of sync until a client opened the volume again), only the
    dirty chunks, and the copies are identical."""
    a, b = cluster(2)
    a.cli("volume", "create", "v", "--size", "256MiB", "--replica", "b", "--min-copies", "1", check=True)
    h = start_in_sync(a, [b], "v", 4, 4096)
    b.server.kill9()
    wait_for(lambda: replication(a, "v")["peers"]["b"]["state"] == "out_of_sync", 30, interval=0.1,
             what="heartbeats to notice b is gone")
    for c in (1, 5, 9):
        h.pwrite(os.urandom(8192), c * CHUNK + 4096)
    h.flush()
    h.shutdown()
    peer = None

    def closed_out_of_sync():
        nonlocal peer
        peer = replication(a, "v")["peers"]["b"]
        return peer["state"] == "out_of_sync"

    wait_for(closed_out_of_sync, 30, what="the volume to close with b behind")
    assert peer["resync_remaining_chunks"] == 3
    b.start()
    wait_in_sync(a, "v")
    wait_for(lambda: replication(b, "v")["sync_state"] == "in_sync", 30, interval=0.1, what="b told in sync")
    resynced = control(b.data, {"op": "sink"})["applied"].get("RESYNC", 0)
    assert 1 <= resynced <= 3  # the dirty chunks only, not the volume
    assert js(a.cli("volume", "show", "v", "--json", check=True))["attached"] is False
    assert verify(a, "v")["identical"]


def test_a_replica_restarted_while_its_primary_has_the_volume_closed_is_confirmed_and_promotable(cluster):
    """b restarts while a has the volume closed: b says `unconfirmed` (it cannot know what it missed
    while down) until a says; a asks, finds it so, and confirms it by opening the volume itself.  Then,
    with a gone, b is promoted without --force.  Before, b stayed unconfirmed until a client opened the
    volume on a, and failing over to it needed --force."""
    a, b = cluster(2)
    a.cli("volume", "create", "v", "--size", "64MiB", "--replica", "b", check=True)
    data = os.urandom(65536)
    h = start_in_sync(a, [b], "v", 0, 0)
    h.pwrite(data, CHUNK)
    h.flush()
    h.shutdown()
    b.server.kill9()
    b.start()
    wait_for(lambda: replication(b, "v")["sync_state"] == "in_sync", 30, interval=0.1, what="a to confirm b")
    wait_in_sync(a, "v")
    a.server.kill9()
    out = js(b.cli("volume", "promote", "v", "--json", check=True))
    assert not out["forced"]
    h = b.connect("v")
    assert h.pread(65536, CHUNK) == data
    h.shutdown()


def test_a_volume_held_only_by_a_catch_up_can_be_deleted(cluster):
    """The server's own open (catching up b) is not a client: `volume delete` without --force goes
    through, cuts no connection, and the catch-up ends quietly."""
    a, b = cluster(2)
    a.server.extra += ["--resync-rate", "1"]  # MiB/s: the catch-up holds the volume for a while
    a.cli("volume", "create", "v", "--size", "256MiB", "--replica", "b", "--min-copies", "1", check=True)
    h = start_in_sync(a, [b], "v", 1, 4096)
    b.server.kill9()
    wait_for(lambda: replication(a, "v")["peers"]["b"]["state"] == "out_of_sync", 30, interval=0.1,
             what="heartbeats to notice b is gone")
    for c in range(8):
        h.pwrite(os.urandom(4096), c * CHUNK)
    h.flush()
    h.shutdown()
    b.start()
    wait_for(lambda: "catching up its replicas while no client has it open" in a.server.log(), 30,
             what="the catch-up to open the volume")
    assert replication(a, "v")["peers"]["b"]["state"] in ("resyncing", "out_of_sync")
    out = js(a.cli("volume", "delete", "v", "--json", check=True))
    assert out.get("connections_cut", 0) == 0, out
    assert a.cli("volume", "show", "v").returncode == 1
    a.cli("volume", "create", "w", "--size", "16MiB", check=True)  # the server goes on
    h = a.connect("w")
    h.pwrite(b"w" * 4096, 0)
    h.shutdown()
    assert "Traceback" not in a.server.log()


def test_a_stalled_replica_times_out_then_catches_up(cluster):
    """SIGSTOP the replica: writes sent on the request threads' own sockets get no answer, the
    primary gives up on them at the ack deadline (min-copies 1: the writes succeed), marks the peer
    out of sync and records the chunks; after SIGCONT the late answers are ignored, the resync runs
    and the copies are identical."""
    import signal

    a, b = cluster(2)
    a.cli("volume", "create", "v", "--size", "64MiB", "--replica", "b", "--min-copies", "1", check=True)
    h = start_in_sync(a, [b], "v", 4, 8192)
    os.kill(b.server.nbdkit_pid(), signal.SIGSTOP)  # nbdkit itself (serve only supervises it)
    try:
        cookies = [h.aio_pwrite(os.urandom(4096), c * CHUNK + 8192) for c in range(8)]
        while h.aio_in_flight() > 0:
            h.poll(-1)
        for cookie in cookies:
            assert h.aio_command_completed(cookie)
        st = replication(a, "v")["peers"]["b"]
        assert st["state"] == "out_of_sync" and st["resync_remaining_chunks"] >= 8
    finally:
        os.kill(b.server.nbdkit_pid(), signal.SIGCONT)
    wait_in_sync(a, "v")
    h.pwrite(b"z" * 4096, 10 * CHUNK)  # new writes after the catch-up reach b again
    h.flush()
    assert verify(a, "v")["identical"]
    assert "Traceback" not in a.server.log()
    h.shutdown()


def test_a_replica_restarted_while_its_primary_went_on_with_fewer_copies_is_not_promoted_without_force(cluster):
    """From a black-box run: b killed (in sync), a lowers --min-copies to 1 and acknowledges writes b never
    gets, a dies, b starts again.  b cannot know the quorum was lowered: it was down, and no primary has
    said it is in sync since.  Promotion refuses it (one line, naming why and its last applied write);
    --force promotes it, saying so.  Before, b still said in_sync and was promoted without them."""
    a, b = cluster(2)
    a.cli("volume", "create", "v", "--size", "64MiB", "--replica", "b", check=True)
    start_in_sync(a, [b], "v", 2, 4096).shutdown()
    b.server.kill9()
    a.cli("volume", "set", "v", "--min-copies", "1", check=True)
    h = a.connect("v")
    h.pwrite(b"L" * 4096, 3 * CHUNK)  # acknowledged by a alone
    h.flush()
    h.shutdown()
    a.server.kill9()
    b.start()
    assert replication(b, "v")["sync_state"] == "unconfirmed"
    refused = b.cli("volume", "promote", "v")
    assert refused.returncode == 1 and len(refused.stderr.splitlines()) == 1, refused.stderr
    assert "restarted since its primary last said this copy was in sync" in refused.stderr
    assert js(b.cli("volume", "show", "v", "--json", check=True))["role"] == "replica"
    forced = b.cli("volume", "promote", "v", "--force")
    assert forced.returncode == 0, forced.stderr
    assert "warning: forced although this node restarted" in forced.stdout
    assert js(b.cli("volume", "show", "v", "--json", check=True))["role"] == "primary"


def test_a_restarted_replica_is_in_sync_again_once_its_primary_says_so(cluster):
    a, b = cluster(2)
    a.cli("volume", "create", "v", "--size", "16MiB", "--replica", "b", check=True)
    h = start_in_sync(a, [b], "v", 1, 4096)
    b.server.stop()
    wait_for(lambda: replication(a, "v")["peers"]["b"]["state"] == "out_of_sync", 30, what="a sees b gone")
    b.start()
    h.pwrite(b"n" * 4096, 0)  # a reconnects: its CREATE says in sync again (after the resync)
    h.flush()
    wait_in_sync(a, "v")
    wait_for(lambda: replication(b, "v")["sync_state"] == "in_sync", 60, interval=0.1, what="b confirmed")
    h.shutdown()


def test_a_replica_restarted_faster_than_its_primary_noticed_is_confirmed_by_the_next_heartbeat(cluster):
    """b is killed and back before a's ack deadline (10 s here), with nothing in flight: a's queued
    heartbeat reaches the new sink and is answered, so a never missed b.  Before, b stayed `unconfirmed`
    (its promotion refused without --force) until a's next open; now the heartbeat's answer names the
    sink's instance, a sees a new one, takes b for missed and reconnects: its CREATE confirms b."""
    a, b = cluster(2)
    a.server.extra += ["--ack-timeout", "10"]  # later flags win: longer than b's restart
    a.cli("volume", "create", "v", "--size", "16MiB", "--replica", "b", check=True)
    h = start_in_sync(a, [b], "v", 1, 4096)
    wait_for(lambda: replication(b, "v")["sync_state"] == "in_sync", 30, interval=0.1, what="b in sync")
    b.server.kill9()
    b.start()
    wait_for(lambda: replication(b, "v")["sync_state"] == "in_sync", 30, interval=0.1, what="b confirmed")
    # Noticed by the new instance in a heartbeat's answer, or, when the kill lost a heartbeat in flight
    # (one probe at a time), at that probe's deadline: either way a reconnect and a CREATE.
    log = a.server.log()
    assert "peer restarted (a new sink answers)" in log or "no answer within 10 s" in log, log
    wait_in_sync(a, "v")
    h.pwrite(b"after" * 819 + b"!", 0)  # both copies again: 2 of 2
    h.flush()
    assert verify(a, "v")["identical"]
    h.shutdown()


def test_a_replica_whose_data_is_wiped_while_its_node_is_down_is_empty_and_resynced_fully(cluster):
    """b's volume directory is wiped while b is down and a has the volume closed: a still takes b for in
    sync.  b says `empty` (also with no server), refuses promotion, and answers a's next open `created`,
    so a resyncs every chunk; then the copies are identical.  Before, b said in_sync and held zeros."""
    a, b = cluster(2)
    a.cli("volume", "create", "v", "--size", "64MiB", "--replica", "b", check=True)
    start_in_sync(a, [b], "v", 4, 64 * 1024).shutdown()  # the last connection: the volume closes on a
    vid = js(b.cli("volume", "show", "v", "--json", check=True))["id"]
    assert b.server.stop() == 0
    shutil.rmtree(os.path.join(b.data, "volumes", str(vid)))
    shown = replication(b, "v")  # no server on b
    assert shown["sync_state"] == "empty" and (shown["applied_epoch"], shown["applied_seq"]) == (0, 0)
    refused = b.cli("volume", "promote", "v")
    assert refused.returncode == 1 and len(refused.stderr.splitlines()) == 1, refused.stderr
    assert "data is gone" in refused.stderr
    b.start()  # a asks b, which says empty: a opens the volume itself (no client), b answers its CREATE
    # `created`, so a resyncs every chunk, then says in sync
    wait_in_sync(a, "v")
    wait_for(lambda: replication(b, "v")["sync_state"] == "in_sync", 30, interval=0.1, what="b told in sync")
    assert control(b.data, {"op": "sink"})["applied"].get("RESYNC", 0) >= 4  # every chunk a holds
    assert verify(a, "v")["identical"]


def test_a_lost_replica_leaves_its_primary_writable_across_reopens_and_promote_force_after_a_restart(cluster):
    """min-copies 1 carries on without the replica: also for the next connection (confirmed once in
    this process), and after a restart, where no peer can confirm the epoch, by the operator's
    `volume promote --force` on the primary itself."""
    a, b = cluster(2)
    a.cli("volume", "create", "v", "--size", "16MiB", "--replica", "b", "--min-copies", "1", check=True)
    start_in_sync(a, [b], "v", 1, 4096).shutdown()  # the last connection closes: the volume closes
    # b confirmed a's epoch in this server's life: nothing to force, though the volume is closed now.
    report = js(a.cli("volume", "promote", "v", "--force", "--json", check=True))
    assert report["confirmed_only"] and not report["forced"] and not report["warnings"], report
    shown = js(b.cli("volume", "show", "v", "--json", check=True))  # the sink holds it open: no NBD client
    assert shown["attached"] is False and shown["connections"] == 0
    refused = b.cli("volume", "delete", "v")  # the replica's node: not without --force
    assert refused.returncode == 1 and len(refused.stderr.splitlines()) == 1 and "--force" in refused.stderr
    assert js(b.cli("volume", "show", "v", "--json", check=True))["replication"]["role"] == "replica"
    refused = b.cli("volume", "set", "v", "--min-copies", "1")  # set on the primary, not on a copy
    assert refused.returncode == 1 and len(refused.stderr.splitlines()) == 1 and "replica" in refused.stderr
    b.server.kill9()
    h = a.connect("v")  # opened again, with the replica gone
    assert replication(a, "v")["confirmed"] is True
    first = os.urandom(8192)
    h.pwrite(first, CHUNK)
    h.flush()
    h.shutdown()

    a.server.stop()
    a.start()  # a restarted primary: nobody answers to confirm its epoch
    peer = replication(a, "v")["peers"]["b"]  # not open: what the durable bitmap says
    assert peer["state"] == "out_of_sync" and peer["resync_remaining_chunks"] >= 1
    h = a.connect("v")
    assert replication(a, "v")["confirmed"] is False
    refused = a.cli("volume", "promote", "v")
    assert refused.returncode == 1 and len(refused.stderr.splitlines()) == 1 and "--force" in refused.stderr
    report = js(a.cli("volume", "promote", "v", "--force", "--json", check=True))
    assert report["forced"] and report["confirmed_only"] and report["warnings"] and report["replicas"] == ["b"]
    assert replication(a, "v")["confirmed"] is True
    second = os.urandom(8192)
    h.pwrite(second, 2 * CHUNK)
    h.flush()
    assert h.pread(8192, CHUNK) == first and h.pread(8192, 2 * CHUNK) == second

    h.shutdown()  # nothing open on the primary when the replica returns
    b.start()
    # verify opens the volume, the replica answers and gets what it missed first: no false differences
    result = verify(a, "v")
    assert result["identical"], (result, replication(a, "v"), a.server.log()[-3000:])
    # Its answer confirmed the epoch: the next start needs a peer's answer again, not --force.
    from blockd.datadir import DataDir

    catalog = DataDir(a.data).catalog()
    try:
        assert catalog.volume("v")["sync_state"] != "promoted"
    finally:
        catalog.close()


def test_a_promoted_copy_serves_with_its_primarys_type_and_iops(cluster):
    """From a black-box run: replica copies were made without IOPS or throughput, so an io2 volume could
    not be opened (nor shown) once promoted, and a gp3 one came back at the default limits.  The copy
    keeps the primary's type and limits, a modification included."""
    a, b = cluster(2)
    a.cli("volume", "create", "v", "--size", "4GiB", "--type", "io2", "--iops", "3000", "--replica", "b", check=True)
    data = os.urandom(8192)
    h = start_in_sync(a, [b], "v", 0, 0)
    h.pwrite(data, 0)
    h.flush()
    shown = js(b.cli("volume", "show", "v", "--json", check=True))
    assert (shown["type"], shown["iops"], shown["limits"]["iops"]) == ("io2", 3000, 3000), shown
    a.cli("volume", "modify", "v", "--iops", "4000", check=True)  # Elastic Volumes, while open
    wait_for(lambda: js(b.cli("volume", "show", "v", "--json", check=True))["iops"] == 4000, 30, interval=0.1,
             what="the copy to take the new IOPS")
    h.shutdown()
    a.server.kill9()
    assert not js(b.cli("volume", "promote", "v", "--json", check=True))["forced"]
    hb = b.connect("v")
    assert hb.pread(8192, 0) == data
    hb.shutdown()
    shown = js(b.cli("volume", "show", "v", "--json", check=True))
    assert (shown["role"], shown["type"], shown["iops"], shown["limits"]["iops"]) == ("primary", "io2", 4000, 4000)


def test_a_modification_while_the_volume_is_closed_reaches_its_copies(cluster):
    """From black-box round 4: modified while closed, the copy kept the old limits (a failover served
    them): the catch-up opens the volume, so its CREATE tells the copies."""
    a, b = cluster(2)
    a.cli("volume", "create", "w", "--size", "20GiB", "--type", "gp3", "--iops", "3000", "--replica", "b",
          check=True)
    start_in_sync(a, [b], "w", 1, 4096).shutdown()
    a.cli("volume", "modify", "w", "--iops", "5000", "--throughput", "300", check=True)  # closed now
    wait_for(lambda: js(b.cli("volume", "show", "w", "--json", check=True))["iops"] == 5000, 30, interval=0.1,
             what="the copy to take the new limits")
    assert js(b.cli("volume", "show", "w", "--json", check=True))["throughput"] == 300


def test_a_volume_deleted_while_its_replica_is_down_is_deleted_there_when_it_answers(cluster):
    """From a black-box run: deleting a replicated volume with its replica's node down said nothing, and
    the copy stayed there for good (promotable with --force: the deleted volume back).  Now the delete
    names the copy it could not reach, and the DELETE goes again when that node answers; the same for
    a delete with no server running here (the next server sends it)."""
    a, b = cluster(2)
    for name in ("v", "w"):
        a.cli("volume", "create", name, "--size", "16MiB", "--replica", "b", "--min-copies", "1", check=True)
    b.start()
    a.start()
    for name in ("v", "w"):
        h = a.connect(name)
        h.pwrite(b"d" * 4096, 0)
        h.flush()
        wait_in_sync(a, name)
        h.shutdown()
    assert {v["name"] for v in js(b.cli("volume", "list", "--json", check=True))} >= {"v", "w"}
    b.server.kill9()
    out = js(a.cli("volume", "delete", "v", "--json", check=True))
    assert out["copies_pending_delete"] == ["b"], out
    text = a.cli("volume", "delete", "w", check=True).stdout  # (also said without --json)
    assert "its copies on b are deleted when it answers" in text, text
    a.server.stop()
    b.start()
    names = {v["name"] for v in js(b.cli("volume", "list", "--json", check=True))}
    assert {"v", "w"} <= names  # nobody told b yet
    a.start()  # its catch-up sends the DELETEs once b answers
    wait_for(lambda: not {"v", "w"} & {v["name"] for v in js(b.cli("volume", "list", "--json", check=True))}, 30,
             interval=0.1, what="b to delete its copies")
    assert "its copy on b deleted" in a.server.log()
    assert not [f for f in os.listdir(os.path.join(a.data, "resync")) if f.startswith("deleted.")]


def test_an_offline_delete_of_a_replicated_volume_reaches_its_replica_through_the_next_server(cluster):
    a, b = cluster(2)
    a.cli("volume", "create", "v", "--size", "16MiB", "--replica", "b", check=True)
    start_in_sync(a, [b], "v", 1, 4096).shutdown()
    assert a.server.stop() == 0
    out = js(a.cli("volume", "delete", "v", "--json", check=True))  # no server on a
    assert out["copies_pending_delete"] == ["b"] and not out["online"]
    assert b.cli("volume", "show", "v").returncode == 0
    a.start()
    wait_for(lambda: b.cli("volume", "show", "v").returncode == 1, 30, interval=0.1,
             what="b to delete its copy")
