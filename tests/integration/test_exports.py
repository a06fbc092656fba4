"""Export listing stays bounded; attaching by name is not."""

import json
import subprocess

import pytest

from blockd.catalog import Catalog
from blockd.engine import EXPORT_LIST_LIMIT

pytestmark = pytest.mark.integration


def test_export_list_is_bounded_and_any_name_attaches(data_dir, cli, server_factory):
    cli("volume", "create", "first", "--size", "1GiB", check=True)
    catalog = Catalog(str(data_dir / "catalog.db"))
    with catalog.transaction() as db:
        for i in range(EXPORT_LIST_LIMIT + 200):
            db.execute(
                "INSERT INTO volumes (name, pool_id, size, type, created_at) VALUES (?, 1, ?, 'raw', 0)",
                (f"v{i:05d}", 1 << 30),
            )
    catalog.close()
    srv = server_factory(data_dir).start()
    listing = subprocess.run(
        ["nbdinfo", "--list", "--json", f"nbd+unix://?socket={srv.sock}"], capture_output=True, text=True, timeout=120
    )
    assert listing.returncode == 0, listing.stderr
    exports = json.loads(listing.stdout)["exports"]
    assert len(exports) == EXPORT_LIST_LIMIT
    h = srv.connect(f"v{EXPORT_LIST_LIMIT + 150:05d}")  # not in the list, still attachable
    assert h.get_size() == 1 << 30
    h.shutdown()
    # serve printed the count and the URI pattern instead of 1201 lines
    out = srv.log()
    assert f"{EXPORT_LIST_LIMIT + 201} volumes: nbd+unix:///NAME?socket={srv.sock}" in out


def test_serve_prints_one_uri_per_volume(data_dir, cli, server_factory):
    for name in ("a", "b"):
        cli("volume", "create", name, "--size", "1GiB", check=True)
    srv = server_factory(data_dir).start()
    out = srv.log()
    assert f"a nbd+unix:///a?socket={srv.sock}" in out
    assert f"b nbd+unix:///b?socket={srv.sock}" in out


def test_serve_over_tcp_supervises_nbdkit_and_kill_9_of_serve_takes_it_down(data_dir, cli, tmp_path):
    import os
    import signal
    import socket

    import nbd

    from conftest import BLOCKD, ROOT, running, wait_for

    cli("volume", "create", "vol0", "--size", "1GiB", check=True)
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))  # an ephemeral port, released just before serve binds it
    port = probe.getsockname()[1]
    probe.close()
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen(
        BLOCKD + ["serve", "--data-dir", str(data_dir), "--listen", f"127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
    )
    try:
        def ready():
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return True
            except OSError:
                return False

        wait_for(ready, timeout=120, what="serve on TCP")
        with open(data_dir / "blockd.lock") as f:
            serve_pid, nbdkit_pid = map(int, f.read().split())
        assert serve_pid == proc.pid
        with open(f"/proc/{nbdkit_pid}/stat") as f:
            stat = f.read()
        assert stat.split(") ")[0].endswith("(nbdkit") and int(stat.split(") ")[1].split()[1]) == proc.pid
        info = subprocess.run(["nbdinfo", "--json", f"nbd://127.0.0.1:{port}/vol0"], capture_output=True, text=True)
        assert info.returncode == 0, info.stderr
        assert json.loads(info.stdout)["exports"][0]["export-size"] == 1 << 30
        proc.send_signal(signal.SIGKILL)  # kill -9 of the serve PID: a real crash, nbdkit goes with it
        proc.wait(30)

        def gone():
            h = nbd.NBD()
            try:
                h.connect_uri(f"nbd://127.0.0.1:{port}/vol0")
            except nbd.Error:
                return True
            h.shutdown()
            return False

        wait_for(gone, timeout=10, what="nothing left serving after kill -9 of blockd serve")
        wait_for(lambda: not running(nbdkit_pid), timeout=10, what="nbdkit to exit with its supervisor")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
