"""What the nbdkit plugin calls: configuration, the shared engine, exports.

The plugin file (plugins/blockd_nbd.py) stays boring; this module holds the
little state an nbdkit process has (one Engine) and turns plugin parameters
into it.  It never imports nbdkit, so it is testable without nbdkit.

Handles returned by ``open_export`` are ``Volume`` objects (shared by every
connection to the same export) wrapped in a per-connection ``Export`` that
knows whether the connection is read-only.
"""

import fcntl
import os
import resource
import select
import sys
import threading
import time

from . import serveinfo
from .control import ControlServer
from .datadir import DataDir
from .engine import Engine
from .errors import BadInput, ReadOnly
from .sizes import format_size
from .volume import wrap_unexpected

BLOCK_SIZES = (1, 4096, 32 * 1024 * 1024)  # min 1 (we read-modify-write), preferred one block, max NBD's usual 32M

QOS_PERSIST_SECONDS = 5.0
SHUTDOWN_GRACE_SECONDS = 0.2  # let in-flight replies go out before the final flush
_KEYS = {"data_dir", "lock_fd", "metrics", "replication_listen", "key_dir", "insecure_replication", "ack_timeout",
         "write_timeout", "heartbeat", "resync_mibps"}
_FLOAT_KEYS = ("ack_timeout", "write_timeout", "heartbeat", "resync_mibps")
_shutdown_lock = threading.Lock()
_config = {}
_engine = None
_control = None
_metrics = None
_sink = None
_stopping = threading.Event()  # set at cleanup: background checks end before the catalog closes


def config(key, value):
    if key not in _KEYS:
        raise BadInput(f"unknown parameter {key!r}: blockd takes {', '.join(sorted(_KEYS))}")
    _config[key] = value


def config_complete():
    if "data_dir" not in _config:
        raise BadInput("data_dir=DIR is required")
    if "lock_fd" in _config:
        try:
            int(_config["lock_fd"])
        except ValueError:
            raise BadInput(f"invalid lock_fd {_config['lock_fd']!r}") from None
    if "metrics" in _config:
        _metrics_address()
    for key in _FLOAT_KEYS:
        if key in _config:
            try:
                if float(_config[key]) <= 0:
                    raise ValueError
            except ValueError:
                raise BadInput(f"invalid {key}={_config[key]!r}: a positive number of seconds (MiB/s for resync)") from None


