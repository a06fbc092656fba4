#!/usr/bin/env python3
"""Replication benchmark for blockd: what synchronous replication costs, and how fast a resync runs.

    python tools/bench_replication.py [--runtime S] [--repeat N] [--threads N]
                                      [--sweep-threads 1,4,8,16] [--sweep-workloads LIST]
                                      [--sweep-runtime S] [--sweep-repeat N] [--no-sweep]
                                      [--no-diagnostic] [--no-transport] [--no-resync] [--resync-rates 10000,default]
                                      [--insecure] [--quick] [--dir DIR] [--json PATH] [--keep] [--check]

Two blockd nodes on loopback, each with its own data dir, key dir (CurveZMQ),
NBD unix socket and replication sink: node a (the primary) holds `plain`
(1 GiB, unreplicated) and `repl` (1 GiB, `--replica b`, min-copies 2); node b
holds the replica of `repl` (and a 1 MiB `probe` volume, so its readiness can
be checked with an NBD handshake).  Next to them, nbdkit's C `file` plugin on a
sparse 1 GiB file is the reference.  Every integrity feature is on (checksums on
write, verified on receipt by the replica, intent log, zero detection).  A
libnbd connection keeps `repl` open: its replication status exists only then.
  1. fill: fio writes all 1 GiB of the three targets sequentially (1 MiB,
     iodepth 8), so both copies of `repl` have every chunk;
  2. rounds: fio (ioengine=nbd, time based, JSON) 1 MiB sequential write QD8
     and 4 KiB random write QD32 against file, plain and repl, alternating,
     --repeat rounds of --runtime s; medians, replicated/unreplicated (floor
     0.5 for both) and each vs file.  For blockd runs the CPU time of both
     nbdkit processes is read from /proc, and per thread over a window inside
     the run: CPU, voluntary context switches, and every 20 ms the system call
     the thread is blocked in (/proc/PID/task/TID/syscall);
  2a. transport: tools/bench_transport.py, the reference for what the floors
     ask of the transport: blockd WRITEs of 1 MiB and 4 KiB over pyzmq
     between two Python processes (same framing, same CurveZMQ choice, one
     in flight per sender thread, as many threads as the primary's), decoded
     and ACKed, nothing hashed or written; if it alone moves less than the
     floor asks of replicated writes, no change inside blockd meets it here;
  3. diagnostic: the primary restarted with --metrics for one 4 KiB random
     write on plain and on repl: the replica's ack latency and the plugin's
     write time, node a's RSS growth and a scrape's duration (not in the
     tables: --metrics slows every request, so the measured runs go without);
  4. sweep: the primary restarted at each --sweep-threads value (`blockd serve
     --threads N`), 4 KiB random write on plain and repl (--sweep-runtime s,
     --sweep-repeat rounds); the value of the main rounds is reused from them;
  5. resync: at each --resync-rates value (the primary's `--resync-rate`;
     "default" = blockd's 256 MiB/s): fill repl, SIGKILL the replica, wait
     until the primary reports it out_of_sync, `volume set repl --min-copies
     1`, rewrite the whole 1 GiB (fio, another seed: every chunk dirty and
     different), restart the replica and time until the peer is in_sync again:
     resynced_bytes (from the replication status) / elapsed, from the
     replica's spawn and from the first progress seen (polled every 50 ms);
     then `blockd verify` compares the copies;
  6. resync check: after a flush, writes made while the replica is down must
     reach its resync bitmap, and the copies must be identical afterwards.
Prints tables and writes JSON with --json.  tools/bench imports run() and
print_table() (see docs/benchmarks.md, "Replication benchmark").
"""

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "tools")
sys.path.insert(0, TOOLS)
sys.path.insert(0, ROOT)
import bench_fio as bf  # noqa: E402
import bench_transport  # noqa: E402
from bench_fio import GiB, KiB, MiB, BenchError  # noqa: E402

from blockd import control as _control  # noqa: E402  (the client `volume show --json` uses; no numba)

FLOOR = 0.5  # replicated / unreplicated, both workloads
VOLUME_SIZE = 1 * GiB
PLAIN, REPL, PROBE = "plain", "repl", "probe"
BLOCKD_DEFAULT_THREADS = 4  # blockd/server.py DEFAULT_THREADS (read from the running command line when possible)
DEFAULT_RESYNC_MIBPS = 256  # blockd/replication.py DEFAULT_RESYNC_MIBPS
POLL = 0.05  # seconds between replication-status polls while timing a resync
FIO_STARTUP = 0.2  # seconds from spawning fio to its first I/O, roughly
TARGETS = ("file", "blockd", "replicated")
SWEEP_THREADS = [1, 4, 8, 16]
QUICK_SWEEP_THREADS = [1, 4, 16]
_CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Workload:
    name: str
    rw: str
    bs: int
    iodepth: int
    metric: str  # "iops" or "mibps"


WORKLOADS = (
    Workload("seqwrite-1m", "write", MiB, 8, "mibps"),
    Workload("randwrite-4k", "randwrite", 4 * KiB, 32, "iops"),
)

DEFAULTS = {"dir": None, "quick": False, "runtime": None, "repeat": None, "threads": None,
            "sweep_threads": None, "sweep": True, "sweep_workloads": ["randwrite-4k"], "sweep_runtime": None, "sweep_repeat": None,
            "resync": True, "resync_rates": [10000, None], "insecure": False, "diagnostic": True, "diag_runtime": None, "keep": False, "json": None,
            "check": False, "transport": True}


# ---- helpers -------------------------------------------------------------------------
def log(msg=""):
    print(msg, flush=True)


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, spec):
    return format(v, spec) if v is not None else "-"


def ratio(a, b):
    return a / b if a is not None and b else None


def blockd_cli():
    here = os.path.join(os.path.dirname(sys.executable), "blockd")
    if os.path.exists(here):
        return [here]
    return [sys.executable, "-m", "blockd.cli"]


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def parse_threads_list(text):
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid thread list {text!r} (e.g. 1,4,8,16)") from None
    if not out or any(n < 1 or n > 1024 for n in out):
        raise argparse.ArgumentTypeError(f"invalid thread list {text!r}: values 1-1024")
    return out


def parse_rates(text):
    out = []
    for x in text.split(","):
        x = x.strip()
        if not x:
            continue
        if x == "default":
            out.append(None)
            continue
        try:
            v = float(x)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid rate {x!r}: MiB/s or 'default'") from None
        if v <= 0:
            raise argparse.ArgumentTypeError(f"invalid rate {x!r}: must be > 0")
        out.append(int(v) if v == int(v) else v)
    if not out:
        raise argparse.ArgumentTypeError("no resync rate given")
    return out


def rate_label(rate):
    return f"default ({DEFAULT_RESYNC_MIBPS})" if rate is None else f"{rate:g}"


