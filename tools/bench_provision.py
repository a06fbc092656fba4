#!/usr/bin/env python3
"""Control-plane benchmark for blockd: provisioning, catalog queries, server start-up.

    python tools/bench_provision.py [--volumes N] [--repeat N] [--quick] [--dir DIR]
                                    [--json PATH] [--keep] [--check]

Every figure is the wall time of a whole `blockd ...` command in a subprocess
(interpreter start-up included), median of --repeat runs, each run in a fresh
data dir under --dir (default $TMPDIR or /tmp):
  1. `provision tools/plans/prime-day-2020.toml` on an empty data dir
     (target <= 2 s), then again (no-op) and with --dry-run;
  2. a generated plan of --volumes volumes (default 1,000,000 of 1 TiB,
     pool limit 1 EiB) in one plan (target <= 30 s per million), then
     `volume list --limit 10` and `volume show <last>` (target < 0.5 s each)
     and `capacity show --json` on that data dir;
  3. `blockd serve --listen unix:SOCK` from spawn to the first NBD handshake
     with that catalog (target <= 2 s) and with an empty one, after one
     untimed warm-up start (numba JIT cache); then the last volume is
     attached by export name and a 4 KiB write + read round-trip is checked;
  4. `volume list` on a small data dir and `python -c "import blockd.cli"`
     (median of --startup-runs), and `python -X importtime` to confirm the
     control-plane commands import neither numba nor zmq;
  5. the server's peak RSS (VmHWM) right after the handshake, both catalogs.
Prints a table (median, target, PASS/MISS) and writes JSON with --json.
tools/bench imports run() and print_table() (see docs/benchmarks.md).
"""

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "tools")
sys.path.insert(0, TOOLS)
import bench_fio as bf  # noqa: E402
from bench_fio import BenchError  # noqa: E402

PRIME_PLAN = os.path.join(ROOT, "tools", "plans", "prime-day-2020.toml")
MILLION = 1_000_000
QUICK_VOLUMES = 100_000
BULK_NAME = "m-{index:07d}"
BULK_SIZE = "1TiB"
BULK_LIMIT = "1EiB"
HEAVY_MODULES = ("numba", "llvmlite", "zmq", "numpy")  # numba/zmq must not load; numpy is reported
FORBIDDEN_MODULES = ("numba", "zmq")
SMALL_VOLUMES = 3

# targets, seconds (None: reported, no target)
TARGET_PRIME = 2.0
TARGET_BULK_PER_MILLION = 30.0
TARGET_QUERY = 0.5  # strictly below
TARGET_SERVER_START = 2.0
TARGET_SCRAPE = 1.0  # issue 5: a scrape with 15,000 provisioned volumes stays under 1 s
SCRAPE_ATTACHED = 50  # volumes attached (and so carrying per-volume series) during the second scrape run

DEFAULTS = {"dir": None, "volumes": None, "repeat": None, "startup_runs": None, "quick": False, "keep": False,
            "json": None, "check": False}


# ---- helpers -------------------------------------------------------------------------
def log(msg=""):
    print(msg, flush=True)


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def blockd_cli():
    here = os.path.join(os.path.dirname(sys.executable), "blockd")
    if os.path.exists(here):
        return [here]
    return [sys.executable, "-m", "blockd.cli"]


# Linux carries a process's peak RSS across execve, so a child forked straight from this
# process (which may hold numba, ~150 MiB, inside tools/bench) would report our peak as its
# own.  A small launcher forks the command from a fresh interpreter and reports the
# command's wall time (fork to exit, interpreter start-up included) and peak RSS.
_LAUNCHER = """\
import os, sys, time
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execv(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, ru = os.wait4(pid, 0)
wall = time.perf_counter() - t0
with open(sys.argv[1], "w") as f:
    f.write(f"{wall} {ru.ru_maxrss}")
sys.exit(os.waitstatus_to_exitcode(status) & 0xFF)
"""