def _metrics_address():
    host, sep, port = _config["metrics"].rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise BadInput(f"invalid metrics={_config['metrics']!r}: expected HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


def _raise_fd_limit():
    """Open files: soft limit up to the hard limit (chunk descriptors, sockets)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


def get_ready():
    global _engine, _metrics
    _raise_fd_limit()
    datadir = DataDir(_config["data_dir"]).init()
    if "lock_fd" in _config:
        datadir.adopt_lock(int(_config["lock_fd"]))
    else:
        datadir.lock()
    if "metrics" in _config:
        from .metrics import Metrics  # prometheus_client only when asked for

        _metrics = Metrics()
    _engine = Engine(datadir, events=_metrics, qos_trace=int(os.environ.get("BLOCKD_QOS_TRACE", "0") or 0))
    if _metrics is not None:
        _metrics.engine = _engine
    _setup_replication(datadir)


def _replication_settings():
    from .replication import Settings

    kw = {k: float(_config[k]) for k in _FLOAT_KEYS if k in _config}
    return Settings(insecure=_config.get("insecure_replication") == "1", listen=_config.get("replication_listen"),
                    **kw)


def _setup_replication(datadir):
    """A replication manager when this node can speak to peers (keys, or explicitly insecure)."""
    from . import keys as keyfiles

    settings_needed = _config.get("insecure_replication") == "1" or "replication_listen" in _config
    key_dir = _config.get("key_dir") or keyfiles.default_key_dir()
    node_keys = None
    try:
        node_keys = keyfiles.load(key_dir)
    except Exception:
        if settings_needed and _config.get("insecure_replication") != "1":
            raise
    if node_keys is None and _config.get("insecure_replication") != "1":
        return  # no identity: replicated volumes refuse to open, everything else works
    from .replication import Manager

    _engine.replication = Manager(_engine, node_keys, _replication_settings())


def after_fork():
    """Threads (control, replication, metrics) start here, never before nbdkit forks."""
    global _control, _sink
    if _metrics is not None:
        _metrics.serve(*_metrics_address())
    if "replication_listen" in _config:
        from .replication import Sink

        manager = _engine.replication
        allowed = [p["public_key"] for p in _engine.catalog.peers() if p["public_key"]]
        _sink = Sink(_engine, _config["replication_listen"], manager.keys, manager.settings, allowed).start()
        _engine.sink = _sink
    if _engine.replication is not None:
        # A replica promoted while this node was down: this primary learns it now, not at its next open.
        threading.Thread(target=_engine.replication.check_epochs, args=(_stopping,), name="blockd-epoch-check",
                         daemon=True).start()
        # Replicas of volumes no client has open here catch up too (a peer that missed writes or restarted).
        threading.Thread(target=_engine.replication.catch_up, args=(_stopping,), name="blockd-catch-up",
                         daemon=True).start()
    _control = ControlServer(_engine.datadir.path, _engine, metrics=_config.get("metrics"), sink=_sink).start()
    threading.Thread(target=_persist_qos_loop, name="blockd-qos-persist", daemon=True).start()
    quit_fd = find_quit_pipe()
    if quit_fd is not None:
        threading.Thread(target=_watch_quit, args=(quit_fd,), name="blockd-quit", daemon=True).start()
    serveinfo.notify_ready()


def _persist_qos_loop():
    """Burst balances to the catalog every few seconds: a crash or restart never refills credits."""
    while True:
        time.sleep(QOS_PERSIST_SECONDS)
        engine = _engine
        if engine is not None:
            engine.persist_qos()


def find_quit_pipe():
    """nbdkit's quit pipe: the one pipe whose read and write ends are both ours.

    nbdkit 1.32 answers SIGTERM by writing to this pipe, then replies
    ESHUTDOWN to clients and waits for each to disconnect, which an attached
    kernel client never does on its own.  Watching the read end lets blockd
    flush every volume and exit promptly instead.  None if not exactly one
    candidate (then nbdkit's own behaviour applies).
    """
    ends = {}
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return None
    for name in names:
        try:
            fd = int(name)
            target = os.readlink(f"/proc/self/fd/{name}")
        except (ValueError, OSError):
            continue
        if not target.startswith("pipe:"):
            continue
        try:
            mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
        except OSError:
            continue
        ends.setdefault(target, {})[mode] = fd
    candidates = [e[os.O_RDONLY] for e in ends.values() if set(e) == {os.O_RDONLY, os.O_WRONLY}]
    if len(candidates) != 1:
        return None
    poller = select.poll()
    poller.register(candidates[0], select.POLLIN)
    if poller.poll(0):
        return None  # already readable: not a quiet quit pipe
    return candidates[0]


def _watch_quit(fd):
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while not poller.poll(None):
        pass
    _stopping.set()  # background work (a catch-up's visit) ends before the flush
    with _shutdown_lock:
        if _engine is None:
            return
        # Give requests already in flight a moment to be answered, then make
        # everything durable and leave: clients see the connection close.
        time.sleep(SHUTDOWN_GRACE_SECONDS)
        if _control is not None:
            _control.close()
        _engine.persist_qos()
        failed = _engine.flush_all()
        if failed:
            sys.stderr.write(f"blockd: terminated: flush FAILED for {', '.join(failed)}; exiting\n")
        else:
            sys.stderr.write("blockd: terminated: every open volume flushed; exiting\n")
        sys.stderr.flush()
        os._exit(1 if failed else 0)


def cleanup():
    _stopping.set()
    with _shutdown_lock:
        if _control is not None:
            _control.close()
        if _engine is not None:
            _engine.close()


def list_exports():
    return [(name, "blockd volume") for name in _engine.export_names()]


class Export:
    """One NBD connection's handle: the shared Volume plus this connection's mode.

    Bound methods go straight onto the handle (one attribute lookup per
    request); with metrics on, each is wrapped once here in its counter.
    """

    __slots__ = ("volume", "readonly", "size", "read", "write", "flush", "trim", "zero", "cache", "extents")

    def __init__(self, volume, readonly, metrics=None):
        self.volume = volume
        self.readonly = readonly or volume.readonly
        self.size = volume.size
        calls = {
            "read": volume.read,
            "write": volume.write if not self.readonly else self._refuse,
            "flush": volume.flush,
            "trim": volume.trim if not self.readonly else self._refuse,
            "zero": volume.zero if not self.readonly else self._refuse,
            "cache": volume.cache,
            "extents": volume.extents,
        }
        for attr, fn in calls.items():
            if metrics is not None:
                fn = metrics.wrap(volume, "block_status" if attr == "extents" else attr, fn)
            setattr(self, attr, fn)

    def _refuse(self, *args):
        raise ReadOnly(f"{self.volume.name}: connection is read-only")


def open_export(name, readonly):
    if not name:
        raise BadInput("no export name given: attach a volume by name, e.g. nbd://HOST/VOLUME")
    return Export(_engine.open(name, readonly), readonly, _metrics)


def close_export(handle):
    """Detach; the last connection flushes.  close cannot report an error: log one line."""
    if handle is not None and _engine is not None:
        try:
            _engine.release(handle.volume)
        except Exception as exc:
            sys.stderr.write(f"blockd: closing {handle.volume.name}: {exc}\n")


def describe(handle):
    v = handle.volume
    return f"blockd volume {v.name} ({format_size(v.size)})"


def to_error(context, exc):
    return wrap_unexpected(context, exc)
