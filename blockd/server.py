"""``blockd serve``: turn options into an nbdkit command line, run it, and restart it if it crashes.

``blockd serve`` stays as a small supervisor (one thread, no blockd state) with nbdkit as its child:
nbdkit 1.32 itself can abort (``raw_send_socket: Assertion `sock >= 0' failed``) when a client hangs up
with several replies on their way (its reply threads race the closing socket; measured in
docs/ARCHITECTURE.md), which would otherwise end every volume's service on the node.  A child that dies
of a crash signal (CRASH_SIGNALS: SIGABRT from a failed assertion, SIGSEGV, ...) is started again at
once; its volumes come back exactly as after ``kill -9`` (crash-consistent by design).  Any other death
(``kill -9`` of nbdkit's pid, the OOM killer) ends serve too, as when serve exec'd nbdkit: whoever
killed it meant the server (a service manager restarts it).  Only a child that keeps crashing before it serves
(RESTART_LIMIT times in a row: it cannot start; the plugin says when it serves through a pipe,
serveinfo.notify_ready) makes serve give up.
SIGTERM, SIGINT, SIGHUP and SIGQUIT are passed on and end the supervisor with the child.  The child gets
SIGKILL the moment the supervisor dies (PR_SET_PDEATHSIG), so ``kill -9`` of the serve PID is still a real
crash of the server with nothing left serving.

The data-dir lock is taken here and inherited by nbdkit (the plugin adopts it), so a second server on
the same data dir is refused before anything starts.  Owns finding nbdkit, the plugin and the Python path
the embedded interpreter needs.
"""

import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

from . import jitcache, serveinfo
from .errors import BadInput, BlockdError, Refused

DEFAULT_LISTEN = "127.0.0.1:10809"
CPU_POLICIES = {"batch": os.SCHED_BATCH, "normal": os.SCHED_OTHER}
DEFAULT_CPU_POLICY = "batch"  # measured (docs/benchmarks.md): +30% replicated 4 KiB writes on a busy host
DEFAULT_THREADS = 4  # per connection; measured best (tools/bench --sweep-threads): see docs/ARCHITECTURE.md
URI_LIST_MAX = 20
RESTART_LIMIT = 5  # nbdkit crashing this many times in a row before it served: serve gives up
PASSED_ON = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
CRASH_SIGNALS = (signal.SIGABRT, signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGSYS)
HOLDER_WAIT_SECONDS = 30.0  # a killed server's nbdkit still exiting: wait for it, then start


def parse_listen(text, flag="--listen"):
    """``HOST:PORT``, ``[V6]:PORT``, ``:PORT`` or ``unix:PATH`` -> ("tcp", host, port) | ("unix", path)."""
    if text.startswith("unix:"):
        path = text[5:]
        if not path:
            raise BadInput("invalid --listen unix: needs a socket path, e.g. unix:/run/blockd.sock")
        return ("unix", os.path.abspath(path))
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = text, "10809"
    host = host.strip("[]") or "127.0.0.1"
    try:
        port_number = int(port)
    except ValueError:
        raise BadInput(f"invalid {flag} {text!r}: port must be a number") from None
    if not 0 < port_number < 65536:
        raise BadInput(f"invalid {flag} {text!r}: port must be 1-65535")
    return ("tcp", host, port_number)


def find_plugin():
    """The nbdkit plugin file, from $BLOCKD_PLUGIN, a checkout, or an installed share dir."""
    candidates = [os.environ.get("BLOCKD_PLUGIN")]
    here = os.path.dirname(os.path.abspath(__file__))
    candidates.append(os.path.join(os.path.dirname(here), "plugins", "blockd_nbd.py"))
    candidates.append(os.path.join(sys.prefix, "share", "blockd", "plugins", "blockd_nbd.py"))
    for path in candidates:
        if path and os.path.isfile(path):
            return path
    raise BlockdError("cannot find plugins/blockd_nbd.py: set BLOCKD_PLUGIN or reinstall blockd")