def timed(argv, label=None):
    """Run argv to completion; return (wall seconds, peak RSS KiB, stdout). Raises BenchError on failure."""
    exe = shutil.which(argv[0]) or argv[0]
    fd, stats = tempfile.mkstemp(prefix="bp-stats-")
    os.close(fd)
    try:
        p = subprocess.run([sys.executable, "-c", _LAUNCHER, stats, exe, *argv[1:]],
                           stdin=subprocess.DEVNULL, capture_output=True)
        if p.returncode != 0:
            raise BenchError(f"{label or ' '.join(argv)} failed ({p.returncode}): "
                             f"{p.stderr.decode(errors='replace').strip()[-2000:]}")
        with open(stats) as f:
            wall, rss = f.read().split()
        return float(wall), int(rss), p.stdout.decode(errors="replace")
    finally:
        os.unlink(stats)


def summarize(runs, target=None, strict=False, unit="s"):
    """runs: list of seconds -> {runs, median, min, max, target, status}."""
    med = median(runs)
    e = {"runs": runs, "median": med, "min": min(runs) if runs else None, "max": max(runs) if runs else None,
         "unit": unit, "target": target, "target_op": "<" if strict else "<="}
    if target is None or med is None:
        e["status"] = "info"
    else:
        e["status"] = "PASS" if (med < target if strict else med <= target) else "MISS"
    return e


def read_proc_status(pid, keys=("VmHWM", "VmRSS")):
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in keys:
                    out[k] = int(v.split()[0])  # kB
    except OSError:
        pass
    return out


def write_plan(path, count):
    with open(path, "w") as f:
        f.write(f'description = "bench_provision: {count} x {BULK_SIZE}"\n\n'
                f'[pool]\nlogical_limit = "{BULK_LIMIT}"\n\n'
                f'[[volumes]]\nname = "{BULK_NAME}"\ncount = {count}\nsize = "{BULK_SIZE}"\ntype = "raw"\n')


def _options(opts):
    o = dict(DEFAULTS)
    if opts is None:
        pass
    elif isinstance(opts, dict):
        o.update(opts)
    else:
        o.update({k: v for k, v in vars(opts).items() if k in DEFAULTS})
    if o["volumes"] is None:
        o["volumes"] = QUICK_VOLUMES if o["quick"] else MILLION
    if o["repeat"] is None:
        o["repeat"] = 1 if o["quick"] else 3
    if o["startup_runs"] is None:
        o["startup_runs"] = 5 if o["quick"] else 10
    if o["volumes"] < 1 or o["repeat"] < 1 or o["startup_runs"] < 1:
        raise BenchError("--volumes, --repeat and --startup-runs must be >= 1")
    return o


# ---- NBD server ------------------------------------------------------------------------
class Serve:
    """`blockd serve --listen unix:SOCK` (exec's nbdkit, so the PID is nbdkit's)."""

    def __init__(self, data_dir, sock, log_path, extra=()):
        self.data_dir, self.sock, self.log_path = data_dir, sock, log_path
        self.extra = list(extra)
        self.proc = None

    def start(self, timeout=120):
        """Spawn and poll (5 ms) until an NBD handshake succeeds; returns seconds from spawn."""
        import nbd

        if os.path.exists(self.sock):
            os.unlink(self.sock)
        with open(self.log_path, "ab") as logf:
            t0 = time.perf_counter()
            self.proc = subprocess.Popen(
                blockd_cli() + ["--data-dir", self.data_dir, "serve", "--listen", "unix:" + self.sock, *self.extra],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=bf._pdeathsig)
        last = None
        while True:
            rc = self.proc.poll()
            if rc is not None:
                raise BenchError(f"blockd serve exited with status {rc} during start-up\n{self.log_tail()}")
            if os.path.exists(self.sock):
                h = nbd.NBD()
                try:
                    h.set_opt_mode(True)
                    h.connect_unix(self.sock)
                    h.opt_abort()
                    return time.perf_counter() - t0
                except (nbd.Error, OSError) as exc:
                    last = exc
                del h  # libnbd 1.14 has no close(): freeing the handle closes it
            if time.perf_counter() - t0 > timeout:
                raise BenchError(f"blockd serve not ready after {timeout}s (last error: {last})\n{self.log_tail()}")
            time.sleep(0.005)

    def round_trip(self, export):
        """Attach `export` by name, write 4 KiB at its last block, read it back; returns timings."""
        import nbd

        payload = os.urandom(4096)
        t0 = time.perf_counter()
        h = nbd.NBD()
        h.set_export_name(export)
        h.connect_unix(self.sock)
        t1 = time.perf_counter()
        size = h.get_size()
        off = size - 4096
        h.pwrite(payload, off)
        back = h.pread(4096, off)
        h.flush()
        t2 = time.perf_counter()
        h.shutdown()
        del h
        if back != payload:
            raise BenchError(f"4 KiB round-trip on {export}: data read back differs from data written")
        return {"export": export, "size": size, "offset": off, "attach_s": t1 - t0, "write_read_flush_s": t2 - t1,
                "ok": True}

    def status(self):
        return read_proc_status(bf.serving_pid(self.proc.pid))

    def stop(self, grace=10):
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
        rc, self.proc = self.proc.returncode, None
        return rc

    def log_tail(self, lines=20):
        try:
            with open(self.log_path, "rb") as f:
                text = f.read()[-8192:].decode(errors="replace")
        except OSError:
            return "(no server log)"
        return "--- serve log ---\n" + "\n".join(text.splitlines()[-lines:])


