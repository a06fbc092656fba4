"""Live commands through the control socket of a real `blockd serve` (nbdkit + plugin)."""

import json
import os
import signal
import stat

import nbd
import pytest

from conftest import ROOT, control, control_raw, js, run_cli, running, wait_for

MiB = 1 << 20
PRIME_DAY = os.path.join(ROOT, "tools", "plans", "prime-day-2020.toml")




def one_line_error(proc, code, *needles):
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("blockd: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]




def test_control_socket_is_private(server, data_dir):
    path = os.path.join(data_dir, "control.sock")
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert stat.S_IMODE(os.stat(data_dir).st_mode) == 0o700


def test_delete_refused_while_attached_then_succeeds_after_disconnect(server, data_dir, cli):
    h = server.connect("vol0")
    h.pwrite(os.urandom(8 * MiB), 0)
    h.flush()
    show = js(cli("volume", "show", "vol0", "--json"))
    assert show["attached"] and show["connections"] == 1 and show["server"]
    before = js(cli("volume", "list", "--json"))
    one_line_error(cli("volume", "delete", "vol0"), 1, "vol0", "attached")
    assert js(cli("volume", "list", "--json")) == before
    assert h.pread(4096, 0)  # still served
    h.shutdown()
    wait_for(lambda: not js(cli("volume", "show", "vol0", "--json"))["attached"], what="detach")
    vol_dir = os.path.join(data_dir, "volumes", str(show["id"]))
    assert os.path.isdir(vol_dir)
    out = js(cli("volume", "delete", "vol0", "--json"))
    assert out == {"name": "vol0", "deleted": True, "connections_cut": 0, "online": True, "copies_pending_delete": []}
    assert not os.path.exists(vol_dir)  # chunks freed
    assert js(cli("volume", "list", "--json")) == []
    assert js(cli("capacity", "show", "--json"))["logical_provisioned"] == 0
    with pytest.raises(nbd.Error):
        server.connect("vol0")
    assert server.proc.poll() is None


def test_delete_force_while_attached_cuts_the_connection(server, data_dir, cli):
    h = server.connect("vol0")
    h.pwrite(b"x" * 4096, 0)
    h.flush()
    vol_id = js(cli("volume", "show", "vol0", "--json"))["id"]
    out = js(cli("volume", "delete", "vol0", "--force", "--json"))
    assert out["connections_cut"] == 1
    assert not os.path.exists(os.path.join(data_dir, "volumes", str(vol_id)))
    with pytest.raises(nbd.Error) as err:
        h.pread(4096, 0)
    assert err.value.errno == "EIO"
    with pytest.raises(nbd.Error):
        h.pwrite(b"y" * 4096, 0)
    h.shutdown()
    # An expected error is one log line naming it, not a Python traceback.
    wait_for(lambda: "pwrite: error: VolumeFailed: vol0: volume was deleted" in server.log(), 10, what="the log line")
    assert "Traceback" not in server.log()
    # A new volume of the same name is a new, empty volume.
    cli("volume", "create", "vol0", "--size", "64MiB", check=True)
    h2 = server.connect("vol0")
    assert h2.pread(4096, 0) == bytes(4096)
    h2.shutdown()
    assert not os.path.exists(os.path.join(data_dir, "volumes", str(vol_id)))


def _flood_then_hang_up(server, cli, name):
    import time

    cli("volume", "create", name, "--size", "16MiB", check=True)
    h = server.connect(name)
    h.pwrite(b"x" * 4096, 0)
    cli("volume", "delete", name, "--force", check=True)
    buf = nbd.Buffer.from_bytearray(bytearray(4096))
    sent, end = 0, time.monotonic() + 0.5
    while time.monotonic() < end:
        while h.aio_in_flight() < 32:
            h.aio_pwrite(buf, (sent % 1000) * 4096)
            sent += 1
        h.poll(-1)
        while (cookie := h.aio_peek_command_completed()) > 0:
            try:
                h.aio_command_completed(cookie)
            except nbd.Error:
                pass
    del h  # hangs up with writes in flight


def test_clients_flooding_a_deleted_volume_then_hanging_up_do_not_take_the_service_down(server, cli):
    """Each round: a client with 32 writes in flight to a volume deleted under it (every one fails at
    once), for half a second, then it hangs up with writes still queued.  nbdkit 1.32 itself can abort
    there (raw_send_socket: Assertion `sock >= 0': its reply threads race the closing socket; it does so
    for successful replies too, more often on a busy host), a moment after the hang-up.  blockd paces
    error replies, which makes that rarer, and `blockd serve` restarts a crashed nbdkit: the supervisor
    stays, every round is served (one retry, for a round that met a restart), every crash in the log was
    followed by a restart, and the data written before is intact."""
    h0 = server.connect("vol0")
    h0.pwrite(b"k" * 4096, 8192)
    h0.shutdown()
    for rnd in range(12):
        try:
            _flood_then_hang_up(server, cli, f"gone{rnd}")
        except (nbd.Error, AssertionError):  # the previous round's nbdkit aborted meanwhile
            server.wait_ready()
            _flood_then_hang_up(server, cli, f"again{rnd}")
        server.wait_ready()
        assert server.proc.poll() is None, server.log()
    h = server.connect("vol0")  # still serving, data intact
    assert h.pread(4096, 8192) == b"k" * 4096
    h.pwrite(b"y" * 4096, 0)
    assert h.pread(4096, 0) == b"y" * 4096
    h.shutdown()
    assert server.stop() == 0  # the same supervisor, stopped cleanly
    with open(server.log_path, "rb") as f:
        log = f.read().decode(errors="replace")
    assert log.count("died of ") == log.count("; restarting it (restart ")
    assert log.count("Assertion") <= log.count("died of SIGABRT")
    assert "giving up" not in log


def _next_nbdkit(server, old):
    """Wait until `blockd serve` runs a new nbdkit (not ``old``); its pid."""
    def new():
        pid = server.nbdkit_pid()
        return pid if pid not in (None, old) else None

    return wait_for(new, 60, interval=0.01, what="blockd serve to start nbdkit again")


def test_a_crashed_nbdkit_is_restarted_and_every_volume_is_served_again(server, cli):
    """nbdkit dying of a signal nobody sent through `blockd serve` (SIGABRT: its own assertion; SIGSEGV)
    is started again by the same supervisor; what was acknowledged before is there (as after kill -9);
    metrics and ping count the restarts; SIGTERM to serve still stops everything cleanly."""
    cli("volume", "create", "other", "--size", "8MiB", check=True)
    h = server.connect("vol0")
    data = os.urandom(64 * 1024)
    h.pwrite(data, 4096)  # acknowledged, not flushed
    first = server.nbdkit_pid()
    os.kill(first, signal.SIGABRT)  # what nbdkit's own failed assertion does
    # Right away, in the restart window: show and status wait for the new nbdkit, as live commands do.
    assert js(cli("volume", "show", "vol0", "--json", check=True))["server"] is True
    second = _next_nbdkit(server, first)
    server.wait_ready()
    with pytest.raises(nbd.Error):
        h.pread(4096, 0)  # the old connection died with the old nbdkit
    h = server.connect("vol0")
    assert h.pread(len(data), 4096) == data
    h2 = server.connect("other")
    h2.pwrite(b"o" * 4096, 0)
    h2.shutdown()
    h.shutdown()
    os.kill(second, signal.SIGSEGV)
    _next_nbdkit(server, second)
    server.wait_ready()
    pong = control(server.data_dir, {"op": "ping"})
    assert pong["pid"] == server.proc.pid and pong["restarts"] == 2
    assert "died of SIGABRT; restarting it (restart 1)" in server.log()
    assert "died of SIGSEGV; restarting it (restart 2)" in server.log()
    h = server.connect("other")
    assert h.pread(4096, 0) == b"o" * 4096
    h.shutdown()
    last = server.nbdkit_pid()
    assert server.stop() == 0  # SIGTERM is passed on; nbdkit exits cleanly and serve with it
    assert not running(last)


def test_a_stop_while_nbdkit_starts_is_a_clean_stop_and_nbdkit_stopped_or_killed_directly_stops_serve(server, cli):
    """SIGTERM to serve while its new nbdkit is still loading (it cannot handle it yet): exit 0, nothing
    left.  SIGTERM straight to nbdkit (not through serve): serve stops too, saying so, not a restart."""
    first = server.nbdkit_pid()
    os.kill(first, signal.SIGABRT)
    starting = _next_nbdkit(server, first)
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(60) == 0
    wait_for(lambda: not running(starting), 30, what="nbdkit gone")
    server.stop()
    server.start()
    os.kill(server.nbdkit_pid(), signal.SIGTERM)
    assert server.proc.wait(60) == 0
    assert "stopped directly, not through blockd serve" in server.log()
    server.stop()
    server.start()  # kill -9 of nbdkit's pid (not a crash from within): the server ends, as before
    os.kill(server.nbdkit_pid(), signal.SIGKILL)
    assert server.proc.wait(60) == 128 + signal.SIGKILL
    assert "was killed (SIGKILL): serve stops too" in server.log()
    server.stop()
    server.start()  # and a serve started again at once gets the data dir
    assert js(cli("volume", "show", "vol0", "--json", check=True))["server"] is True


def test_serve_gives_up_on_an_nbdkit_that_keeps_crashing_as_it_starts(server):
    """A crash of an nbdkit that served is always restarted; RESTART_LIMIT crashes in a row of one that
    had not started serving yet (it cannot start) make serve exit 1 with one line, not loop."""
    from blockd.server import RESTART_LIMIT

    pid = server.nbdkit_pid()
    os.kill(pid, signal.SIGABRT)  # this one served: restarted, the count of failed starts stays 0
    for n in range(1, RESTART_LIMIT + 1):
        pid = _next_nbdkit(server, pid)
        os.kill(pid, signal.SIGABRT)  # before it serves (it takes a second to load the plugin)
    assert server.proc.wait(60) == 1
    log = server.log()
    assert "died of SIGABRT; restarting it (restart 1)" in log
    assert f"while starting, {RESTART_LIMIT} times in a row: giving up" in log
    assert log.count("while starting; restarting it") == RESTART_LIMIT - 1
    with pytest.raises(nbd.Error):
        server.connect("vol0")


def test_online_resize_through_the_server(server, cli):
    h = server.connect("vol0")
    assert h.get_size() == 64 * MiB
    out = js(cli("volume", "resize", "vol0", "--size", "128MiB", "--json"))
    assert out == {"name": "vol0", "old_size": 64 * MiB, "size": 128 * MiB, "online": True}
    h2 = server.connect("vol0")
    assert h2.get_size() == 128 * MiB
    h2.pwrite(b"z" * 4096, 100 * MiB)
    assert h2.pread(4096, 100 * MiB) == b"z" * 4096
    one_line_error(cli("volume", "resize", "vol0", "--size", "32MiB"), 1, "shrink")
    assert js(cli("volume", "show", "vol0", "--json"))["size"] == 128 * MiB
    h.shutdown()
    h2.shutdown()


def test_online_scrub_flushes_first_then_finds_a_flipped_byte(server, data_dir, cli):
    h = server.connect("vol0")
    data = os.urandom(4 * MiB + 8192)
    h.pwrite(data, 0)  # not flushed: scrub must flush before it verifies
    out = js(cli("scrub", "vol0", "--json"))
    assert out["clean"] and out["online"] and out["scanned_bytes"] >= 4 * MiB
    vol_id = js(cli("volume", "show", "vol0", "--json"))["id"]
    chunk = os.path.join(data_dir, "volumes", str(vol_id), "0000000000000000.chunk")
    fd = os.open(chunk, os.O_RDWR)
    try:
        byte = os.pread(fd, 1, 12345)
        os.pwrite(fd, bytes([byte[0] ^ 0x10]), 12345)
    finally:
        os.close(fd)
    proc = cli("scrub", "vol0", "--json")
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["corrupt_offsets"] == [12345 // 4096 * 4096]
    h.shutdown()


def test_prime_day_plan_provisioned_while_serving_last_volume_attaches(server, data_dir, cli):
    out = js(cli("provision", PRIME_DAY, "--json"))
    assert out["volumes_created"] == 15424
    last = js(cli("volume", "list", "--json"))[-2]  # sorted by name: vol0 is last
    assert last["name"] == "prime-15423" and last["size"] == 16 << 40
    h = server.connect("prime-15423")
    assert h.get_size() == 16 << 40
    payload = os.urandom(64 * 1024)
    h.pwrite(payload, (16 << 40) - len(payload))  # the very end of the volume
    h.flush()
    assert h.pread(len(payload), (16 << 40) - len(payload)) == payload
    h.shutdown()
    cap = js(cli("capacity", "show", "--json"))
    assert cap["logical_provisioned"] == 241 * (1 << 50) + 64 * MiB  # plus vol0
    assert cap["volumes"] == 15425


@pytest.mark.parametrize(
    "raw, needle",
    [
        (b"not json\n", "not JSON"),
        (b"[1, 2]\n", "JSON object"),
        (b'{"op": "format-disk"}\n', "unknown control operation"),
        (b'{"op": "delete", "name": 7}\n', "name must be a string"),
        (b'{"op": "delete", "name": "BAD NAME"}\n', "invalid volume name"),
        (b'{"op": "resize", "name": "vol0", "size": "big"}\n', "size must be an integer"),
        (b'{"op": "resize", "name": "vol0", "size": 4097}\n', "multiple of 4096"),
        (b'{"op": "delete", "name": "vol0", "force": "yes"}\n', "force must be"),
        (b"\xff\xfe\n", "not JSON"),
        (b"{" + b" " * (70 * 1024), "longer than"),
    ],
)
def test_malformed_control_requests_get_one_error_and_change_nothing(server, data_dir, cli, raw, needle):
    before = js(cli("volume", "list", "--json"))
    replies = control_raw(data_dir, raw)
    assert len(replies) == 1 and replies[0]["ok"] is False and needle in replies[0]["error"], replies
    assert js(cli("volume", "list", "--json")) == before
    assert control_raw(data_dir, b'{"op": "ping"}\n')[0]["result"]["pid"] == server.proc.pid
    assert server.proc.poll() is None


def test_after_kill9_live_commands_work_offline(server, data_dir, cli):
    h = server.connect("vol0")
    h.pwrite(b"k" * 4096, 0)
    h.flush()
    server.kill9()
    assert os.path.exists(os.path.join(data_dir, "control.sock"))  # stale: nobody listens
    out = js(cli("volume", "resize", "vol0", "--size", "96MiB", "--json"))
    assert out["online"] is False and out["size"] == 96 * MiB
    scrubbed = js(cli("scrub", "vol0", "--json"))
    assert scrubbed["clean"] and not scrubbed["online"]
    out = js(cli("volume", "delete", "vol0", "--json"))
    assert out["online"] is False
    assert os.listdir(os.path.join(data_dir, "volumes")) == []


def test_restart_replaces_a_stale_control_socket(server, data_dir, cli):
    server.kill9()
    server.start()
    assert control_raw(data_dir, b'{"op": "ping"}\n')[0]["result"]["pid"] == server.proc.pid
    assert js(cli("volume", "show", "vol0", "--json"))["server"] is True


def test_volumes_created_while_serving_are_attachable_and_deletable(server, cli):
    cli("volume", "create", "late", "--size", "8MiB", check=True)
    h = server.connect("late")
    h.pwrite(b"L" * 4096, 0)
    assert h.pread(4096, 0) == b"L" * 4096
    h.shutdown()
    wait_for(lambda: js(cli("volume", "show", "late", "--json"))["connections"] == 0, what="detach")
    assert js(cli("volume", "delete", "late", "--json"))["online"] is True
    assert [v["name"] for v in js(cli("volume", "list", "--json"))] == ["vol0"]


def test_live_commands_on_unknown_volumes_are_refused(server, cli):
    for argv in (["volume", "delete", "nope"], ["volume", "resize", "nope", "--size", "1G"], ["scrub", "nope"]):
        one_line_error(cli(*argv), 1, "nope")
    assert run_cli("volume", "list", "--json", data_dir=server.data_dir).returncode == 0
