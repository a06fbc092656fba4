"""The control socket: how CLI commands reach a running server's engine.

A running ``blockd serve`` listens on ``<data dir>/control.sock`` (a unix
socket, mode 0600, in a 0700 directory).  One request per connection, one
JSON object on one line; the reply is zero or more progress lines and one
final line::

    -> {"op": "delete", "name": "db1", "force": false}
    <- {"progress": 4194304, "total": 8388608}          (scrub only)
    <- {"ok": true, "result": {...}}
    <- {"ok": false, "error": "volume db1 is attached ...", "kind": "Busy", "exit_code": 1}

Owns the wire format, the listener thread and the client.  It never imports
the engine: the server hands it an object with the engine's control methods
(``connections``, ``attached``, ``resize``, ``delete``, ``scrub``, ``qos``,
``set_credits``, ``modify``), so the CLI
can import this module without loading numba.  A malformed request gets one
error line back and the listener keeps serving.
"""

import errno
import json
import os
import socket
import sys
import threading
import time

from . import errors, pythreads
from .errors import BadInput, BlockdError, Busy
from .serveinfo import serve_pid, serve_restarts
from .sizes import check_name, check_volume_size

SOCKET_NAME = "control.sock"
MAX_REQUEST_BYTES = 64 * 1024
CONNECT_TIMEOUT_SECONDS = 5.0
REPLY_TIMEOUT_SECONDS = 120.0  # a delete of a big volume frees many files; scrub has no timeout
SERVER_START_WAIT_SECONDS = 15.0  # data dir locked but no socket yet: a server is starting

_UNIX_PATH_MAX = 100  # sun_path is 108 bytes; longer paths go through /proc/self/fd


def socket_path(datadir_path):
    return os.path.join(datadir_path, SOCKET_NAME)