# ---- the benchmark -------------------------------------------------------------------
class ProvisionBench:
    def __init__(self, o):
        self.o = o
        self.tmp = None
        self.sockdir = None
        self.servers = []
        self.n = o["volumes"]
        self.last = BULK_NAME.format(index=self.n - 1)
        self.res = {
            "meta": {
                "timestamp": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                "options": {k: v for k, v in o.items()},
                "volumes": self.n,
                "repeat": o["repeat"],
                "nproc": os.cpu_count(),
                "loadavg_before": bf.loadavg(),
            },
        }

    def path(self, *parts):
        return os.path.join(self.tmp, *parts)

    def fresh(self, name):
        d = self.path(name)
        if os.path.exists(d):
            shutil.rmtree(d)
        return d

    def cli(self, data_dir, *args):
        return blockd_cli() + ["--data-dir", data_dir, *args]

    def make_dirs(self):
        parent = self.o["dir"] or tempfile.gettempdir()
        os.makedirs(parent, exist_ok=True)
        self.tmp = tempfile.mkdtemp(prefix="blockd-provbench-", dir=parent)
        if len(self.path("serve.sock")) > 100:  # unix socket paths are limited to 107 bytes
            self.sockdir = tempfile.mkdtemp(prefix="bp-", dir="/tmp")
        mnt, fstype, src = bf.fs_type(self.tmp)
        self.res["meta"]["temp_dir"] = self.tmp
        self.res["meta"]["filesystem"] = {"mount": mnt, "type": fstype, "source": src}
        log(f"provision bench: temp dir {self.tmp} (filesystem {fstype} on {src})")

    def cleanup(self):
        for srv in list(self.servers):
            try:
                srv.stop()
            except Exception as exc:  # keep going: the temp dir still needs removing
                log(f"provision bench: stopping server: {exc}")
            self.servers.remove(srv)
        for d in (self.sockdir, None if self.o["keep"] else self.tmp):
            if d and os.path.isdir(d):
                shutil.rmtree(d, ignore_errors=True)
        if self.tmp:
            log(f"provision bench: kept {self.tmp}" if self.o["keep"] else f"provision bench: removed {self.tmp}")

    # -- 1. the shipped plan --
    def prime(self):
        first, noop, dry = [], [], []
        for i in range(self.o["repeat"]):
            d = self.fresh("prime")
            w, rss, _ = timed(self.cli(d, "provision", PRIME_PLAN))
            first.append(w)
            w2, _, _ = timed(self.cli(d, "provision", PRIME_PLAN))
            noop.append(w2)
            w3, _, _ = timed(self.cli(d, "provision", PRIME_PLAN, "--dry-run"))
            dry.append(w3)
            log(f"[{i + 1}/{self.o['repeat']}] prime-day-2020 provision {w:6.3f} s (max RSS {rss >> 10} MiB), "
                f"no-op {w2:6.3f} s, --dry-run {w3:6.3f} s")
        cap = json.loads(timed(self.cli(d, "capacity", "show", "--json"))[2])
        if cap.get("volumes") != 15424:
            raise BenchError(f"after provisioning the prime-day plan the catalog has {cap.get('volumes')} volumes, not 15424")
        shutil.rmtree(d)
        self.res["prime_day"] = {
            "plan": os.path.relpath(PRIME_PLAN, ROOT), "volumes": cap.get("volumes"),
            "provision": summarize(first, TARGET_PRIME), "noop": summarize(noop), "dry_run": summarize(dry),
        }

    # -- 2. one big plan, then queries on it --
    def bulk(self):
        n, o = self.n, self.o
        plan = self.path("bulk.toml")
        write_plan(plan, n)
        target = TARGET_BULK_PER_MILLION * n / MILLION
        times, rss = [], []
        for i in range(o["repeat"]):
            d = self.fresh("bulk")
            w, r, _ = timed(self.cli(d, "provision", plan))
            times.append(w)
            rss.append(r)
            log(f"[{i + 1}/{o['repeat']}] provision {n} volumes: {w:6.2f} s ({n / w:,.0f} volumes/s, max RSS {r >> 10} MiB)")
        self.bulk_dir = d  # the last one stays for the queries and the server
        db = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.startswith("catalog"))
        q = {}
        for key, args in (("volume_list", ("volume", "list", "--limit", "10")),
                          ("volume_show", ("volume", "show", self.last)),
                          ("capacity_show", ("capacity", "show", "--json"))):
            runs = []
            for _ in range(max(o["repeat"], 3)):
                w, _, out = timed(self.cli(d, *args))
                runs.append(w)
            q[key] = (runs, out)
        cap = json.loads(q["capacity_show"][1])
        if cap.get("volumes") != n:
            raise BenchError(f"capacity show reports {cap.get('volumes')} volumes, expected {n}")
        if self.last not in q["volume_show"][1]:
            raise BenchError(f"volume show {self.last} did not show it:\n{q['volume_show'][1][:500]}")
        self.res["bulk"] = {
            "volumes": n, "plan": {"name": BULK_NAME, "count": n, "size": BULK_SIZE, "logical_limit": BULK_LIMIT},
            "catalog_bytes": db, "provision_max_rss_kib": max(rss),
            "provision": summarize(times, target),
            "volume_list_limit_10": summarize(q["volume_list"][0], TARGET_QUERY, strict=True),
            "volume_show_last": summarize(q["volume_show"][0], TARGET_QUERY, strict=True),
            "capacity_show": summarize(q["capacity_show"][0]),
        }
        b = self.res["bulk"]
        log(f"on {n} volumes (catalog {db / 2**20:.0f} MiB): volume list --limit 10 {b['volume_list_limit_10']['median']:.3f} s, "
            f"volume show {self.last} {b['volume_show_last']['median']:.3f} s, "
            f"capacity show {b['capacity_show']['median']:.3f} s")

    # -- 3 + 5. server start-up and memory --
    def serve_once(self, data_dir, label, attach=None):
        sock = os.path.join(self.sockdir or self.tmp, "serve.sock")
        srv = Serve(data_dir, sock, self.path(f"serve-{label}.log"))
        self.servers.append(srv)
        try:
            t = srv.start()
            st = srv.status()
            r = {"startup_s": t, "vm_hwm_kib": st.get("VmHWM"), "vm_rss_kib": st.get("VmRSS")}
            if attach:
                r["round_trip"] = srv.round_trip(attach)
                r["vm_hwm_after_io_kib"] = srv.status().get("VmHWM")
        finally:
            rc = srv.stop()
            self.servers.remove(srv)
        if rc not in (0, None, -signal.SIGTERM):
            self.res.setdefault("warnings", []).append(f"serve ({label}) exited with status {rc}\n{srv.log_tail()}")
        return r

    def server(self):
        empty = self.fresh("empty")
        os.makedirs(empty)
        warm = self.serve_once(self.bulk_dir, "warmup", attach=self.last)
        log(f"warm-up serve ({self.n} volumes, untimed): ready {warm['startup_s']:.3f} s, "
            f"attach + 4 KiB write/read {warm['round_trip']['attach_s'] + warm['round_trip']['write_read_flush_s']:.3f} s")
        runs = {"bulk": [], "empty": []}
        for i in range(self.o["repeat"]):
            for label, d in (("bulk", self.bulk_dir), ("empty", empty)):  # alternate: drift hits both alike
                r = self.serve_once(d, label, attach=self.last if label == "bulk" else None)
                runs[label].append(r)
                extra = ""
                if "round_trip" in r:
                    rt = r["round_trip"]
                    extra = (f", attach {rt['export']} {rt['attach_s'] * 1e3:.1f} ms, 4 KiB write+read+flush "
                             f"{rt['write_read_flush_s'] * 1e3:.1f} ms OK")
                log(f"[{i + 1}/{self.o['repeat']}] serve {label:<5} ready {r['startup_s']:.3f} s, "
                    f"VmHWM {r['vm_hwm_kib'] / 1024:.0f} MiB{extra}")
        out = {"warmup": warm}
        for label, rs in runs.items():
            out[label] = {
                "volumes": self.n if label == "bulk" else 0,
                "startup": summarize([r["startup_s"] for r in rs], TARGET_SERVER_START if label == "bulk" else None),
                "vm_hwm_kib": median([r["vm_hwm_kib"] for r in rs]),
                "vm_rss_kib": median([r["vm_rss_kib"] for r in rs]),
                "runs": rs,
            }
            if label == "bulk":
                out[label]["vm_hwm_after_io_kib"] = median([r.get("vm_hwm_after_io_kib") for r in rs])
                out[label]["attach_s"] = median([r["round_trip"]["attach_s"] for r in rs])
                out[label]["write_read_flush_s"] = median([r["round_trip"]["write_read_flush_s"] for r in rs])
        self.res["server"] = out
        shutil.rmtree(empty)

    # -- 3b. a Prometheus scrape with the Prime Day fleet provisioned --
    def scrape(self):
        import socket
        import urllib.request

        import nbd

        d = self.fresh("scrape")
        timed(self.cli(d, "provision", PRIME_PLAN))
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        sock = os.path.join(self.sockdir or self.tmp, "scrape.sock")
        srv = Serve(d, sock, self.path("serve-scrape.log"), extra=["--metrics", f"127.0.0.1:{port}"])
        self.servers.append(srv)
        out = {"volumes": 15424, "target_s": TARGET_SCRAPE}
        handles = []
        try:
            srv.start()

            def scrape_times(k):
                times, size = [], 0
                for _ in range(k):
                    t0 = time.perf_counter()
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
                        size = len(resp.read())
                    times.append(time.perf_counter() - t0)
                return times, size

            for attached in (0, SCRAPE_ATTACHED):
                while len(handles) < attached:
                    h = nbd.NBD()
                    h.set_export_name(f"prime-{len(handles):05d}")
                    h.connect_unix(sock)
                    h.pwrite(os.urandom(4096), 0)
                    handles.append(h)
                times, size = scrape_times(self.o["repeat"] * 3)
                entry = summarize(times, TARGET_SCRAPE)
                entry["bytes"] = size
                out[f"attached_{attached}"] = entry
                log(f"scrape with 15,424 volumes provisioned, {attached} attached: median "
                    f"{entry['median'] * 1e3:.1f} ms, {size / 1024:.0f} KiB")
        finally:
            for h in handles:
                try:
                    h.shutdown()
                except nbd.Error:
                    pass
            srv.stop()
            self.servers.remove(srv)
            shutil.rmtree(d, ignore_errors=True)
        self.res["scrape"] = out

    # -- 4. control-plane start-up and imports --
    def cli_startup(self):
        small = self.fresh("small")
        for i in range(SMALL_VOLUMES):
            timed(self.cli(small, "volume", "create", f"s{i}", "--size", "1GiB"))
        k = self.o["startup_runs"]
        py = sys.executable
        cases = (
            ("volume_list_small", self.cli(small, "volume", "list")),
            ("import_blockd_cli", [py, "-c", "import blockd.cli"]),
            ("python_bare", [py, "-c", "pass"]),
        )
        runs = {key: [] for key, _ in cases}
        for _ in range(k):
            for key, argv in cases:  # interleaved
                runs[key].append(timed(argv)[0])
        out = {key: summarize(r) for key, r in runs.items()}
        out["small_volumes"] = SMALL_VOLUMES
        entry = blockd_cli()
        entry = [py, *entry] if len(entry) == 1 else entry
        imports = {}
        for key, args in (("volume list", ("volume", "list")),
                          ("volume show", ("volume", "show", "s0")),
                          ("capacity show", ("capacity", "show", "--json")),
                          ("provision --dry-run", ("provision", PRIME_PLAN, "--dry-run"))):
            argv = [entry[0], "-X", "importtime", *entry[1:], "--data-dir", small, *args]
            p = subprocess.run(argv, capture_output=True, text=True)
            if p.returncode != 0:
                raise BenchError(f"{' '.join(argv)} failed ({p.returncode}): {p.stderr.strip()[-2000:]}")
            mods = {}
            for line in p.stderr.splitlines():
                m = re.match(r"import time:\s+(\d+)\s*\|\s*(\d+)\s*\|(\s*)(\S+)", line)
                if m:
                    mods[m.group(4)] = (int(m.group(2)), len(m.group(3)))
            heavy = sorted({name.split(".")[0] for name in mods if name.split(".")[0] in HEAVY_MODULES})
            top = sorted(((us, name) for name, (us, depth) in mods.items() if depth <= 3), reverse=True)[:5]
            imports[key] = {
                "modules": len(mods), "heavy": heavy,
                "forbidden": [m for m in heavy if m in FORBIDDEN_MODULES],
                "top_cumulative_ms": {name: round(us / 1000, 1) for us, name in top},
            }
        out["imports"] = imports
        out["no_numba_zmq"] = not any(v["forbidden"] for v in imports.values())
        self.res["cli_startup"] = out
        shutil.rmtree(small)
        log(f"control plane: volume list (small) {out['volume_list_small']['median']:.3f} s, "
            f"import blockd.cli {out['import_blockd_cli']['median']:.3f} s, bare python {out['python_bare']['median']:.3f} s; "
            f"numba/zmq imported: {'no' if out['no_numba_zmq'] else 'YES'}")

    def run(self):
        self.make_dirs()
        log(f"provision bench: {self.n} volumes, {self.o['repeat']} repeat(s)")
        self.cli_startup()  # first: smallest, least disturbed by page cache churn
        self.prime()
        self.bulk()
        self.server()
        self.scrape()