def _options(opts):
    o = dict(DEFAULTS)
    if isinstance(opts, dict):
        o.update({k: v for k, v in opts.items() if k in DEFAULTS})
    elif opts is not None:
        o.update({k: v for k, v in vars(opts).items() if k in DEFAULTS})
    if o["runtime"] is None:
        o["runtime"] = 3 if o["quick"] else 10
    if o["repeat"] is None:
        o["repeat"] = 1 if o["quick"] else 3
    if o["sweep_runtime"] is None:
        o["sweep_runtime"] = 2 if o["quick"] else max(1, min(5, o["runtime"] // 2))
    if o["sweep_repeat"] is None:
        o["sweep_repeat"] = 1
    if o["diag_runtime"] is None:
        o["diag_runtime"] = o["sweep_runtime"]
    if o["sweep_threads"] is None:
        o["sweep_threads"] = QUICK_SWEEP_THREADS if o["quick"] else SWEEP_THREADS
    unknown = set(o["sweep_workloads"]) - {wl.name for wl in WORKLOADS}
    if unknown:
        raise BenchError(f"unknown sweep workload(s) {', '.join(sorted(unknown))}: "
                         f"use {', '.join(wl.name for wl in WORKLOADS)}")
    if min(o["runtime"], o["repeat"], o["sweep_runtime"], o["sweep_repeat"]) < 1:
        raise BenchError("--runtime, --repeat, --sweep-runtime and --sweep-repeat must be >= 1")
    if o["threads"] is not None and not 1 <= o["threads"] <= 1024:
        raise BenchError("--threads: 1-1024")
    return o


# ---- /proc sampling and metrics -------------------------------------------------------------
# x86_64 numbers of the system calls blocked threads sit in (anything else is shown by number)
SYSCALLS = {0: "read", 1: "write", 7: "poll", 17: "pread64", 18: "pwrite64", 19: "readv", 20: "writev",
            23: "select", 35: "nanosleep", 44: "sendto", 45: "recvfrom", 46: "sendmsg", 47: "recvmsg",
            74: "fsync", 75: "fdatasync", 202: "futex", 230: "clock_nanosleep", 232: "epoll_wait",
            270: "pselect6", 271: "ppoll", 281: "epoll_pwait", 295: "preadv", 296: "pwritev"}


def thread_ticks(pid, switches=False):
    """{tid: (comm, utime+stime ticks, voluntary context switches or None)} for every thread of ``pid``."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                raw = f.read()
            vcsw = None
            if switches:
                with open(f"/proc/{pid}/task/{tid}/status") as f:
                    for line in f:
                        if line.startswith("voluntary_ctxt_switches:"):
                            vcsw = int(line.split()[1])
        except OSError:
            continue
        comm = raw[raw.index("(") + 1:raw.rindex(")")]
        fields = raw.rsplit(")", 1)[1].split()
        out[int(tid)] = (comm, int(fields[11]) + int(fields[12]), vcsw)
    return out


def thread_syscall(pid, tid):
    """What the thread is doing now: "running" or the name of the system call it is blocked in."""
    try:
        with open(f"/proc/{pid}/task/{tid}/syscall") as f:
            word = f.read().split(None, 1)[0]
    except (OSError, IndexError):
        return None
    if not word.lstrip("-").isdigit():
        return word  # "running"
    n = int(word)
    return SYSCALLS.get(n, f"syscall {n}")


def threads_delta(before, after, wall):
    """Threads alive in both snapshots with their CPU% over ``wall`` s (100 = one core), busiest first."""
    threads = []
    for tid, (comm, ticks, vcsw) in after.items():
        if tid not in before:
            continue
        b = before[tid]
        t = {"tid": tid, "comm": comm, "cpu_pct": 100.0 * (ticks - b[1]) / _CLK_TCK / wall}
        if vcsw is not None and b[2] is not None:
            t["vcsw_per_s"] = (vcsw - b[2]) / wall
        if t["cpu_pct"] > 0 or t.get("vcsw_per_s"):
            threads.append(t)
    threads.sort(key=lambda t: -t["cpu_pct"])
    return threads


class ThreadSampler:
    """Per-thread CPU of some processes over a window inside a time-based fio run (1 s in to 0.3 s before
    the end), so per-connection threads, which exit with the connection, are still alive when sampled.

    Also per thread: voluntary context switches per second, and a poor man's profile: every SAMPLE_EVERY s,
    what the thread is doing (/proc/PID/task/TID/syscall: running, or blocked in futex, poll, ...)."""

    SAMPLE_EVERY = 0.02

    def __init__(self, pids, runtime):
        self.pids = pids
        self.result = {}
        self.window = None
        self.samples = 0
        t0 = time.monotonic()
        w0, w1 = t0 + min(1.0, 0.25 * runtime), t0 + FIO_STARTUP + runtime - 0.3
        self._stop = threading.Event()
        self._thread = None
        if pids and w1 - w0 >= 0.5:
            self._thread = threading.Thread(target=self._run, args=(w0, w1), name="cpu-sampler", daemon=True)
            self._thread.start()

    def _run(self, w0, w1):
        if self._stop.wait(max(0.0, w0 - time.monotonic())):
            return
        ta, a = time.monotonic(), {k: thread_ticks(p, switches=True) for k, p in self.pids.items()}
        seen = {k: {} for k in self.pids}  # node -> tid -> {state: count}
        while time.monotonic() < w1:
            for k, p in self.pids.items():
                for tid in a[k]:
                    st = thread_syscall(p, tid)
                    if st is not None:
                        c = seen[k].setdefault(tid, {})
                        c[st] = c.get(st, 0) + 1
            self.samples += 1
            if self._stop.wait(min(self.SAMPLE_EVERY, max(0.0, w1 - time.monotonic()))):
                return
        tb, b = time.monotonic(), {k: thread_ticks(p, switches=True) for k, p in self.pids.items()}
        self.window = tb - ta
        for k in self.pids:
            threads = threads_delta(a[k], b[k], tb - ta)[:6]
            for t in threads:
                c = seen[k].get(t["tid"], {})
                n = sum(c.values())
                if n:
                    t["states"] = {st: round(v / n, 3) for st, v in sorted(c.items(), key=lambda x: -x[1])[:4]}
            self.result[k] = threads

    def finish(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return self.result


_METRIC_RE = re.compile(r'^(blockd_peer_acks_total|blockd_peer_ack_seconds_total|blockd_request_duration_seconds_sum'
                        r'|blockd_request_duration_seconds_count)\{([^}]*)\}\s+(\S+)$')


def read_rss(pid):
    """VmRSS of ``pid`` in KiB, or None."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def scrape(port):
    """The few counters the benchmark reads from the primary's /metrics; None if unavailable."""
    if port is None:
        return None
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return None
    out = {"acks": 0.0, "ack_s": 0.0, "write_n": 0.0, "write_s": 0.0}
    for line in text.splitlines():
        m = _METRIC_RE.match(line)
        if not m:
            continue
        name, labels, value = m.group(1), m.group(2), float(m.group(3))
        if name == "blockd_peer_acks_total":
            out["acks"] += value
        elif name == "blockd_peer_ack_seconds_total":
            out["ack_s"] += value
        elif 'op="write"' in labels:
            out["write_s" if name.endswith("_sum") else "write_n"] += value
    return out


def metrics_delta(m0, m1):
    if m0 is None or m1 is None:
        return None
    acks, writes = m1["acks"] - m0["acks"], m1["write_n"] - m0["write_n"]
    return {
        "acks": acks,
        "ack_mean_us": 1e6 * (m1["ack_s"] - m0["ack_s"]) / acks if acks > 0 else None,
        "writes": writes,
        "write_mean_us": 1e6 * (m1["write_s"] - m0["write_s"]) / writes if writes > 0 else None,
    }


# ---- processes --------------------------------------------------------------------------------
class Node:
    """One blockd node: data dir, key dir, NBD unix socket, replication sink port."""

    def __init__(self, bench, name, probe_volume):
        self.bench = bench
        self.name = name
        self.data = os.path.join(bench.tmp, f"data-{name}")
        self.key_dir = os.path.join(bench.tmp, f"keys-{name}")
        self.sock = os.path.join(bench.sockdir or bench.tmp, f"{name}.sock")
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.probe_volume = probe_volume
        self.server = None
        self.metrics_port = None
        self.starts = 0

    def cli(self, *args):
        return self.bench.cli(self.data, *args)

    def uri(self, volume):
        return f"nbd+unix:///{volume}?socket={self.sock}"

    def start(self, threads=None, resync_rate=None, metrics=False):
        argv = blockd_cli() + ["--data-dir", self.data, "serve", "--listen", "unix:" + self.sock,
                               "--key-dir", self.key_dir, "--replication-listen", self.address]
        if self.bench.o["insecure"]:
            argv.append("--insecure-replication")
        if threads is not None:
            argv += ["--threads", str(threads)]
        if resync_rate is not None:
            argv += ["--resync-rate", f"{resync_rate:g}"]
        self.metrics_port = None
        if metrics:
            self.metrics_port = free_port()
            argv += ["--metrics", f"127.0.0.1:{self.metrics_port}"]
        self.starts += 1
        srv = bf.Server(f"blockd-{self.name}", argv, self.uri(self.probe_volume), self.sock,
                        os.path.join(self.bench.tmp, f"serve-{self.name}.log"))
        self.server = srv
        srv.start()
        cmd = srv.cmdline() or []
        srv.threads = next((int(cmd[i + 1]) for i, a in enumerate(cmd[:-1]) if a == "--threads"), None)
        return srv

    def stop(self):
        srv, self.server = self.server, None
        if srv is None:
            return None
        rc = srv.stop()
        if rc not in (0, None, -signal.SIGTERM):
            self.bench.res.setdefault("warnings", []).append(f"{srv.label} exited with status {rc}\n{srv.log_tail()}")
        return rc

    def kill9(self):
        srv, self.server = self.server, None
        if srv is not None and srv.proc is not None and srv.proc.poll() is None:
            srv.proc.kill()
            srv.proc.wait(10)

    @property
    def pid(self):
        return self.server.pid if self.server is not None else None


Holder = bf.Holder  # keeps a volume open: its replication status exists while it is open


# ---- the benchmark ----------------------------------------------------------------------------
class ReplicationBench:
    def __init__(self, o):
        self.o = o
        self.tmp = None
        self.sockdir = None
        self.a = self.b = None
        self.ref = None
        self.holder = None
        self.fio_seq = 0
        self._scrape = None  # (metrics port, counters) of the last scrape, taken right after a sampled fio run
        self.res = {
            "meta": {
                "timestamp": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                "options": {k: v for k, v in o.items()},
                "nproc": os.cpu_count(),
                "fio": bf.fio_version(),
                "nbdkit": bf.command_output(["nbdkit", "--version"]),
                "loadavg_before": bf.loadavg(),
                "volume_size": VOLUME_SIZE,
                "floor": FLOOR,
            },
            "workloads": {},
        }

    # -- setup / teardown --
    def make_dirs(self):
        parent = self.o["dir"] or tempfile.gettempdir()
        os.makedirs(parent, exist_ok=True)
        self.tmp = tempfile.mkdtemp(prefix="blockd-repl-", dir=parent)
        self.fio_dir = os.path.join(self.tmp, "fio")
        os.makedirs(self.fio_dir)
        if len(os.path.join(self.tmp, "ref.sock")) > 100:  # unix socket paths are limited to 107 bytes
            self.sockdir = tempfile.mkdtemp(prefix="br-", dir="/tmp")
        self.ref_file = os.path.join(self.tmp, "reference.img")
        self.ref_sock = os.path.join(self.sockdir or self.tmp, "ref.sock")
        mnt, fstype, src = bf.fs_type(self.tmp)
        self.res["meta"]["temp_dir"] = self.tmp
        self.res["meta"]["filesystem"] = {"mount": mnt, "type": fstype, "source": src}
        log(f"replication bench: temp dir {self.tmp} (filesystem {fstype})")

    def cleanup(self):
        if self.holder is not None:
            self.holder.close()
            self.holder = None
        for what, stop in (("node a", lambda: self.a and self.a.stop()), ("node b", lambda: self.b and self.b.stop()),
                           ("nbdkit file", self.stop_ref)):
            try:
                stop()
            except Exception as exc:  # keep going: the other servers and the temp dir still need cleaning
                log(f"replication bench: stopping {what}: {exc}")
        for d in (self.sockdir, None if self.o["keep"] else self.tmp):
            if d and os.path.isdir(d):
                shutil.rmtree(d, ignore_errors=True)
        if self.tmp:
            log(f"replication bench: kept {self.tmp}" if self.o["keep"] else f"replication bench: removed {self.tmp}")

    def cli(self, data_dir, *args):
        argv = blockd_cli() + ["--data-dir", data_dir, *args]
        p = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        if p.returncode != 0:
            raise BenchError(f"{' '.join(argv)} failed ({p.returncode}): {p.stderr.strip()[-2000:]}")
        return p.stdout

    def setup(self):
        tmp = self.tmp
        self.a, self.b = Node(self, "a", PLAIN), Node(self, "b", PROBE)
        keys = {}
        for n in (self.a, self.b):
            self.cli(n.data, "keys", "generate", "--key-dir", n.key_dir)
            keys[n.name] = self.cli(n.data, "keys", "show", "--key-dir", n.key_dir).strip()
        # `--public-key=KEY`: a Z85 key may start with '-'
        self.a.cli("peer", "add", "b", self.b.address, f"--public-key={keys['b']}")
        self.b.cli("peer", "add", "a", self.a.address, f"--public-key={keys['a']}")
        self.a.cli("volume", "create", PLAIN, "--size", str(VOLUME_SIZE))
        self.a.cli("volume", "create", REPL, "--size", str(VOLUME_SIZE), "--replica", "b", "--min-copies", "2")
        self.b.cli("volume", "create", PROBE, "--size", "1MiB")
        self.chunk_size = json.loads(self.a.cli("volume", "show", REPL, "--json"))["chunk_size"]
        self.res["meta"]["chunk_size"] = self.chunk_size
        with open(self.ref_file, "wb") as f:
            f.truncate(VOLUME_SIZE)
        self.res["meta"]["nodes"] = {n.name: {"address": n.address, "data_dir": os.path.relpath(n.data, tmp)}
                                     for n in (self.a, self.b)}

    def start_ref(self):
        argv = ["nbdkit", "-f", "-U", self.ref_sock, "file", self.ref_file]
        self.ref = bf.Server("nbdkit-file", argv, f"nbd+unix:///?socket={self.ref_sock}", self.ref_sock,
                             os.path.join(self.tmp, "nbdkit-file.log"))
        self.ref.start()
        self.res["meta"]["reference"] = {"cmdline": self.ref.cmdline(),
                                         "threads_note": "nbdkit default: 16 per connection"}

    def stop_ref(self):
        srv, self.ref = self.ref, None
        if srv is not None:
            rc = srv.stop()
            if rc not in (0, None, -signal.SIGTERM):
                self.res.setdefault("warnings", []).append(f"nbdkit file exited with status {rc}\n{srv.log_tail()}")

    def status(self):
        """The primary's replication status of `repl` (what `volume show --json` has under "replication")."""
        return _control.call(_control.connect(self.a.data), "replication", name=REPL, timeout=30)

    def peer(self):
        return self.status()["peers"]["b"]

    def wait_for(self, predicate, timeout, what):
        deadline = time.monotonic() + timeout
        last = None
        while True:
            try:
                last = self.status()
                if predicate(last):
                    return last
            except Exception as exc:  # the server may be busy starting; keep polling until the deadline
                last = exc
            if time.monotonic() > deadline:
                raise BenchError(f"timed out after {timeout:g} s waiting for {what} (last status: {last})\n"
                                 + (self.a.server.log_tail() if self.a.server else ""))
            time.sleep(POLL)

    def wait_in_sync(self, timeout=120):
        return self.wait_for(lambda s: s.get("confirmed", True) and s["peers"]["b"]["state"] == "in_sync"
                             and not s["peers"]["b"].get("resync_remaining_chunks"), timeout, "repl in sync on b")

    def start_primary(self, threads, resync_rate=None, metrics=False):
        """(Re)start node a and hold `repl` open until it is confirmed and in sync with b."""
        if self.holder is not None:
            try:
                self.holder.h.flush()  # a clean stop: nothing left in the intent log to compare at the restart
            except Exception:
                pass
            self.holder.close()
            self.holder = None
        if self.a.server is not None:
            self.a.stop()
        srv = self.a.start(threads=threads, resync_rate=resync_rate, metrics=metrics)
        self.holder = Holder(self.a.uri(REPL))
        self.wait_in_sync()
        if self.res.get("fill"):
            self.touch_chunks()
        return srv

    def touch_chunks(self):
        """4 KiB of new data in every chunk of both volumes: after a flush (the restart) a chunk's first write
        records it in the write-intent log (an fdatasync, on both copies for repl); after this the runs
        measure the same steady state as the main rounds, whose fill did it."""
        self._scrape = None
        plain = Holder(self.a.uri(PLAIN))
        try:
            for h in (self.holder.h, plain.h):
                for c in range(VOLUME_SIZE // self.chunk_size):
                    h.pwrite(os.urandom(4 * KiB), c * self.chunk_size)
        finally:
            plain.close()

    # -- fio --
    def fio(self, uri, name, rw, bs, iodepth, runtime, extra=(), sample=True):
        """One fio job; CPU of nodes a and b (per thread) and a's metrics sampled around it."""
        self.fio_seq += 1
        out = os.path.join(self.fio_dir, f"{self.fio_seq:03d}-{name}.json")
        cmd = bf.fio_command(uri, name, rw, bs, iodepth, VOLUME_SIZE, runtime, out) + list(extra)
        servers = [s for s in (self.a.server, self.b.server, self.ref) if s is not None]
        nodes = {n.name: n.server for n in (self.a, self.b) if n.server is not None} if sample else {}
        # one scrape between two sampled runs serves as the first one's end and the next one's start (a scrape
        # walks the data dir: ~0.4 s, more right after a run); anything else that writes clears the cache
        on_ref = "socket=" + self.ref_sock in uri  # the reference: node a's counters do not move
        cached = self._scrape
        if not on_ref:
            self._scrape = None
        m0 = None
        if sample and self.a.server is not None:
            m0 = cached[1] if cached is not None and cached[0] == self.a.metrics_port else scrape(self.a.metrics_port)
        cpu0 = {k: s.cpu_seconds() for k, s in nodes.items()}
        ref0 = self.ref.cpu_seconds() if self.ref is not None else None
        sampler = ThreadSampler({k: s.pid for k, s in nodes.items()}, runtime) if runtime else None
        t0 = time.monotonic()
        timeout = (runtime or 0) + 300
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise BenchError(f"fio {name} against {uri} did not finish within {timeout}s (server hung?)\n"
                             f"command: {' '.join(cmd)}\n" + "\n".join(s.log_tail() for s in servers)) from None
        finally:
            threads = sampler.finish() if sampler is not None else {}
        wall = time.monotonic() - t0
        cpu1 = {k: s.cpu_seconds() for k, s in nodes.items()}
        ref1 = self.ref.cpu_seconds() if self.ref is not None else None
        m1 = scrape(self.a.metrics_port) if m0 is not None else None
        if m1 is not None:
            self._scrape = (self.a.metrics_port, m1)
        m = metrics_delta(m0, m1)
        raw = p.stdout
        if os.path.exists(out):
            with open(out) as f:
                raw = f.read()
        dead = [s for s in servers if not s.alive()]
        job = None
        try:
            job = bf._parse_fio_json(raw)["jobs"][0]
        except (ValueError, KeyError, IndexError):
            pass
        d = job.get("write" if "write" in rw else "read", {}) if job else {}
        if dead or p.returncode != 0 or job is None or job.get("error") or not d.get("io_bytes"):
            msg = [f"fio {name} ({rw} bs={bs} iodepth={iodepth}) against {uri} failed",
                   "command: " + " ".join(cmd), f"fio exit status: {p.returncode}"]
            if p.stderr.strip():
                msg.append("fio stderr:\n" + p.stderr.strip()[-3000:])
            if job is not None:
                msg.append(f"fio job error={job.get('error')} io_bytes={d.get('io_bytes')}")
            elif raw.strip():
                msg.append("fio output:\n" + raw.strip()[-3000:])
            for s in dead:
                msg.append(f"{s.label} is no longer running (exit status {s.proc.returncode})")
            for s in servers:
                msg.append(s.log_tail())
            raise BenchError("\n".join(msg))
        pct = (d.get("clat_ns", {}).get("percentile") or {})
        r = {
            "iops": d["iops"],
            "mibps": d["bw_bytes"] / MiB,
            "io_bytes": d["io_bytes"],
            "clat_p50_us": (pct.get("50.000000") or 0) / 1e3,
            "clat_p99_us": (pct.get("99.000000") or 0) / 1e3,
            "fio_cpu_pct": job.get("usr_cpu", 0) + job.get("sys_cpu", 0),
            "wall_s": wall,
        }
        for k in nodes:  # whole process, exited threads included
            if cpu0[k] is not None and cpu1[k] is not None:
                r[f"cpu_{k}_pct"] = 100.0 * (cpu1[k] - cpu0[k]) / wall
        if threads:
            r["threads"] = threads  # busiest threads per node, over the sampling window
            r["threads_window_s"] = sampler.window
        if ref0 is not None and ref1 is not None and on_ref:
            r["cpu_ref_pct"] = 100.0 * (ref1 - ref0) / wall
        if m is not None:
            r["metrics"] = m
        return r

    def uris(self):
        return {"file": f"nbd+unix:///?socket={self.ref_sock}", "blockd": self.a.uri(PLAIN),
                "replicated": self.a.uri(REPL)}

    # -- 1. fill --
    def fill(self):
        fill = {}
        for target, uri in self.uris().items():
            r = self.fio(uri, f"fill-{target}", "write", MiB, 8, None, sample=False)
            fill[target] = {"mibps": r["mibps"], "seconds": r["wall_s"]}
        log("fill 1 GiB (1 MiB seq write QD8): " + ", ".join(f"{t} {f['mibps']:.0f} MiB/s" for t, f in fill.items()))
        self.res["fill"] = fill

    # -- 2. main rounds --
    def rounds(self):
        o = self.o
        uris = self.uris()
        wls = self.res["workloads"]
        for wl in WORKLOADS:
            wls[wl.name] = {"rw": wl.rw, "bs": wl.bs, "iodepth": wl.iodepth, "metric": wl.metric, "floor": FLOOR,
                            "runs": {t: [] for t in TARGETS}}
        for rnd in range(o["repeat"]):
            tag = f"[round {rnd + 1}/{o['repeat']}]"
            for wl in WORKLOADS:
                for target in TARGETS:
                    r = self.fio(uris[target], f"{wl.name}-{target}", wl.rw, wl.bs, wl.iodepth, o["runtime"],
                                 sample=target != "file")
                    r["round"] = rnd + 1
                    wls[wl.name]["runs"][target].append(r)
                    log(f"{tag} {wl.name:<13} {target:<10} {r['iops']:9.0f} IOPS {r['mibps']:8.1f} MiB/s  "
                        f"p99 {r['clat_p99_us']:8.0f} us  {self.cpu_text(r)}")
        for wl in WORKLOADS:
            self.summarize_workload(wl)

    @staticmethod
    def cpu_text(r):
        parts = []
        if r.get("cpu_ref_pct") is not None:
            parts.append(f"file {r['cpu_ref_pct']:3.0f}%")
        if r.get("cpu_a_pct") is not None:
            parts.append(f"a {r['cpu_a_pct']:3.0f}%")
        if r.get("cpu_b_pct") is not None:
            parts.append(f"b {r['cpu_b_pct']:3.0f}%")
        parts.append(f"fio {r['fio_cpu_pct']:3.0f}%")
        m = r.get("metrics") or {}
        if m.get("ack_mean_us") is not None and m.get("acks", 0) > 100:
            parts.append(f"ack {m['ack_mean_us']:.0f} us")
        if m.get("write_mean_us") is not None:
            parts.append(f"plugin write {m['write_mean_us']:.0f} us")
        return "cpu " + " ".join(parts)

    def summarize_workload(self, wl):
        w = self.res["workloads"][wl.name]
        med = w["median"] = {}
        for target, rs in w["runs"].items():
            med[target] = {k: median([r.get(k) for r in rs])
                           for k in ("iops", "mibps", "clat_p50_us", "clat_p99_us", "fio_cpu_pct", "cpu_a_pct",
                                     "cpu_b_pct", "cpu_ref_pct")}
            med[target]["ack_mean_us"] = median([(r.get("metrics") or {}).get("ack_mean_us") for r in rs
                                                 if (r.get("metrics") or {}).get("acks", 0) > 100])
            med[target]["write_mean_us"] = median([(r.get("metrics") or {}).get("write_mean_us") for r in rs])
        f, b, rp = (med[t][wl.metric] for t in TARGETS)
        w["ratio"] = {"replicated/blockd": ratio(rp, b), "blockd/file": ratio(b, f), "replicated/file": ratio(rp, f)}
        w["status"] = status_for(w["ratio"]["replicated/blockd"])

    # -- 2a. the transport alone --
    def transport(self, main_threads):
        """tools/bench_transport.py in this run: blockd WRITEs of each workload's size carried by pyzmq between
        two Python processes (same framing, same CurveZMQ choice, one in flight per thread, --threads as the
        primary), decoded and ACKed, nothing hashed or written.  The nodes sit idle meanwhile."""
        o = self.o
        seconds = max(2.0, min(5.0, o["runtime"] / 2))
        sizes = sorted({wl.bs for wl in WORKLOADS})
        log(f"transport alone: pyzmq {'plain TCP' if o['insecure'] else 'CurveZMQ'}, {main_threads} sender threads, "
            f"{o['repeat']} run(s) x {seconds:g} s per size")
        got = bench_transport.run(main_threads, sizes, seconds, o["repeat"], insecure=o["insecure"], tmpdir=self.tmp)
        t = self.res["transport"] = {"threads": main_threads, "seconds": seconds, "insecure": o["insecure"],
                                     "workloads": {}}
        for wl in WORKLOADS:
            r = got[wl.bs]
            value = r["round_trips_per_s"] if wl.metric == "iops" else r["mibps"]
            med = (self.res["workloads"].get(wl.name) or {}).get("median") or {}
            b, repl = med.get("blockd", {}), med.get("replicated", {}).get(wl.metric)
            # CPU per request of unreplicated blockd (node a) in the main rounds; a replicated request costs
            # at least one such write on each copy plus the transport's round trip.
            blockd_cpu = (1e4 * b["cpu_a_pct"] / b["iops"] if b.get("cpu_a_pct") is not None and b.get("iops")
                          else None)
            bound = None
            if blockd_cpu is not None and r["cpu_us_per_round_trip"]:
                per_s = (os.cpu_count() or 1) * 1e6 / (r["cpu_us_per_round_trip"] + 2 * blockd_cpu)
                bound = per_s if wl.metric == "iops" else per_s * wl.bs / MiB
            t["workloads"][wl.name] = {
                "metric": wl.metric, "value": value, "round_trips_per_s": r["round_trips_per_s"], "mibps": r["mibps"],
                "cpu_us_per_round_trip": r["cpu_us_per_round_trip"], "blockd_cpu_us_per_request": blockd_cpu,
                "bound": bound, "transport/blockd": ratio(value, b.get(wl.metric)),
                "bound/blockd": ratio(bound, b.get(wl.metric)), "replicated/transport": ratio(repl, value),
                "replicated/bound": ratio(repl, bound)}
            log(f"  {wl.name:<13} {r['round_trips_per_s']:9.0f} round trips/s {r['mibps']:8.1f} MiB/s "
                f"{fmt(r['cpu_us_per_round_trip'], '.0f')} us CPU per round trip")

    # -- 2b. diagnostic runs with --metrics --
    def diagnose(self, main_threads):
        """The primary restarted with --metrics for one 4 KiB random write on plain and on repl: the plugin's
        mean write time and the replica's ack latency, which only the metrics endpoint has.  Not in the tables:
        --metrics itself slows every request (see docs/benchmarks.md), so the measured runs go without it."""
        o = self.o
        wl = next(w for w in WORKLOADS if w.name == "randwrite-4k")
        self.start_primary(main_threads, metrics=True)
        uris = self.uris()
        runtime = o["diag_runtime"]
        d = self.res["diagnostic"] = {"runtime": runtime, "threads": main_threads, "workload": wl.name}
        pid = self.a.pid
        rss0 = read_rss(pid)
        requests = 0
        for t in ("blockd", "replicated"):
            r = self.fio(uris[t], f"diag-{wl.name}-{t}", wl.rw, wl.bs, wl.iodepth, runtime)
            requests += r["io_bytes"] // wl.bs
            d[t] = r
            main = self.res["workloads"][wl.name]["median"][t]["iops"]
            r["iops_vs_main"] = ratio(r["iops"], main)
            log(f"[diagnostic, --metrics on] {wl.name} {t:<10} {r['iops']:9.0f} IOPS ({fmt(r['iops_vs_main'], '.2f')} x the "
                f"main rounds without --metrics)  {self.cpu_text(r)}")
        rss1 = read_rss(pid)
        t0 = time.monotonic()
        scrape(self.a.metrics_port)
        d["scrape_s_after"] = time.monotonic() - t0
        d["requests"] = requests
        d["rss_kib"] = [rss0, rss1]
        if rss0 is not None and rss1 is not None and requests:
            d["rss_bytes_per_request"] = (rss1 - rss0) * 1024 / requests
        log(f"[diagnostic] node a RSS {fmt(rss0 and rss0 / 1024, '.0f')} -> {fmt(rss1 and rss1 / 1024, '.0f')} MiB over "
            f"{requests} requests ({fmt(d.get('rss_bytes_per_request'), '.0f')} B/request); a scrape then took "
            f"{d['scrape_s_after']:.2f} s")

    # -- 3. thread sweep --
    def sweep(self, main_threads):
        o = self.o
        wls = [wl for wl in WORKLOADS if wl.name in o["sweep_workloads"]]
        uris = self.uris()
        sw = self.res["sweep"] = {"workloads": [wl.name for wl in wls], "threads": o["sweep_threads"],
                                  "main_threads": main_threads, "runtime": o["sweep_runtime"],
                                  "rounds": o["sweep_repeat"], "results": {}}
        for wl in wls:
            res = sw["results"][wl.name] = {"metric": wl.metric, "by_threads": {}}
            main = self.res["workloads"][wl.name]
            for n in o["sweep_threads"]:
                e = res["by_threads"][str(n)] = {}
                if n == main_threads:
                    e["from_main_rounds"] = True
                    for t in ("blockd", "replicated"):
                        e[t] = {"runs": main["runs"][t]}
        todo = [n for n in o["sweep_threads"] if n != main_threads]
        for rnd in range(o["sweep_repeat"]):
            for n in todo:
                self.start_primary(n)
                for wl in wls:
                    for t in ("blockd", "replicated"):
                        r = self.fio(uris[t], f"sweep-{n}-{wl.name}-{t}", wl.rw, wl.bs, wl.iodepth, o["sweep_runtime"])
                        r["round"] = rnd + 1
                        sw["results"][wl.name]["by_threads"][str(n)].setdefault(t, {"runs": []})["runs"].append(r)
                        log(f"[sweep {rnd + 1}/{o['sweep_repeat']}] threads {n:<3} {wl.name:<13} {t:<10} "
                            f"{r['iops']:9.0f} IOPS {r['mibps']:8.1f} MiB/s  p99 {r['clat_p99_us']:8.0f} us  "
                            f"{self.cpu_text(r)}")
        for wl in wls:
            res = sw["results"][wl.name]
            by = res["by_threads"]
            for n in o["sweep_threads"]:
                e = by[str(n)]
                for t in ("blockd", "replicated"):
                    rs = e[t]["runs"]
                    e[t]["value"] = median([r[wl.metric] for r in rs])
                    e[t]["iops"] = median([r["iops"] for r in rs])
                    e[t]["clat_p99_us"] = median([r["clat_p99_us"] for r in rs])
                    e[t]["cpu_a_pct"] = median([r.get("cpu_a_pct") for r in rs])
                    e[t]["cpu_b_pct"] = median([r.get("cpu_b_pct") for r in rs])
                    e[t]["ack_mean_us"] = median([(r.get("metrics") or {}).get("ack_mean_us") for r in rs
                                                  if (r.get("metrics") or {}).get("acks", 0) > 100])
                    e[t]["write_mean_us"] = median([(r.get("metrics") or {}).get("write_mean_us") for r in rs])
            base = (by[str(main_threads)]["blockd"]["value"] if str(main_threads) in by
                    else self.res["workloads"][wl.name]["median"]["blockd"][wl.metric])
            for n in o["sweep_threads"]:
                e = by[str(n)]
                e["ratio"] = ratio(e["replicated"]["value"], e["blockd"]["value"])
                e["ratio_vs_main_blockd"] = ratio(e["replicated"]["value"], base)
                e["status"] = status_for(e["ratio"])
                e["status_vs_main_blockd"] = status_for(e["ratio_vs_main_blockd"])
            res["meets_floor"] = [n for n in o["sweep_threads"] if by[str(n)]["status"] == "ok"]
            res["meets_floor_vs_main_blockd"] = [n for n in o["sweep_threads"]
                                                 if by[str(n)]["status_vs_main_blockd"] == "ok"]
            res["best_replicated_threads"] = max(o["sweep_threads"],
                                                 key=lambda n: by[str(n)]["replicated"]["value"] or 0)

    # -- 4. resync --
    def resync(self, threads):
        out = self.res["resync"] = {"volume_size": VOLUME_SIZE, "fill": self.res.get("fill", {}).get("replicated"),
                                    "threads": threads, "runs": []}
        for i, rate in enumerate(self.o["resync_rates"]):
            self.start_primary(threads, resync_rate=rate)
            r = self.resync_once(rate, seed=1000 + i)
            out["runs"].append(r)
            cpu = r.get("cpu") or {}
            log(f"resync at --resync-rate {rate_label(rate)}: {r['resynced_bytes'] / MiB:.0f} MiB "
                f"({r['chunks_dirty']} dirty chunks, {r['skipped_chunks']} skipped) in {fmt(r['elapsed_s'], '.2f')} s "
                f"from the replica's spawn = {fmt(r['mibps'], '.0f')} MiB/s; active {fmt(r['active_s'], '.2f')} s = "
                f"{fmt(r['active_mibps'], '.0f')} MiB/s  (out_of_sync detected {r['detect_s']:.2f} s after SIGKILL, "
                f"rewrite {r['rewrite_mibps']:.0f} MiB/s, replica start {r['replica_start_s']:.2f} s; cpu during "
                f"resync a {fmt(cpu.get('a', {}).get('cpu_pct'), '.0f')}% b {fmt(cpu.get('b', {}).get('cpu_pct'), '.0f')}%)")
            if not r["transitions"] or r["active_s"] is None:
                log(f"  (states seen: {r['transitions']})")

    def resync_once(self, rate, seed):
        a, b = self.a, self.b
        tag = rate_label(rate).split()[0]
        self.wait_in_sync()
        # fill: every chunk written to both copies (acknowledged by b, not yet flushed)
        fill = self.fio(a.uri(REPL), f"resync-fill-{tag}", "write", MiB, 8, None, extra=[f"--randseed={seed}"],
                        sample=False)
        st0 = self.peer()
        bytes0, skipped0 = st0.get("resynced_bytes", 0), st0.get("skipped_chunks", 0)
        t_kill = time.monotonic()
        b.kill9()
        self.wait_for(lambda s: s["peers"]["b"]["state"] == "out_of_sync", 60, "b out_of_sync after SIGKILL")
        detect = time.monotonic() - t_kill
        at_kill = self.peer().get("resync_remaining_chunks")
        a.cli("volume", "set", REPL, "--min-copies", "1")
        # rewrite: new data (another seed) in every chunk while b is down
        rw = self.fio(a.uri(REPL), f"resync-rewrite-{tag}", "write", MiB, 8, None, extra=[f"--randseed={seed + 1}"],
                      sample=False)
        dirty = self.peer()
        nchunks = VOLUME_SIZE // self.chunk_size
        if (dirty.get("resync_remaining_chunks") or 0) < nchunks:
            self.res.setdefault("warnings", []).append(
                f"resync at --resync-rate {rate_label(rate)}: after rewriting all 1 GiB while b was out of sync only "
                f"{dirty.get('resync_remaining_chunks')} chunk(s) are in b's resync bitmap (expected {nchunks})")
        # the replica comes back: time until it is in sync, polling the primary in a thread meanwhile
        samples = []
        stop = threading.Event()

        def poll():
            while not stop.is_set():
                try:
                    p = self.peer()
                except Exception:
                    p = None
                t = time.monotonic()
                srv_b = b.server
                ticks = {"a": thread_ticks(a.pid)}
                if srv_b is not None and srv_b.proc is not None:
                    ticks["b"] = thread_ticks(srv_b.pid)
                if p is not None:
                    samples.append((t, p, ticks))
                stop.wait(POLL)

        poller = threading.Thread(target=poll, name="resync-poll", daemon=True)
        t_spawn = time.monotonic()
        poller.start()
        try:
            b.start()
            replica_start = time.monotonic() - t_spawn
            st = self.wait_for(lambda s: s["peers"]["b"]["state"] == "in_sync"
                               and not s["peers"]["b"].get("resync_remaining_chunks"), 300, "resync to finish")
            t_done = time.monotonic()
        finally:
            stop.set()
            poller.join()
        peer = st["peers"]["b"]
        for t, p, _ in samples:  # the poller may have seen the end first (b is down before t_spawn: no earlier in_sync)
            if p["state"] == "in_sync" and not p.get("resync_remaining_chunks"):
                t_done = min(t_done, t)
                break
        transitions = []
        for t, p, _ in samples:
            if not transitions or transitions[-1]["state"] != p["state"]:
                transitions.append({"t": round(t - t_spawn, 3), "state": p["state"],
                                    "done_chunks": p.get("resync_done_chunks")})
        active = [(t, p, ticks) for t, p, ticks in samples if p["state"] == "resyncing"]
        t_first = active[0][0] if active else None
        cpu = None
        if len(active) >= 2 and active[-1][0] - active[0][0] >= 0.2:
            (ta, _, ka), (tb, _, kb) = active[0], active[-1]
            cpu = {}
            for node in ("a", "b"):
                if node in ka and node in kb:
                    th = threads_delta(ka[node], kb[node], tb - ta)
                    cpu[node] = {"cpu_pct": sum(x["cpu_pct"] for x in th), "threads": th[:4]}
        show = json.loads(a.cli("volume", "show", REPL, "--json"))["replication"]["peers"]["b"]
        ver = self.verify()
        a.cli("volume", "set", REPL, "--min-copies", "2")
        resynced = show.get("resynced_bytes", peer.get("resynced_bytes", 0)) - bytes0
        elapsed = t_done - t_spawn
        active_s = t_done - t_first if t_first is not None else None
        return {
            "resync_rate": rate, "resync_rate_label": rate_label(rate),
            "fill_mibps": fill["mibps"], "detect_s": detect, "chunks_at_kill": at_kill,
            "rewrite_mibps": rw["mibps"], "rewrite_s": rw["wall_s"],
            "chunks_dirty": dirty.get("resync_remaining_chunks"), "dirty_bytes": dirty.get("resync_remaining_bytes"),
            "verify": ver,
            "replica_start_s": replica_start, "elapsed_s": elapsed, "active_s": active_s,
            "resynced_bytes": resynced, "skipped_chunks": show.get("skipped_chunks", 0) - skipped0,
            "resync_total_chunks": show.get("resync_total_chunks"),
            "mibps": resynced / MiB / elapsed if elapsed > 0 else None,
            "active_mibps": resynced / MiB / active_s if active_s else None,
            "cap_mibps": DEFAULT_RESYNC_MIBPS if rate is None else rate,
            "status_after": show,
            "samples": len(samples),
            "transitions": transitions,
            "cpu": cpu,  # during the resync (first to last poll that saw it running), threads alive throughout
        }

    def verify(self):
        """`blockd verify repl --json` on the primary: every block's checksum compared with b's."""
        t0 = time.monotonic()
        p = subprocess.run(blockd_cli() + ["--data-dir", self.a.data, "verify", REPL, "--json"], capture_output=True,
                           text=True, timeout=600)
        try:
            v = json.loads(p.stdout)
        except ValueError:
            raise BenchError(f"blockd verify {REPL} failed ({p.returncode}): {p.stderr.strip()[-2000:]}") from None
        diffs = {k: len(x) for k, x in (v.get("differences") or {}).items()}
        return {"identical": bool(v.get("identical")), "differing_blocks": diffs, "seconds": time.monotonic() - t0}

    def resync_check(self):
        """Writes made while a replica is out of sync must reach its resync bitmap, and it must end identical.

        Unlike the measurements above, the primary's writes are flushed before b dies: nothing b acknowledged
        is at risk, so only the writes made while b is down can put chunks in its bitmap."""
        a, b = self.a, self.b
        chunks = (3, 100, 200)
        self.wait_in_sync()
        self.holder.h.flush()
        b.kill9()
        self.wait_for(lambda s: s["peers"]["b"]["state"] == "out_of_sync", 60, "b out_of_sync after SIGKILL")
        at_kill = self.peer().get("resync_remaining_chunks")
        a.cli("volume", "set", REPL, "--min-copies", "1")
        for c in chunks:
            self.holder.h.pwrite(os.urandom(4 * KiB), c * self.chunk_size + 8 * KiB)
        recorded = self.peer().get("resync_remaining_chunks")
        b.start()
        self.wait_in_sync()
        ver = self.verify()
        a.cli("volume", "set", REPL, "--min-copies", "2")
        ok = ver["identical"] and (recorded or 0) >= len(chunks)
        r = self.res["resync_check"] = {"writes_while_out_of_sync": len(chunks), "chunks_at_kill": at_kill,
                                        "chunks_recorded": recorded, "verify": ver, "ok": ok}
        log(f"resync check: {len(chunks)} 4 KiB writes to 3 chunks while b was out of sync (after a flush): "
            f"{recorded} chunk(s) in b's resync bitmap; after the resync verify says "
            f"{'identical' if ver['identical'] else 'DIFFERENT: ' + str(ver['differing_blocks']) + ' block(s)'}"
            f"  {'ok' if ok else 'FAILED'}")
        return r

    def run(self):
        o = self.o
        phases = self.res["meta"]["phase_seconds"] = {}
        t = [time.monotonic()]

        def phase(name):
            now = time.monotonic()
            phases[name] = round(now - t[0], 2)
            t[0] = now

        self.make_dirs()
        self.setup()
        self.b.start()
        self.start_ref()
        srv = self.start_primary(o["threads"])
        main_threads = srv.threads if srv.threads is not None else (o["threads"] or BLOCKD_DEFAULT_THREADS)
        self.res["meta"]["primary"] = {"threads": main_threads, "cmdline": srv.cmdline()}
        self.res["meta"]["replica"] = {"cmdline": self.b.server.cmdline()}
        log(f"node a (primary, nbdkit --threads {main_threads}, pid {self.a.pid}), node b (replica, pid {self.b.pid}), "
            f"nbdkit file (pid {self.ref.pid}); repl in sync on b")
        phase("setup")
        self.fill()
        phase("fill")
        self.rounds()
        phase("rounds")
        self.stop_ref()  # not needed any more: out of the way
        if o["transport"]:
            self.transport(main_threads)
            phase("transport")
        if o["diagnostic"]:
            self.diagnose(main_threads)
            phase("diagnostic")
        if o["sweep"] and o["sweep_threads"]:
            self.sweep(main_threads)
            phase("sweep")
        if o["resync"] and o["resync_rates"]:
            self.resync(main_threads)
            phase("resync")
            self.resync_check()
            phase("resync_check")


def status_for(r):
    if r is None:
        return "n/a"
    return "BELOW FLOOR" if r < FLOOR else "ok"


def misses(res):
    out = [f"replicated {n}" for n, w in res.get("workloads", {}).items() if w.get("status") == "BELOW FLOOR"]
    for r in (res.get("resync") or {}).get("runs", []):
        if not (r.get("verify") or {}).get("identical", True):
            out.append(f"resync at {r['resync_rate_label']}: copies differ after the resync")
    chk = res.get("resync_check")
    if chk is not None and not chk["ok"]:
        out.append("resync check: writes while out of sync not resynced")
    return out


def hint(res):
    """Where the time goes on the replicated 4 KiB path (main rounds), from /proc and the primary's metrics."""
    w = (res.get("workloads") or {}).get("randwrite-4k")
    if not w or not w.get("median"):
        return None
    runs = w["runs"]["replicated"]
    if not runs:
        return None
    r = sorted(runs, key=lambda x: x["iops"])[len(runs) // 2]  # the median run
    threads = res["meta"].get("primary", {}).get("threads")
    out = {"iops": r["iops"], "per_request_us": 1e6 / r["iops"] if r["iops"] else None, "threads": threads,
           "cpu": {k: {"cpu_pct": r.get(f"cpu_{k}_pct"), "threads": (r.get("threads") or {}).get(k, [])[:4]}
                   for k in ("a", "b")},
           "fio_cpu_pct": r["fio_cpu_pct"]}
    b = w["median"]["blockd"]
    window = r.get("threads_window_s")
    if window and r["iops"]:
        for k, c in out["cpu"].items():
            vcsw = sum(t.get("vcsw_per_s", 0) for t in (r.get("threads") or {}).get(k, []))
            c["switches_per_request"] = vcsw / r["iops"]
    for k, c in out["cpu"].items():
        c["cpu_us_per_request"] = 1e4 * c["cpu_pct"] / r["iops"] if c.get("cpu_pct") is not None and r["iops"] else None
    out["blockd_cpu_a_us_per_request"] = (1e4 * b["cpu_a_pct"] / b["iops"]
                                          if b.get("cpu_a_pct") is not None and b.get("iops") else None)
    out["blockd_per_request_us"] = 1e6 / b["iops"] if b.get("iops") else None
    d = res.get("diagnostic") or {}
    if d.get("replicated"):
        dr, db = d["replicated"], d.get("blockd") or {}
        out["diagnostic"] = {
            "per_request_us": 1e6 / dr["iops"] if dr.get("iops") else None,
            "plugin_write_us": (dr.get("metrics") or {}).get("write_mean_us"),
            "ack_us": (dr.get("metrics") or {}).get("ack_mean_us"),
            "blockd_per_request_us": 1e6 / db["iops"] if db.get("iops") else None,
            "blockd_plugin_write_us": (db.get("metrics") or {}).get("write_mean_us"),
        }
    return out


def print_table(res, host=True):
    wls = {n: w for n, w in (res.get("workloads") or {}).items() if w.get("median")}
    m = res["meta"]
    o = m["options"]
    if wls:
        log()
        log(f"replication: median of {o['repeat']} run(s) x {o['runtime']} s; primary nbdkit --threads "
            f"{m.get('primary', {}).get('threads')}; repl = 1 replica on loopback "
            f"({'INSECURE: plain TCP' if o.get('insecure') else 'CurveZMQ'}), min-copies 2")
        hdr = (f"{'workload':<13} {'metric':<6} {'file':>9} {'blockd':>9} {'repl':>9} {'repl/blockd':>11} {'floor':>5}  "
               f"{'status':<11} {'blockd/file':>11} {'repl/file':>9} {'p99 us b/r':>13} {'cpu% a/b (repl)':>15}")
        log(hdr)
        log("-" * len(hdr))
        for name, w in wls.items():
            med = w["median"]
            unit, spec = ("IOPS", ".0f") if w["metric"] == "iops" else ("MiB/s", ".1f")
            f, b, r = (med[t][w["metric"]] for t in TARGETS)
            rt = w["ratio"]
            p99 = f"{fmt(med['blockd']['clat_p99_us'], '.0f')}/{fmt(med['replicated']['clat_p99_us'], '.0f')}"
            cpu = f"{fmt(med['replicated']['cpu_a_pct'], '.0f')}/{fmt(med['replicated']['cpu_b_pct'], '.0f')}"
            log(f"{name:<13} {unit:<6} {fmt(f, spec):>9} {fmt(b, spec):>9} {fmt(r, spec):>9} "
                f"{fmt(rt['replicated/blockd'], '.2f'):>11} {w['floor']:>5.2f}  {w['status']:<11} "
                f"{fmt(rt['blockd/file'], '.2f'):>11} {fmt(rt['replicated/file'], '.2f'):>9} {p99:>13} {cpu:>15}")
        fill = res.get("fill")
        if fill:
            log("fill (1 GiB into holes, 1 MiB QD8): " + ", ".join(f"{t} {v['mibps']:.0f} MiB/s" for t, v in fill.items()))
    sw = res.get("sweep")
    for wname, wres in ((sw or {}).get("results") or {}).items():
        unit, spec = ("IOPS", ".0f") if wres["metric"] == "iops" else ("MiB/s", ".1f")
        log()
        log(f"primary --threads sweep, {wname}, median of {sw['rounds']} run(s) x {sw['runtime']} s "
            f"(* = the main rounds' runs); floor: repl/blockd >= {FLOOR}")
        hdr = (f"{'threads':>8} {'blockd ' + unit:>12} {'repl ' + unit:>11} {'repl/blockd':>11}  {'status':<11} "
               f"{'repl/blockd@' + str(sw['main_threads']):>14} {'p99 us repl':>11} {'cpu% a/b':>9} "
               f"{'cpu us/req a/b':>14}")
        log(hdr)
        log("-" * len(hdr))
        for n in sw["threads"]:
            e = wres["by_threads"][str(n)]
            b, r = e["blockd"], e["replicated"]
            tag = f"{n}{'*' if e.get('from_main_rounds') else ''}"
            cpu = f"{fmt(r['cpu_a_pct'], '.0f')}/{fmt(r['cpu_b_pct'], '.0f')}"
            per_req = "-"
            if r.get("iops") and r.get("cpu_a_pct") is not None and r.get("cpu_b_pct") is not None:
                per_req = f"{1e4 * r['cpu_a_pct'] / r['iops']:.0f}/{1e4 * r['cpu_b_pct'] / r['iops']:.0f}"
            log(f"{tag:>8} {fmt(b['value'], spec):>12} {fmt(r['value'], spec):>11} {fmt(e['ratio'], '.2f'):>11}  "
                f"{e['status']:<11} {fmt(e['ratio_vs_main_blockd'], '.2f'):>14} {fmt(r['clat_p99_us'], '.0f'):>11} "
                f"{cpu:>9} {per_req:>14}")
        meets = wres.get("meets_floor") or []
        log(f"floor (repl/blockd at the same --threads) met at: {', '.join(map(str, meets)) if meets else 'none'}; "
            f"repl vs blockd at --threads {sw['main_threads']}: "
            f"{', '.join(map(str, wres.get('meets_floor_vs_main_blockd') or [])) or 'none'}; "
            f"fastest replicated: --threads {wres.get('best_replicated_threads')}")
    rs = res.get("resync")
    if rs and rs.get("runs"):
        log()
        log("resync of a 1 GiB volume, every chunk rewritten while the replica was down (SIGKILL), "
            "then the replica restarted")
        hdr = (f"{'--resync-rate':<14} {'cap':>6} {'dirty':>5} {'resynced':>9} {'skipped':>7} {'elapsed s':>9} "
               f"{'MiB/s':>6} {'active s':>8} {'MiB/s':>6}  {'verify':<9} {'cpu% a/b':>9} {'detect s':>8} "
               f"{'fill/rewrite MiB/s':>18}")
        log(hdr)
        log("-" * len(hdr))
        for r in rs["runs"]:
            cpu = r.get("cpu") or {}
            cpu = f"{fmt(cpu.get('a', {}).get('cpu_pct'), '.0f')}/{fmt(cpu.get('b', {}).get('cpu_pct'), '.0f')}"
            ver = "identical" if (r.get("verify") or {}).get("identical") else "DIFFERENT"
            log(f"{r['resync_rate_label']:<14} {r['cap_mibps']:>6g} {fmt(r['chunks_dirty'], 'd'):>5} "
                f"{r['resynced_bytes'] / MiB:>6.0f}MiB {r['skipped_chunks']:>7} {fmt(r['elapsed_s'], '.2f'):>9} "
                f"{fmt(r['mibps'], '.0f'):>6} {fmt(r['active_s'], '.2f'):>8} {fmt(r['active_mibps'], '.0f'):>6}  "
                f"{ver:<9} {cpu:>9} {r['detect_s']:>8.2f} {r['fill_mibps']:>8.0f}/{r['rewrite_mibps']:<9.0f}")
        log("elapsed: from the replica's spawn (its start-up and the primary's reconnect included) to in_sync; "
            f"active: from the first poll ({POLL * 1000:.0f} ms) that saw the resync running; detect: SIGKILL to "
            "out_of_sync; fill with b in sync (min-copies 2), rewrite with b down (min-copies 1)")
    chk = res.get("resync_check")
    if chk:
        v = chk["verify"]
        log(f"resync check (flush, b down, 4 KiB writes to {chk['writes_while_out_of_sync']} chunks, b back): "
            f"{chk['chunks_recorded']} chunk(s) recorded for b; verify: "
            f"{'identical' if v['identical'] else 'DIFFERENT ' + str(v['differing_blocks'])}  "
            f"{'ok' if chk['ok'] else 'FAILED'}")
    tr = res.get("transport")
    if tr and tr.get("workloads"):
        log()
        log(f"transport alone (tools/bench_transport.py: blockd WRITEs over pyzmq "
            f"{'plain TCP' if tr['insecure'] else 'CurveZMQ'} between two Python processes, {tr['threads']} threads x 1 "
            f"in flight, decoded and ACKed, nothing hashed or written; median of {o['repeat']} x {tr['seconds']:g} s)")
        hdr = (f"{'workload':<13} {'metric':<6} {'transport':>10} {'tr/blockd':>9} {'cpu us tr+2xb':>13} "
               f"{'bound':>9} {'bound/blockd':>12} {'repl/bound':>10}  verdict")
        log(hdr)
        log("-" * len(hdr))
        for name, w in tr["workloads"].items():
            unit, spec = ("IOPS", ".0f") if w["metric"] == "iops" else ("MiB/s", ".1f")
            tb, bb = w["transport/blockd"], w["bound/blockd"]
            if tb is not None and tb < FLOOR:
                verdict = "floor unreachable here: the transport alone is below it"
            elif bb is not None and bb < FLOOR:
                verdict = "floor unreachable here: CPU for transport + two writes exceeds it"
            elif bb is None:
                verdict = "-"
            else:
                verdict = "the bound leaves room for the floor"
            cpu = f"{fmt(w['cpu_us_per_round_trip'], '.0f')}+2x{fmt(w['blockd_cpu_us_per_request'], '.0f')}"
            log(f"{name:<13} {unit:<6} {fmt(w['value'], spec):>10} {fmt(tb, '.2f'):>9} {cpu:>13} "
                f"{fmt(w['bound'], spec):>9} {fmt(bb, '.2f'):>12} {fmt(w['replicated/bound'], '.2f'):>10}  {verdict}")
        log(f"bound = {m['nproc']} CPUs / (the transport's CPU per round trip, both ends + 2 x unreplicated blockd's "
            "CPU per request on node a in the main rounds): what the CPUs allow if replication cost nothing but "
            "the message and a second copy's write (fio's own CPU not even counted)")
    d = res.get("diagnostic")
    if d and d.get("replicated"):
        log()
        log(f"--metrics on the primary (diagnostic, {d['runtime']} s runs): 4 KiB random write "
            f"{d['blockd']['iops']:.0f} IOPS unreplicated ({fmt(d['blockd'].get('iops_vs_main'), '.2f')} x without), "
            f"{d['replicated']['iops']:.0f} replicated ({fmt(d['replicated'].get('iops_vs_main'), '.2f')} x); node a RSS "
            f"+{fmt(d.get('rss_bytes_per_request'), '.0f')} B per request; a scrape after {d['requests']} requests took "
            f"{d['scrape_s_after']:.2f} s")
    h = res.get("hint")
    if h:
        log()
        log(f"where the time goes, replicated randwrite-4k (median run, --threads {h['threads']}): "
            f"{h['iops']:.0f} IOPS = {fmt(h['per_request_us'], '.0f')} us per request "
            f"(unreplicated {fmt(h['blockd_per_request_us'], '.0f')} us)")
        dg = h.get("diagnostic")
        if dg:
            log(f"  with --metrics (diagnostic run): {fmt(dg['per_request_us'], '.0f')} us per request "
                f"(unreplicated {fmt(dg['blockd_per_request_us'], '.0f')} us); the plugin's pwrite "
                f"{fmt(dg['plugin_write_us'], '.0f')} us (unreplicated {fmt(dg['blockd_plugin_write_us'], '.0f')} us), "
                f"of which waiting for the replica's ack {fmt(dg['ack_us'], '.0f')} us (link thread send -> answer)")
        for node, c in sorted(h["cpu"].items()):
            extra = (f" (unreplicated {fmt(h.get('blockd_cpu_a_us_per_request'), '.0f')} us)" if node == "a" else "")
            log(f"  node {node}: {fmt(c['cpu_pct'], '.0f')}% CPU = {fmt(c.get('cpu_us_per_request'), '.0f')} us of CPU "
                f"per request{extra}; "
                f"{fmt(c.get('switches_per_request'), '.1f')} voluntary context switches per request; busiest threads:")
            for t in c["threads"]:
                states = ", ".join(f"{st} {v * 100:.0f}%" for st, v in (t.get("states") or {}).items())
                log(f"    {t['comm']:<12} [{t['tid']}] {t['cpu_pct']:3.0f}% CPU, "
                    f"{fmt(t.get('vcsw_per_s'), '.0f')} sleeps/s; sampled: {states or '-'}")
        log(f"  fio: {h['fio_cpu_pct']:.0f}% CPU")
    for w in res.get("warnings", []):
        log(f"warning: {w}")
    if host and m.get("loadavg_after"):
        log(f"host: {m['nproc']} CPUs; load average before {m['loadavg_before'][0]:.2f}, "
            f"after {m['loadavg_after'][0]:.2f} (fio, both nodes, the reference and anything else share them)")


def run(opts=None) -> dict:
    """Run the replication benchmark. opts: argparse.Namespace, dict (keys as in DEFAULTS) or None.

    Returns the results dict (with "summary" rows and "misses"); raises BenchError on failure.
    Every server is stopped and the temp dir removed on every exit path.
    """
    for tool in ("fio", "nbdkit"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} not found: run `make setup`")
    try:
        import nbd  # noqa: F401  (only checked here: the run's readiness probes need it)
    except ImportError:
        raise BenchError("python3-libnbd (module nbd) not importable: run `make setup`") from None
    b = ReplicationBench(_options(opts))
    o = b.o
    t0 = time.perf_counter()
    log(f"replication benchmark: {len(WORKLOADS)} workloads x 3 targets, {o['repeat']} round(s) of {o['runtime']} s; "
        f"sweep --threads {','.join(map(str, o['sweep_threads'])) if o['sweep'] else 'off'}; "
        f"resync at {', '.join(rate_label(r) for r in o['resync_rates']) if o['resync'] else 'off'} MiB/s")
    try:
        b.run()
    finally:
        bf.cleanup_uninterrupted(b.cleanup)
    res = b.res
    res["meta"]["loadavg_after"] = bf.loadavg()
    res["meta"]["seconds"] = time.perf_counter() - t0
    res["hint"] = hint(res)
    res["summary"] = [{"workload": n, "metric": w["metric"], **{t: w["median"][t][w["metric"]] for t in TARGETS},
                       **w["ratio"], "floor": w["floor"], "status": w["status"]}
                      for n, w in res["workloads"].items() if w.get("median")]
    res["misses"] = misses(res)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(prog="tools/bench_replication.py", description=__doc__.splitlines()[0])
    ap.add_argument("--dir", help="parent of the temp dir (default: $TMPDIR or /tmp)")
    ap.add_argument("--runtime", type=int, help="seconds per fio run in the main rounds (default 10; 3 with --quick)")
    ap.add_argument("--repeat", type=int, help="main rounds (default 3; 1 with --quick)")
    ap.add_argument("--threads", type=int, help="the primary's blockd serve --threads in the main rounds and the resync "
                    "(default: blockd's default)")
    ap.add_argument("--sweep-threads", type=parse_threads_list, metavar="LIST",
                    help="primary --threads values for the 4 KiB random write sweep (default 1,4,8,16; 1,4,16 with "
                         "--quick)")
    ap.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=True, help="run the sweep (default: on)")
    ap.add_argument("--sweep-workloads", type=lambda t: [x.strip() for x in t.split(",") if x.strip()],
                    default=DEFAULTS["sweep_workloads"], metavar="LIST",
                    help="workloads in the sweep: randwrite-4k and/or seqwrite-1m (default randwrite-4k)")
    ap.add_argument("--sweep-runtime", type=int, help="seconds per sweep run (default min(5, runtime/2); 2 with --quick)")
    ap.add_argument("--sweep-repeat", type=int, help="sweep rounds (default 1)")
    ap.add_argument("--resync", action=argparse.BooleanOptionalAction, default=True,
                    help="run the resync measurement (default: on)")
    ap.add_argument("--resync-rates", type=parse_rates, default=DEFAULTS["resync_rates"], metavar="LIST",
                    help="the primary's --resync-rate for each resync measurement, MiB/s or 'default' "
                         "(default 10000,default)")
    ap.add_argument("--diagnostic", action=argparse.BooleanOptionalAction, default=True,
                    help="after the rounds, one 4 KiB random write on plain and repl with the primary's --metrics on, "
                         "for the ack latency and the plugin's write time (default: on)")
    ap.add_argument("--transport", action=argparse.BooleanOptionalAction, default=True,
                    help="after the rounds, the transport alone (tools/bench_transport.py) at the same sizes and "
                         "threads, as a reference for what the floors ask (default: on)")
    ap.add_argument("--insecure", action="store_true",
                    help="both nodes with --insecure-replication (plain TCP, no CurveZMQ): to see what encryption "
                         "costs; not the default")
    ap.add_argument("--quick", action="store_true", help="smoke test: 3 s runs, 1 round, 2 s sweep runs")
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (server logs, raw fio JSON)")
    ap.add_argument("--check", action="store_true", help="exit 3 if a replicated/unreplicated ratio is below its floor")
    args = ap.parse_args(argv)
    return bf.main_tail("replication bench", args, run, print_table, "below floor",
                        footer=lambda res: f"replication bench: {res['meta']['seconds']:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