def python_path():
    """sys.path of this interpreter (the venv) for nbdkit's embedded Python."""
    parts = []
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for p in [here, *sys.path]:
        if p and os.path.isdir(p) and p not in parts:
            parts.append(p)
    return os.pathsep.join(parts)


def clear_stale_socket(path):
    """Remove a unix socket left by a killed server; refuse if one is listening."""
    if not os.path.exists(path):
        return
    import stat

    if not stat.S_ISSOCK(os.lstat(path).st_mode):
        raise BadInput(f"invalid --listen unix:{path}: exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            os.unlink(path)
            return
        raise
    finally:
        probe.close()
    raise Refused(f"another server is listening on unix:{path}")


def uri(listen, name):
    if listen[0] == "unix":
        return f"nbd+unix:///{name}?socket={listen[1]}"
    host = listen[1]
    if ":" in host:
        host = f"[{host}]"
    return f"nbd://{host}:{listen[2]}/{name}"


def parse_metrics(text):
    """``HOST:PORT`` (or ``:PORT``) for the metrics endpoint -> (host, port)."""
    listen = parse_listen(text, "--metrics") if not text.startswith("unix:") else None
    if listen is None or ":" not in text:
        raise BadInput(f"invalid --metrics {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9810")
    return listen[1], listen[2]


def check_port_free(host, port, what):
    """Refuse before starting anything if another process listens there (one clear line, not a traceback)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    probe = socket.socket(family, socket.SOCK_STREAM)
    # As the real listeners do: a restart must not be refused for old connections in TIME_WAIT.
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        probe.bind((host, port))
        probe.listen(1)
    except OSError as exc:
        raise Refused(f"cannot listen for {what} on {host}:{port}: {exc.strerror}") from None
    finally:
        probe.close()


def build_command(datadir_path, listen, threads, lock_fd, nbdkit="nbdkit", verbose=False, metrics=None, extra=None):
    cmd = [nbdkit, "-f", "--threads", str(threads)]
    if verbose:
        cmd.append("-v")
    if listen[0] == "unix":
        cmd += ["-U", listen[1]]
    else:
        cmd += ["-i", listen[1], "-p", str(listen[2])]
    cmd += ["python", find_plugin(), f"data_dir={datadir_path}"]
    if lock_fd is not None:
        cmd.append(f"lock_fd={lock_fd}")
    if metrics is not None:
        cmd.append(f"metrics={metrics[0]}:{metrics[1]}")
    for key, value in (extra or {}).items():
        cmd.append(f"{key}={value}")
    return cmd


def parse_zmq_address(text, flag):
    """``tcp://HOST:PORT`` (what peers and --replication-listen take)."""
    import re

    m = re.fullmatch(r"tcp://(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.\-*]+):([0-9]{1,5})", text or "")
    if not m or not 0 < int(m.group(2)) < 65536:
        raise BadInput(f"invalid {flag} {text!r}: expected tcp://HOST:PORT, e.g. tcp://10.0.0.2:10810")
    return text


def set_cpu_policy(name):
    """Linux scheduling policy for this process, inherited by nbdkit and every thread it starts.

    ``batch`` (SCHED_BATCH): a thread that wakes up does not preempt the one running.  A replicated
    request hands work between many threads (nbdkit's, ZeroMQ's I/O threads, the sink); on a busy
    host each hand-off otherwise preempts the sender mid-request.  Fair share and nice are unchanged,
    and an idle CPU still runs a woken thread at once.  ``normal`` is SCHED_OTHER."""
    try:
        os.sched_setscheduler(0, CPU_POLICIES[name], os.sched_param(0))
    except OSError as exc:
        print(f"blockd: warning: --cpu-policy {name}: {exc.strerror}; keeping the current policy", file=sys.stderr)


def serve(datadir, listen_text=DEFAULT_LISTEN, threads=DEFAULT_THREADS, verbose=False, out=sys.stdout,
          metrics_text=None, replication=None, cpu_policy=DEFAULT_CPU_POLICY):
    """``replication``: plugin settings (replication_listen, key_dir, insecure_replication, timeouts)."""
    if cpu_policy not in CPU_POLICIES:
        raise BadInput(f"invalid --cpu-policy {cpu_policy!r}: use {' or '.join(CPU_POLICIES)}")
    listen = parse_listen(listen_text)
    metrics = parse_metrics(metrics_text) if metrics_text else None
    replication = {k: v for k, v in (replication or {}).items() if v is not None}
    if "replication_listen" in replication:
        parse_zmq_address(replication["replication_listen"], "--replication-listen")
        if replication.get("insecure_replication") != "1":
            from . import keys as keyfiles

            keyfiles.load(replication.get("key_dir") or keyfiles.default_key_dir())  # refuse now, clearly
    if threads < 1 or threads > 1024:
        raise BadInput(f"invalid --threads {threads}: use 1-1024")
    nbdkit = shutil.which("nbdkit")
    if nbdkit is None:
        raise BlockdError("nbdkit not found: run `make setup` (installs nbdkit and nbdkit-plugin-python)")
    # A server killed a moment ago (kill -9 of its serve PID) may still have its nbdkit exiting, holding
    # the lock and the ports: wait for it rather than refuse.  A live server is refused below, as before.
    datadir.wait_for_dead_holder(HOLDER_WAIT_SECONDS)
    # Ports first: a refused serve leaves nothing behind (not even a new data dir).
    if metrics is not None:
        check_port_free(*metrics, "metrics")
    if "replication_listen" in replication:
        host, _, port = replication["replication_listen"][6:].rpartition(":")
        host = host.strip("[]")
        check_port_free("0.0.0.0" if host == "*" else host, int(port), "replication")
    datadir.init()
    lock_fd = datadir.lock()
    catalog = datadir.catalog()
    try:
        count = catalog.count_volumes()
        replicas = catalog.count_replicas()
        names = catalog.volume_names(URI_LIST_MAX) if count <= URI_LIST_MAX else []
    finally:
        catalog.close()
    if listen[0] == "unix":
        clear_stale_socket(listen[1])
    os.set_inheritable(lock_fd, True)
    cmd = build_command(datadir.path, listen, threads, lock_fd, nbdkit, verbose, metrics, replication)
    env = dict(os.environ)
    env["PYTHONPATH"] = python_path()
    env["NUMBA_CACHE_DIR"] = jitcache.ensure()  # one shared JIT cache: nbdkit must not recompile
    if count <= URI_LIST_MAX:
        for name in names:
            print(f"{name} {uri(listen, name)}", file=out)
        if not names and not replicas:
            print(f"no volumes yet: blockd volume create NAME --size SIZE, then attach {uri(listen, 'NAME')}", file=out)
        elif not names:
            print("no volumes to export yet (replicas are exported only once promoted here)", file=out)
    else:
        print(f"{count} volumes: {uri(listen, 'NAME')}", file=out)
    if metrics is not None:
        host = f"[{metrics[0]}]" if ":" in metrics[0] else metrics[0]
        print(f"metrics http://{host}:{metrics[1]}/metrics", file=out)
    if "replication_listen" in replication:
        mode = "insecure (no CurveZMQ)" if replication.get("insecure_replication") == "1" else "CurveZMQ"
        held = f"; holds {replicas} replica cop{'y' if replicas == 1 else 'ies'} for peers" if replicas else ""
        print(f"replication sink {replication['replication_listen']} ({mode}){held}", file=out)
    out.flush()
    set_cpu_policy(cpu_policy)
    return supervise(cmd, env, lock_fd, listen, datadir)


def _die_with_parent(libc, parent):
    """In the child, before exec: SIGKILL when the supervisor (``parent``) dies; kept across exec."""
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the supervisor died before prctl took effect
        os._exit(1)


def _signal_name(signum):
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"  # real-time signals have no name here


def _die_of(signum):
    """End this process by ``signum`` (as nbdkit did), so a service manager sees what it sent."""
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    return 128 + signum  # not reached for a signal that terminates


def _got_ready(fd):
    """Whether the child wrote its ready byte (serveinfo.notify_ready) before it died."""
    os.set_blocking(fd, False)
    try:
        return os.read(fd, 1) == b"r"
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def supervise(cmd, env, lock_fd, listen, datadir, err=sys.stderr):
    """Run nbdkit (``cmd``) as a child until it exits; restart it after a crash.  Returns the exit code
    for ``blockd serve``: the child's; 0 when it ended by a stop signal serve passed on (also one that
    came while nbdkit was starting); 128+N when it died of signal N while stopping."""
    stop = []
    child = None

    def pass_on(signum, frame):
        stop.append(signum)
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    for signum in PASSED_ON:
        signal.signal(signum, pass_on)
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)  # loaded here: the child only calls it
    me = os.getpid()
    quick = 0  # crashes in a row before serving (during start)
    restarts = 0
    while True:
        if stop:  # asked to stop while restarting: start nothing
            return 0
        ready_r, ready_w = os.pipe()
        env[serveinfo.ENV_PID] = str(me)
        env[serveinfo.ENV_RESTARTS] = str(restarts)
        env[serveinfo.ENV_READY_FD] = str(ready_w)
        try:
            child = subprocess.Popen(cmd, env=env, pass_fds=(lock_fd, ready_w),
                                     preexec_fn=lambda: _die_with_parent(libc, me))
        finally:
            os.close(ready_w)
        try:
            datadir.record_holder(lock_fd, child.pid)
        except OSError as exc:  # e.g. a full disk: the lock itself still holds
            print(f"blockd: warning: cannot record nbdkit's pid in the lock file: {exc.strerror}", file=err)
        if stop:  # a signal came while the child was being started
            child.send_signal(stop[0])
        code = child.wait()
        served = _got_ready(ready_r)
        if code >= 0:
            if not stop:
                print(f"blockd: nbdkit (pid {child.pid}) exited with status {code} (stopped directly, not "
                      "through blockd serve): serve stops too", file=err, flush=True)
            return code
        signum = -code
        name = _signal_name(signum)
        if signum in PASSED_ON:
            # Stopped as asked (before nbdkit could handle the signal: still starting), or by someone
            # who signalled nbdkit directly: not a crash.
            return 0 if stop else _die_of(signum)
        if stop:
            print(f"blockd: nbdkit (pid {child.pid}) died of {name} while stopping", file=err, flush=True)
            return 128 + signum
        if signum not in CRASH_SIGNALS:  # killed from outside (kill -9, the OOM killer): the server ends
            print(f"blockd: nbdkit (pid {child.pid}) was killed ({name}): serve stops too", file=err, flush=True)
            return 128 + signum
        quick = 0 if served else quick + 1
        if quick >= RESTART_LIMIT:
            print(f"blockd: nbdkit (pid {child.pid}) died of {name} while starting, {quick} times in a row: "
                  "giving up", file=err, flush=True)
            return 1
        restarts += 1
        print(f"blockd: nbdkit (pid {child.pid}) died of {name}"
              f"{'' if served else ' while starting'}; restarting it (restart {restarts}): "
              "every volume comes back as after a crash", file=err, flush=True)
        if quick:
            time.sleep(min(0.5 * quick, 2.0))  # it could not start: do not spin
        if listen[0] == "unix":
            try:
                clear_stale_socket(listen[1])
            except (BlockdError, OSError) as exc:
                print(f"blockd: cannot restart: {exc}", file=err, flush=True)
                return 1