def summary_rows(res):
    """[(key, label, entry)] for the table; entry is a summarize() dict."""
    rows = []
    p, b, s, c = res.get("prime_day"), res.get("bulk"), res.get("server"), res.get("cli_startup")
    n = res["meta"]["volumes"]
    nl = f"{n:,}"
    if p:
        rows += [("prime_provision", "provision prime-day-2020 (15,424 vols)", p["provision"]),
                 ("prime_noop", "  same plan again (no-op)", p["noop"]),
                 ("prime_dry_run", "  --dry-run", p["dry_run"])]
    if b:
        scaled = "" if n == MILLION else " (target scaled)"
        rows += [("bulk_provision", f"provision {nl} vols, one plan{scaled}", b["provision"]),
                 ("bulk_volume_list", f"  volume list --limit 10 ({nl})", b["volume_list_limit_10"]),
                 ("bulk_volume_show", "  volume show <last>", b["volume_show_last"]),
                 ("bulk_capacity_show", "  capacity show --json", b["capacity_show"])]
    if s:
        rows += [("serve_bulk", f"serve: spawn -> NBD handshake ({nl})", s["bulk"]["startup"]),
                 ("serve_empty", "serve: spawn -> NBD handshake (empty)", s["empty"]["startup"])]
    sc = res.get("scrape")
    if sc:
        rows += [("scrape_0", "metrics scrape, 15,424 vols, 0 attached", sc["attached_0"]),
                 ("scrape_n", f"metrics scrape, {SCRAPE_ATTACHED} attached", sc[f"attached_{SCRAPE_ATTACHED}"])]
    if c:
        rows += [("cli_volume_list_small", f"volume list ({c['small_volumes']} vols)", c["volume_list_small"]),
                 ("cli_import", "python -c 'import blockd.cli'", c["import_blockd_cli"]),
                 ("python_bare", "python -c pass", c["python_bare"])]
    return rows


