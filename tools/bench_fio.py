"""Helpers for tools/bench: NBD servers under test, fio runs, small host facts.

Nothing here knows about the benchmark's plan (which workloads, how many
rounds); tools/bench owns that.  This module owns:

* ``Server``: start a server process (``blockd serve`` or the reference
  ``nbdkit file``), wait until it answers an NBD handshake (polling libnbd,
  or the raw greeting if libnbd is missing), sample its CPU time, stop it
  (SIGTERM, then SIGKILL).  Servers get PR_SET_PDEATHSIG so they die with
  the benchmark even if it is SIGKILLed.
* ``run_fio``: one fio job with ``ioengine=nbd`` and JSON output, parsed into
  a flat dict (IOPS, MB/s, latency percentiles, client and server CPU).
* ``Workload``: one fio workload with its blockd/reference ratio floor and goal.
"""

import ctypes
import json
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

_CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """A benchmark step failed; the message says which and carries the evidence."""


@dataclass(frozen=True)
class Workload:
    name: str
    rw: str  # fio rw=
    bs: int
    iodepth: int
    metric: str  # "iops" or "mbps": what the ratio is computed on
    floor: float  # blockd/reference must be >= floor
    goal: float

    @property
    def direction(self):
        return "read" if "read" in self.rw else "write"


# Floors and goals for blockd / nbdkit-file (same fio settings against both).
WORKLOADS = (
    Workload("randread-4k", "randread", 4 * KiB, 32, "iops", 0.3, 0.5),
    Workload("randwrite-4k", "randwrite", 4 * KiB, 32, "iops", 0.2, 0.35),
    Workload("seqread-1m", "read", 1 * MiB, 8, "mbps", 0.7, 0.9),
    Workload("seqwrite-1m", "write", 1 * MiB, 8, "mbps", 0.7, 0.9),
)


# ---- servers -----------------------------------------------------------------
def _pdeathsig():
    """preexec_fn: the child gets SIGTERM when the benchmark dies (survives exec)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def serving_pid(pid):
    """The process that serves: ``pid`` itself if it is nbdkit (the reference), else its nbdkit child
    (``blockd serve`` supervises nbdkit); None if neither (not started yet, or gone)."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/comm") as f:
            if f.read().strip() == "nbdkit":
                return pid
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(c) for c in f.read().split()]
        for child in children:
            with open(f"/proc/{child}/comm") as f:
                if f.read().strip() == "nbdkit":
                    return child
    except (OSError, ValueError):
        pass
    return None


def _probe_libnbd(uri):
    import nbd

    h = nbd.NBD()
    h.connect_uri(uri)
    size = h.get_size()
    h.shutdown()
    return size