class _ShortPath:
    """A unix socket path short enough for sun_path, via /proc/self/fd/N when needed."""

    def __init__(self, path):
        self.path = path
        self._fd = None
        if len(path.encode()) > _UNIX_PATH_MAX:
            self._fd = os.open(os.path.dirname(path), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            self.address = f"/proc/self/fd/{self._fd}/{os.path.basename(path)}"
        else:
            self.address = path

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self.address

    def __exit__(self, *exc):
        self.close()
        return False


# ---- server ---------------------------------------------------------------------
class ControlServer:
    """Listens on the control socket in a daemon thread; one thread per request."""

    def __init__(self, datadir_path, engine, log=None, metrics=None, sink=None):
        self.path = socket_path(datadir_path)
        self.engine = engine
        self.sink = sink  # the replication sink, if this node runs one
        self.metrics = metrics  # HOST:PORT of the metrics endpoint, if any (for `blockd status`)
        self.log = log or (lambda line: sys.stderr.write(f"blockd: control: {line}\n"))
        self.malformed = 0
        self._sock = None

    def start(self):
        # We hold the data-dir lock: any socket file here is a dead server's.
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        with _ShortPath(self.path) as address:
            sock.bind(address)
        os.chmod(self.path, 0o600)  # before listen(): nobody can connect until then
        sock.listen(64)
        self._sock = sock
        threading.Thread(target=self._accept_loop, name="blockd-control", daemon=True).start()
        return self

    def _accept_loop(self):
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError as exc:
                if exc.errno in (errno.EBADF, errno.EINVAL):
                    return  # closed
                self.log(f"accept: {exc.strerror}")
                time.sleep(0.1)
                continue
            threading.Thread(target=self._serve_one, args=(conn,), name="blockd-control-req", daemon=True).start()

    def close(self):
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def _serve_one(self, conn):
        with conn:
            conn.settimeout(CONNECT_TIMEOUT_SECONDS)
            try:
                request = _read_request(conn)
            except BadInput as exc:
                self.malformed += 1
                self.log(f"refused a malformed request: {exc}")
                try:
                    _send(conn, _error_reply(exc))
                    _linger(conn)
                except OSError:
                    pass
                return
            except OSError:
                return
            conn.settimeout(None)

            def emit(line):
                _send(conn, line)

            try:
                result = self.dispatch(request, emit)
                reply = {"ok": True, "result": result}
            except BlockdError as exc:
                reply = _error_reply(exc)
            except Exception as exc:  # a bug: answer, log, keep serving
                self.log(f"{request.get('op')}: {type(exc).__name__}: {exc}")
                reply = _error_reply(BlockdError(f"internal error: {type(exc).__name__}: {exc}"))
            try:
                _send(conn, reply)
            except OSError:
                pass  # the client went away; the operation itself is done

    def dispatch(self, request, emit):
        op = request.get("op")
        handler = _OPS.get(op)
        if handler is None:
            raise BadInput(f"unknown control operation {op!r}: known are {', '.join(sorted(_OPS))}")
        return handler(self, request, emit)

    # ---- operations ----------------------------------------------------------
    def _op_ping(self, request, emit):
        return {"pid": serve_pid(), "nbdkit_pid": os.getpid(), "restarts": serve_restarts(), "metrics": self.metrics, "thread_states": pythreads.kept(),
                "thread_states_deleted": pythreads.deleted}

    def _op_attached(self, request, emit):
        if request.get("name") is None:
            return {"volumes": self.engine.attached()}
        name = _name(request)
        return {"name": name, "connections": self.engine.connections(name)}

    def _op_resize(self, request, emit):
        name = _name(request)
        size = _int(request, "size")
        check_volume_size(size)
        old, new = self.engine.resize(name, size)
        return {"name": name, "old_size": old, "size": new}

    def _op_delete(self, request, emit):
        name = _name(request)
        force = request.get("force", False)
        if not isinstance(force, bool):
            raise BadInput("invalid request: force must be true or false")
        report = {}
        cut = self.engine.delete(name, force=force, report=report)
        return {"name": name, "connections_cut": cut, "copies_pending_delete": report.get("copies_pending_delete", [])}

    def _op_scrub(self, request, emit):
        name = _name(request)
        done = [0]
        last = [0.0]

        def progress(nbytes):
            done[0] += nbytes
            now = time.monotonic()
            if now - last[0] >= 0.2:  # a few lines a second, however fast the scrub
                last[0] = now
                emit({"progress": done[0]})

        repair = request.get("repair", False)
        if not isinstance(repair, bool):
            raise BadInput("invalid request: repair must be true or false")
        bad, repaired = self.engine.scrub(name, progress=progress, repair=repair)
        return {"name": name, "scanned_bytes": done[0], "corrupt_offsets": bad, "repaired_offsets": repaired}


    def _op_qos(self, request, emit):
        name = _name(request)
        out = self.engine.qos(name)
        if not request.get("trace"):
            out.pop("trace", None)
        return out

    def _op_set_credits(self, request, emit):
        name = _name(request)
        credits = request.get("credits")
        if isinstance(credits, bool) or not isinstance(credits, (int, float)) or credits < 0:
            raise BadInput("invalid request: credits must be a non-negative number")
        self.engine.set_credits(name, float(credits))
        return self.engine.qos(name)

    def _op_modify(self, request, emit):
        name = _name(request)
        changes = {}
        for key in ("type", "size", "iops", "throughput"):
            value = request.get(key)
            if value is None:
                continue
            if key == "type":
                if not isinstance(value, str):
                    raise BadInput("invalid request: type must be a string")
            elif isinstance(value, bool) or not isinstance(value, int):
                raise BadInput(f"invalid request: {key} must be an integer")
            changes["type_" if key == "type" else key] = value
        reset = request.get("reset", [])
        if not isinstance(reset, list) or not set(reset) <= {"iops", "throughput"}:
            raise BadInput("invalid request: reset must list iops and/or throughput")
        row = self.engine.modify(name, reset=tuple(reset), **changes)
        return {"name": name, "id": row["id"]}


    def _op_replication(self, request, emit):
        return self.engine.replication_status(_name(request))

    def _op_set_min_copies(self, request, emit):
        name = _name(request)
        self.engine.set_min_copies(name, _int(request, "min_copies"))
        return self.engine.replication_status(name)

    def _op_promote(self, request, emit):
        force = request.get("force", False)
        if not isinstance(force, bool):
            raise BadInput("invalid request: force must be true or false")
        manager = self.engine.replication
        return self.engine.promote(_name(request), force=force,
                                   survivors=manager.query_copies if manager is not None else None)

    def _op_sink(self, request, emit):
        if self.sink is None:
            raise BadInput("this server runs no replication sink (--replication-listen)")
        return self.sink.status()

    def _op_verify(self, request, emit):
        name = _name(request)
        diffs, size, sizes = self.engine.verify(name)
        return {"name": name, "differences": diffs, "size": size, "sizes": sizes}


_OPS = {
    "replication": ControlServer._op_replication,
    "sink": ControlServer._op_sink,
    "promote": ControlServer._op_promote,
    "set-min-copies": ControlServer._op_set_min_copies,
    "verify": ControlServer._op_verify,
    "qos": ControlServer._op_qos,
    "set-credits": ControlServer._op_set_credits,
    "modify": ControlServer._op_modify,
    "ping": ControlServer._op_ping,
    "attached": ControlServer._op_attached,
    "resize": ControlServer._op_resize,
    "delete": ControlServer._op_delete,
    "scrub": ControlServer._op_scrub,
}


def _name(request):
    name = request.get("name")
    if not isinstance(name, str):
        raise BadInput("invalid request: name must be a string")
    return check_name(name)


def _int(request, key):
    value = request.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadInput(f"invalid request: {key} must be an integer")
    return value


def _read_request(conn):
    data = b""
    while b"\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            if not data:
                raise OSError(errno.ECONNRESET, "closed before a request")
            break
        data += chunk
        if len(data) > MAX_REQUEST_BYTES:
            raise BadInput(f"invalid request: longer than {MAX_REQUEST_BYTES} bytes")
    line = data.split(b"\n", 1)[0]
    try:
        request = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadInput(f"invalid request: not JSON ({exc})") from None
    if not isinstance(request, dict):
        raise BadInput("invalid request: expected a JSON object")
    return request


def _linger(conn, limit=4 * MAX_REQUEST_BYTES):
    """Let the client read our error: closing with unread input would reset the connection."""
    conn.shutdown(socket.SHUT_WR)
    drained = 0
    while drained < limit:
        chunk = conn.recv(65536)
        if not chunk:
            return
        drained += len(chunk)


def _send(conn, obj):
    conn.sendall(json.dumps(obj).encode() + b"\n")


def _error_reply(exc):
    return {"ok": False, "error": str(exc), "kind": type(exc).__name__, "exit_code": exc.exit_code}


# ---- client ---------------------------------------------------------------------
class NoServer(Exception):
    """No server answers on this data dir's control socket."""


def connect(datadir_path):
    """A connected socket to the running server, or raise NoServer."""
    path = socket_path(datadir_path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(CONNECT_TIMEOUT_SECONDS)
    try:
        with _ShortPath(path) as address:
            sock.connect(address)
    except FileNotFoundError:
        sock.close()
        raise NoServer(path) from None
    except OSError as exc:
        sock.close()
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTDIR):
            raise NoServer(path) from None
        raise BlockdError(f"control socket {path}: {exc.strerror}") from None
    return sock


def call(sock, op, progress=None, timeout=REPLY_TIMEOUT_SECONDS, **args):
    """Send one request on a connected socket; return its result or raise the server's error."""
    request = {"op": op, **args}
    with sock:
        sock.settimeout(timeout)
        try:
            _send(sock, request)
            reader = sock.makefile("rb")
            for raw in reader:
                reply = json.loads(raw)
                if "progress" in reply:
                    if progress:
                        progress(reply["progress"])
                    continue
                if reply.get("ok"):
                    return reply.get("result")
                raise _error_from(reply)
        except socket.timeout:
            raise BlockdError(f"server did not answer {op} within {timeout:.0f} s") from None
        except (OSError, ValueError) as exc:
            raise BlockdError(f"control socket: {op}: {exc}") from None
    raise BlockdError(f"server closed the control connection during {op} (is it shutting down?)")


def _error_from(reply):
    cls = getattr(errors, str(reply.get("kind")), None)
    if not (isinstance(cls, type) and issubclass(cls, BlockdError)):
        cls = BlockdError
    exc = cls(reply.get("error", "unknown error"))
    exc.exit_code = reply.get("exit_code", cls.exit_code)
    return exc


def connect_serving(datadir, timeout=None):
    """A connected socket to the running server, waiting (up to ``timeout``) through a restart of its
    nbdkit: while `blockd serve` holds the data dir but its control socket does not answer yet.
    NoServer at once when no server holds the data dir."""
    deadline = time.monotonic() + (SERVER_START_WAIT_SECONDS if timeout is None else timeout)
    delay = 0.02
    while True:
        try:
            return connect(datadir.path)
        except NoServer:
            if not datadir.serve_holds_lock() or time.monotonic() >= deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.25)


def wait_for_server_or_lock(datadir, timeout=None):
    """Either a connected control socket (a server runs) or the data-dir lock fd (offline).

    Returns ("online", sock) or ("offline", lock_fd).  While the lock is held
    but nothing answers (a server starting, or another offline command),
    retries until ``timeout``, then refuses clearly.
    """
    deadline = time.monotonic() + (SERVER_START_WAIT_SECONDS if timeout is None else timeout)
    delay = 0.02
    while True:
        try:
            return "online", connect(datadir.path)
        except NoServer:
            pass
        try:
            return "offline", datadir.lock()
        except Busy as exc:
            if time.monotonic() >= deadline:
                raise Busy(f"{exc}; its control socket does not answer") from None
        time.sleep(delay)
        delay = min(delay * 2, 0.25)