def misses(res):
    out = [key for key, _, e in summary_rows(res) if e.get("status") == "MISS"]
    c = res.get("cli_startup")
    if c and not c["no_numba_zmq"]:
        out.append("cli_imports_numba_or_zmq")
    return out


def fmt_target(e):
    return "-" if e.get("target") is None else f"{e['target_op']} {e['target']:g} s"


def print_table(res, host=True):
    rows = summary_rows(res)
    if not rows:
        return
    m = res["meta"]
    log()
    log(f"provisioning / control plane: wall time of the whole command, median of {m['repeat']} run(s) "
        f"(control-plane start-up: {m['options']['startup_runs']})")
    hdr = f"{'measurement':<50} {'median':>9} {'min':>8} {'max':>8} {'target':>9}  status"
    log(hdr)
    log("-" * len(hdr))
    for _, label, e in rows:
        log(f"{label:<50} {e['median']:>8.3f}s {e['min']:>7.3f}s {e['max']:>7.3f}s {fmt_target(e):>9}  {e['status']}")
    s, c, b = res.get("server"), res.get("cli_startup"), res.get("bulk")
    n = m["volumes"]
    if s:
        bk, em = s["bulk"], s["empty"]
        log(f"serve peak RSS (VmHWM) after handshake: {bk['vm_hwm_kib'] / 1024:.0f} MiB with {n:,} volumes, "
            f"{em['vm_hwm_kib'] / 1024:.0f} MiB empty ({bk['vm_hwm_after_io_kib'] / 1024:.0f} MiB after the 4 KiB I/O)")
        log(f"attach {res['server']['bulk']['runs'][-1]['round_trip']['export']} by export name: {bk['attach_s'] * 1e3:.1f} ms; "
            f"4 KiB write + read + flush {bk['write_read_flush_s'] * 1e3:.1f} ms, data verified")
    if b:
        log(f"catalog with {n:,} volumes: {b['catalog_bytes'] / 2**20:.0f} MiB on disk; provision peak RSS "
            f"{b['provision_max_rss_kib'] / 1024:.0f} MiB")
    if c:
        bad = {k: v["forbidden"] for k, v in c["imports"].items() if v["forbidden"]}
        log(f"numba/zmq imported by {', '.join(c['imports'])}: "
            f"{'no  PASS' if not bad else 'YES ' + str(bad) + '  MISS'}")
    if host and m.get("loadavg_after"):
        log(f"host: {m['nproc']} CPUs; load average before {m['loadavg_before'][0]:.2f}, after {m['loadavg_after'][0]:.2f}")


