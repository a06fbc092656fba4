"""Shared fixtures: data dirs, the blockd CLI, and a real `blockd serve` (nbdkit)."""

import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCKD = [sys.executable, "-m", "blockd.cli"]
sys.path.insert(0, os.path.join(ROOT, "tests"))


def run_cli(*args, data_dir=None, check=False, env=None, timeout=120):
    """Run the blockd CLI as a user would; returns CompletedProcess (text)."""
    cmd = list(BLOCKD)
    if data_dir is not None:
        cmd += ["--data-dir", str(data_dir)]
    cmd += [str(a) for a in args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}): {proc.stderr}")
    return proc


def js(proc):
    """The JSON a successful CLI run printed (fails the test, with stderr, otherwise)."""
    import json

    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
    return json.loads(proc.stdout)


def free_port():
    """A loopback TCP port free right now (tests never use fixed ports)."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def control_raw(data_dir, raw):
    """Send raw bytes to a data dir's control socket; the reply lines as JSON objects."""
    import json
    import socket

    s = socket.socket(socket.AF_UNIX)
    fd = os.open(str(data_dir), os.O_PATH)  # the tmp path may be longer than sun_path
    try:
        s.connect(f"/proc/self/fd/{fd}/control.sock")
        s.sendall(raw)
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(1 << 20):
            data += chunk
    finally:
        s.close()
        os.close(fd)
    return [json.loads(line) for line in data.splitlines()]


def control(data_dir, request):
    """One control request (a dict); its result (fails the test if the server refused it)."""
    import json

    reply = control_raw(data_dir, json.dumps(request).encode() + b"\n")[-1]
    assert reply["ok"], reply
    return reply["result"]


def wait_for(predicate, timeout=60.0, interval=0.05, what="condition"):
    """Poll ``predicate`` until it returns a truthy value; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def run_in_threads(target, args_list):
    """Run ``target(*args)`` for each args in its own thread, all at once; the exceptions they raised."""
    import threading

    errors = []

    def run(args):
        try:
            target(*args)
        except Exception as exc:  # reported to the caller, who asserts on it
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(args,)) for args in args_list]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def running(pid):
    """Whether ``pid`` exists and is not a zombie (a zombie has let go of its files and sockets)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0] != "Z"
    except OSError:
        return False


class Server:
    """A real `blockd serve` on a unix socket, started as a child process."""

    def __init__(self, data_dir, sock, threads=None, extra=(), prefix=()):
        self.data_dir = str(data_dir)
        self.sock = str(sock)
        self.threads = threads
        self.extra = list(extra)
        self.prefix = list(prefix)  # e.g. ["ip", "netns", "exec", NS]: it execs, so the pid stays the server's
        self.proc = None
        self.log_path = os.path.join(os.path.dirname(self.sock), f"serve-{os.path.basename(self.sock)}.log")

    def uri(self, name):
        return f"nbd+unix:///{name}?socket={self.sock}"

    def listen(self):
        """What `blockd serve --listen` gets."""
        return f"unix:{self.sock}"

    def dial(self, h):
        """Connect libnbd handle ``h`` to the server; False if it cannot be listening yet."""
        if not os.path.exists(self.sock):
            return False
        h.connect_unix(self.sock)
        return True

    def start(self, wait=True):
        cmd = self.prefix + BLOCKD + ["serve", "--data-dir", self.data_dir, "--listen", self.listen()]
        if self.threads:
            cmd += ["--threads", str(self.threads)]
        cmd += self.extra
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout=120):
        import nbd

        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"blockd serve exited with {self.proc.returncode}: {self.log()}")
            h = nbd.NBD()
            try:
                h.set_opt_mode(True)
                if not self.dial(h):
                    return False
                h.opt_abort()
                return True
            except nbd.Error:
                return False

        wait_for(ready, timeout, what="blockd serve to accept connections")

    def log(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self, sig=signal.SIGTERM, timeout=60):
        if self.proc is None:
            return None
        child = None
        if sig == signal.SIGKILL and self.proc.poll() is None:
            child = self.nbdkit_pid()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        if child is not None:
            # A node crash: nbdkit dies with `blockd serve` (PR_SET_PDEATHSIG), which takes the kernel a
            # moment (~0.2 s here); the tests that go on at once must not meet it still answering.
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass
            wait_for(lambda: not running(child), 30, interval=0.005, what="nbdkit to die")
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()
        code = self.proc.returncode
        self.proc = None
        return code

    def kill9(self):
        return self.stop(signal.SIGKILL)

    def nbdkit_pid(self):
        """The pid of the nbdkit that `blockd serve` (self.proc, its supervisor) runs now; None between
        a crash and its restart."""
        pid = self.proc.pid
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                children = [int(c) for c in f.read().split()]
        except OSError:
            return None
        for child in children:
            try:
                with open(f"/proc/{child}/comm") as f:
                    if f.read().strip() == "nbdkit" and running(child):
                        return child
            except OSError:
                pass
        return None

    def connect(self, name):
        import nbd

        h = nbd.NBD()
        h.add_meta_context("base:allocation")
        h.connect_uri(self.uri(name))
        return h


@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "data"
    return d


@pytest.fixture
def cli(data_dir):
    def _cli(*args, **kw):
        return run_cli(*args, data_dir=data_dir, **kw)

    return _cli


@pytest.fixture
def sock_dir():
    """A short directory for unix sockets (paths are limited to 107 bytes)."""
    import shutil
    import tempfile

    d = tempfile.mkdtemp(prefix="bd-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def server_factory(sock_dir):
    servers = []

    def make(data_dir, name="nbd.sock", **kw):
        s = Server(data_dir, os.path.join(sock_dir, name), **kw)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.stop(signal.SIGKILL)


@pytest.fixture
def server(data_dir, server_factory, cli):
    """A running server with volume `vol0` (64 MiB)."""
    cli("volume", "create", "vol0", "--size", "64MiB", check=True)
    return server_factory(data_dir).start()