def _probe_raw(sock_path):
    """Fallback without libnbd: the server's first bytes are the NBD greeting."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.connect(sock_path)
        greeting = s.recv(8)
        if greeting != b"NBDMAGIC":
            raise OSError(f"unexpected greeting {greeting!r}")
        return None
    finally:
        s.close()


class Server:
    """One NBD server process listening on a unix socket."""

    def __init__(self, label, argv, uri, sock_path, log_path, env=None):
        self.label = label
        self.argv = list(argv)
        self.uri = uri
        self.sock_path = sock_path
        self.log_path = log_path
        self.env = env
        self.proc = None
        self.export_size = None
        self.startup_seconds = None

    @property
    def pid(self):
        """The serving process: nbdkit (under `blockd serve`, its child)."""
        return serving_pid(self.proc.pid) if self.proc else None

    def start(self, timeout=120):
        log = open(self.log_path, "ab")
        try:
            t0 = time.monotonic()
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,  # Ctrl-C reaches us, not the server; we stop it
                preexec_fn=_pdeathsig,
            )
        finally:
            log.close()
        self._wait_ready(timeout)
        self.startup_seconds = time.monotonic() - t0
        return self

    def _wait_ready(self, timeout):
        """Poll until an NBD handshake succeeds (no fixed sleeps)."""
        deadline = time.monotonic() + timeout
        try:
            import nbd

            use_libnbd, retryable = True, (nbd.Error, OSError)
        except ImportError:
            use_libnbd, retryable = False, OSError
        last = None
        delay = 0.01
        while True:
            rc = self.proc.poll()
            if rc is not None:
                raise BenchError(f"{self.label} exited with status {rc} during start-up\n{self.log_tail()}")
            if os.path.exists(self.sock_path):
                try:
                    if use_libnbd:
                        self.export_size = _probe_libnbd(self.uri)
                    else:
                        _probe_raw(self.sock_path)
                    return
                except retryable as exc:  # not listening yet, or handshake refused so far
                    last = exc
            if time.monotonic() > deadline:
                self.stop()
                raise BenchError(f"{self.label} not ready after {timeout}s (last error: {last})\n{self.log_tail()}")
            time.sleep(delay)  # poll interval, grows to 100 ms
            delay = min(delay * 1.5, 0.1)

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def cpu_seconds(self):
        """user+system CPU of the server process (all threads), or None if gone."""
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime
        except (OSError, IndexError, ValueError, AttributeError):
            return None

    def cmdline(self):
        try:
            with open(f"/proc/{self.pid}/cmdline", "rb") as f:
                return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except (OSError, AttributeError):
            return None

    def stop(self, grace=10):
        """SIGTERM, wait up to ``grace`` s, then SIGKILL. Returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
            except ProcessLookupError:
                pass
        return self.proc.returncode

    def log_tail(self, lines=30):
        try:
            with open(self.log_path, "rb") as f:
                text = f.read()[-16384:].decode(errors="replace")
        except OSError:
            return f"({self.label}: no log)"
        tail = "\n".join(text.splitlines()[-lines:])
        return f"--- last lines of {self.label} log ({self.log_path}) ---\n{tail}" if tail else f"({self.label}: empty log)"