def run(opts=None) -> dict:
    """Run the provisioning benchmark. opts: argparse.Namespace, dict (keys as in DEFAULTS) or None.

    Returns the results dict (also with "summary" rows and "misses"); raises BenchError on failure.
    Servers are stopped and the temp dir removed on every exit path.
    """
    try:
        import nbd  # noqa: F401
    except ImportError:
        raise BenchError("python3-libnbd (module nbd) not importable: run `make setup`") from None
    if shutil.which("nbdkit") is None:
        raise BenchError("nbdkit not found: run `make setup`")
    b = ProvisionBench(_options(opts))
    t0 = time.perf_counter()
    try:
        b.run()
    finally:
        bf.cleanup_uninterrupted(b.cleanup)
    res = b.res
    res["meta"]["loadavg_after"] = bf.loadavg()
    res["meta"]["seconds"] = time.perf_counter() - t0
    res["summary"] = [{"key": k, "label": label.strip(), **{f: e[f] for f in ("median", "min", "max", "target", "target_op", "status")}}
                      for k, label, e in summary_rows(res)]
    res["misses"] = misses(res)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(prog="tools/bench_provision.py", description=__doc__.splitlines()[0])
    ap.add_argument("--dir", help="parent of the temp dir (default: $TMPDIR or /tmp)")
    ap.add_argument("--volumes", type=int, help=f"volumes in the generated plan (default {MILLION:,}; {QUICK_VOLUMES:,} with --quick)")
    ap.add_argument("--repeat", type=int, help="runs per measurement, each in a fresh data dir (default 3; 1 with --quick)")
    ap.add_argument("--startup-runs", type=int, help="runs of the control-plane start-up measurements (default 10; 5 with --quick)")
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_VOLUMES:,} volumes, 1 run (targets scaled)")
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (data dirs, server logs)")
    ap.add_argument("--check", action="store_true", help="exit 3 if any target is missed")
    args = ap.parse_args(argv)
    return bf.main_tail("provision bench", args, run, print_table, "missed")


if __name__ == "__main__":
    sys.exit(main())