# ---- fio -----------------------------------------------------------------------
def fio_version():
    try:
        return subprocess.run(["fio", "--version"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _parse_fio_json(text):
    """fio's nbd engine prints 'fio: connected to NBD server' before the JSON."""
    start = text.find("{")
    if start < 0:
        raise ValueError("no JSON object in fio output")
    return json.JSONDecoder().raw_decode(text[start:])[0]


def fio_command(uri, name, rw, bs, iodepth, size, runtime=None, out_path=None):
    cmd = [
        "fio",
        f"--name={name}",
        "--ioengine=nbd",
        f"--uri={uri}",
        f"--rw={rw}",
        f"--bs={bs}",
        f"--iodepth={iodepth}",
        "--numjobs=1",
        f"--size={size}",
        "--output-format=json",
    ]
    if runtime is not None:
        cmd += ["--time_based", f"--runtime={runtime}s"]
    if out_path:
        cmd.append(f"--output={out_path}")
    return cmd


def run_fio(uri, name, rw, bs, iodepth, size, runtime=None, out_path=None, server=None, timeout=None):
    """Run one fio job; return a flat result dict. Raises BenchError on any failure.

    ``server`` (a Server) is sampled for CPU time around the run and checked
    for liveness afterwards, so a crash is reported as a crash.
    """
    cmd = fio_command(uri, name, rw, bs, iodepth, size, runtime, out_path)
    if timeout is None:
        timeout = (runtime or 0) + 300
    cpu0 = server.cpu_seconds() if server else None
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr or ""
        if isinstance(err, bytes):
            err = err.decode(errors="replace")
        raise BenchError(
            f"fio {name} against {uri} did not finish within {timeout}s (server hung?)\n"
            f"command: {' '.join(cmd)}\n{err[-4000:]}\n" + (server.log_tail() if server else "")
        ) from None
    wall = time.monotonic() - t0
    cpu1 = server.cpu_seconds() if server else None
    raw = p.stdout
    if out_path and os.path.exists(out_path):
        with open(out_path) as f:
            raw = f.read()
    server_dead = server is not None and not server.alive()
    try:
        data = _parse_fio_json(raw)
        job = data["jobs"][0]
    except (ValueError, KeyError, IndexError) as exc:
        data, job = None, None
        parse_error = exc
    else:
        parse_error = None

    def fail(why):
        msg = [f"fio {name} ({rw} bs={bs} iodepth={iodepth}) against {uri} failed: {why}",
               "command: " + " ".join(cmd), f"fio exit status: {p.returncode}"]
        if p.stderr.strip():
            msg.append("fio stderr:\n" + p.stderr.strip()[-4000:])
        if job is not None:
            d = job.get("read" if "read" in rw else "write", {})
            msg.append(f"fio job error={job.get('error')} io_bytes={d.get('io_bytes')} total_err={job.get('total_err')}")
        elif raw.strip():
            msg.append("fio output:\n" + raw.strip()[-4000:])
        if server is not None:
            if server_dead:
                msg.append(f"{server.label} is no longer running (exit status {server.proc.returncode})")
            msg.append(server.log_tail())
        raise BenchError("\n".join(msg))

    if server_dead:
        fail("server died during the run")
    if p.returncode != 0:
        fail("non-zero exit")
    if job is None:
        fail(f"cannot parse JSON output ({parse_error})")
    if job.get("error"):
        fail(f"job error {job['error']}")
    d = job["read" if "read" in rw else "write"]
    if not d.get("io_bytes"):
        fail("no I/O completed")

    def pct(key):
        return (d.get("clat_ns", {}).get("percentile") or {}).get(key)

    res = {
        "iops": d["iops"],
        "mbps": d["bw_bytes"] / 1e6,
        "io_bytes": d["io_bytes"],
        "runtime_ms": d.get("runtime"),
        "lat_mean_us": d.get("lat_ns", {}).get("mean", 0) / 1e3,
        "clat_p50_us": (pct("50.000000") or 0) / 1e3,
        "clat_p99_us": (pct("99.000000") or 0) / 1e3,
        "fio_cpu_pct": job.get("usr_cpu", 0) + job.get("sys_cpu", 0),
        "wall_s": wall,
    }
    if cpu0 is not None and cpu1 is not None and wall > 0:
        res["server_cpu_pct"] = 100.0 * (cpu1 - cpu0) / wall
    return res


# ---- host facts ----------------------------------------------------------------
def fs_type(path):
    """(mount point, fs type, source) of the filesystem holding ``path``."""
    path = os.path.realpath(path)
    best = ("", None, None)
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                mnt = left.split()[4].replace("\\040", " ")
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[0]):
                    parts = right.split()
                    best = (mnt, parts[0], parts[1] if len(parts) > 1 else None)
    except OSError:
        pass
    return best


def loadavg():
    try:
        with open("/proc/loadavg") as f:
            return [float(x) for x in f.read().split()[:3]]
    except OSError:
        return None


def command_output(argv):
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


class Holder:
    """A libnbd connection that keeps a volume attached (per-volume counters live only while it is open)."""

    def __init__(self, uri):
        import nbd

        self.h = nbd.NBD()
        self.h.connect_uri(uri)

    def close(self):
        if self.h is not None:
            try:
                self.h.shutdown()
            except Exception:
                pass
            self.h = None


# ---- what every benchmark script's run() and main() share -----------------------------------------
def cleanup_uninterrupted(cleanup):
    """Run ``cleanup`` with SIGINT/SIGTERM/SIGHUP ignored: a second ^C must not leave servers behind."""
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        cleanup()
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main_tail(label, args, run, print_table, missed, footer=None):
    """The end of a benchmark's main(): run with SIGTERM/SIGHUP as ^C, print, write --json, report
    ``res["misses"]`` after ``missed`` (exit 3 with --check), then ``footer(res)``.  Returns the exit status."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupt)
    try:
        res = run(args)
    except KeyboardInterrupt:
        print(f"\n{label}: interrupted", flush=True)
        return 130
    except BenchError as exc:
        print(f"\n{label}: FAILED: {exc}", flush=True)
        return 1
    print_table(res)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
        print(f"\nresults: {args.json}", flush=True)
    if res["misses"]:
        print(f"{missed}: {', '.join(res['misses'])}", flush=True)
        if args.check:
            return 3
    if footer is not None:
        print(footer(res), flush=True)
    return 0
