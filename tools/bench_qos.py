#!/usr/bin/env python3
"""QoS benchmark for blockd: achieved vs configured rates of EBS-style volume types.

    python tools/bench_qos.py [--runtime S] [--repeat N] [--ref-runtime S] [--quick]
                              [--region SIZE] [--no-fill] [--threads N] [--dir DIR]
                              [--json PATH] [--keep] [--check]

One `blockd serve --listen unix:SOCK` over a fresh data dir with six volumes:
gp3 100 GiB (3,000 IOPS, 125 MiB/s), gp3 100 GiB --iops 6000, gp2 100 GiB
(full burst bucket), gp2 100 GiB --initial-credits 0%, st1 1 TiB (burst
250 MiB/s, baseline 40 MiB/s, 500 IOPS) and raw 100 GiB (unthrottled).
  1. fill: fio writes the first --region bytes of every volume sequentially
     (1 MiB, iodepth 8), so the reads hit data rather than holes;
  2. rounds: every case below runs once per round (--repeat rounds, fio
     ioengine=nbd, time based, JSON output), each within the filled region:

     case                     fio                    compared with
     gp3 randread-4k          randread 4k QD32       IOPS vs 3,000
     gp3 seqread-1m           read 1M QD8            MiB/s vs 125
     gp3-6000 randread-4k     randread 4k QD32       IOPS vs 6,000
     gp2 burst randread-4k    randread 4k QD32       IOPS vs 3,000 (burst, full bucket)
     gp2 drained randread-4k  randread 4k QD32       IOPS vs 300 (baseline; set-credits 0% first)
     st1 randread-4k          randread 4k QD32       IOPS vs 250 (a random 4 KiB read costs 1 MiB)
     st1 seqread-1m           read 1M QD8            MiB/s vs 250
     raw randread-4k, raw seqread-1m (--ref-runtime): the unthrottled reference

     The configured figure comes from `volume show --json` (limits) and is
     checked against the figure above.  A libnbd connection holds the volume
     attached around each fio run, so `volume show --json` after the run still
     has qos_stats for that run (throttled_seconds) and its burst_balance.
  3. ratio = median achieved / configured; "within 5%" is the goal, and only
     applies when the raw volume is faster than the limit.  A full bucket
     admits 50 ms of rate (or one 32 MiB request, whichever is more) at once
     at the start of a run: the table shows that ceiling ("max") per case,
     and "steady": the rate the server admitted between two samples of
     qos_stats taken during the run (1 s in, 0.3 s before the end).
Prints a table and writes JSON with --json.  tools/bench imports run() and
print_table() (see docs/benchmarks.md, "QoS benchmark").
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
import threading
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "tools")
sys.path.insert(0, TOOLS)
sys.path.insert(0, ROOT)
import bench_fio as bf  # noqa: E402
from bench_fio import KiB, MiB, BenchError  # noqa: E402

from blockd import qos as _qos  # noqa: E402  (bucket depth constants, read only)

TOLERANCE = 0.05  # "within 5% of the configured limit"
FIO_STARTUP = 0.2  # seconds from spawning fio to its first I/O (nbd connect), roughly

# volume name -> `blockd volume create` arguments
VOLUMES = {
    "gp3": ["--size", "100GiB", "--type", "gp3"],
    "gp3-6000": ["--size", "100GiB", "--type", "gp3", "--iops", "6000"],
    "gp2": ["--size", "100GiB", "--type", "gp2"],
    "gp2-drained": ["--size", "100GiB", "--type", "gp2", "--initial-credits", "0%"],
    "st1": ["--size", "1TiB", "--type", "st1"],
    "raw": ["--size", "100GiB"],
}


@dataclass(frozen=True)
class Case:
    name: str
    volume: str
    rw: str
    bs: int
    iodepth: int
    metric: str  # "iops" or "mibps"
    limit: str  # how the configured figure follows from `volume show --json` limits
    expected: float  # the figure the brief (docs/volume-types.md) gives
    drain: bool = False  # `volume set-credits VOLUME 0%` right before the run

    def configured(self, lim):
        if self.limit == "iops":
            return lim["iops"]
        if self.limit == "baseline_iops":
            return lim["baseline_iops"]
        if self.limit == "mibps":
            return lim["throughput_mibps"]
        if self.limit == "hdd_random_iops":  # every random request pays at least 1 MiB of throughput
            return min(lim["iops"], lim["throughput_mibps"] * MiB / _qos.HDD_UNIT)
        raise ValueError(self.limit)

    def burst_seconds(self, configured):
        """Seconds of rate a full bucket admits at once at the start of a run (the limiting bucket's depth)."""
        if self.drain:
            # the credit bucket is emptied right before the run, but refills at the baseline until fio's
            # first I/O (the CLI's exit, fio's start and NBD connect): not known here
            return None
        if self.limit == "iops":  # SSD operations bucket
            return max(_qos.BURST_SECONDS, (_qos.MAX_REQUEST / _qos.SSD_UNIT) / configured)
        # bytes bucket (MiB/s, or HDD random I/O charged 1 MiB each)
        rate = configured * MiB if self.metric == "mibps" else configured * _qos.HDD_UNIT
        return max(_qos.BURST_SECONDS, _qos.MAX_REQUEST / rate)


CASES = (
    Case("gp3 randread-4k", "gp3", "randread", 4 * KiB, 32, "iops", "iops", 3000),
    Case("gp3 seqread-1m", "gp3", "read", MiB, 8, "mibps", "mibps", 125),
    Case("gp3-6000 randread-4k", "gp3-6000", "randread", 4 * KiB, 32, "iops", "iops", 6000),
    Case("gp2 burst randread-4k", "gp2", "randread", 4 * KiB, 32, "iops", "iops", 3000),
    Case("gp2 drained randread-4k", "gp2-drained", "randread", 4 * KiB, 32, "iops", "baseline_iops", 300, drain=True),
    Case("st1 randread-4k", "st1", "randread", 4 * KiB, 32, "iops", "hdd_random_iops", 250),
    Case("st1 seqread-1m", "st1", "read", MiB, 8, "mibps", "mibps", 250),
)
# the unthrottled reference: what the machine does without a limit
REFERENCE = (
    Case("raw randread-4k", "raw", "randread", 4 * KiB, 32, "iops", "", 0),
    Case("raw seqread-1m", "raw", "read", MiB, 8, "mibps", "", 0),
)

DEFAULTS = {"dir": None, "quick": False, "runtime": None, "repeat": None, "ref_runtime": None, "region": 64 * MiB,
            "fill": True, "threads": None, "keep": False, "json": None, "check": False}


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


def parse_size(text):
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(i?B)?\s*", str(text), re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (e.g. 128MiB)")
    return int(m.group(1)) << (10 * " KMGT".index(m.group(2).upper() or " "))


def fmt(v, spec):
    return format(v, spec) if v is not None else "-"


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
    if o["ref_runtime"] is None:
        o["ref_runtime"] = min(2, o["runtime"])
    if o["runtime"] < 1 or o["repeat"] < 1 or o["ref_runtime"] < 1:
        raise BenchError("--runtime, --repeat and --ref-runtime must be >= 1")
    if o["region"] < MiB or o["region"] % MiB:
        raise BenchError("--region must be a whole number of MiB")
    return o


Holder = bf.Holder  # keeps a volume attached: its QoS counters live while attached


# ---- the benchmark ---------------------------------------------------------------------
class QosBench:
    def __init__(self, o):
        self.o = o
        self.tmp = None
        self.sockdir = None
        self.server = None
        self.holders = []
        self.fio_seq = 0
        self.res = {
            "meta": {
                "timestamp": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                "options": {k: v for k, v in o.items()},
                "nproc": os.cpu_count(),
                "fio": bf.fio_version(),
                "loadavg_before": bf.loadavg(),
                "tolerance": TOLERANCE,
            },
            "volumes": {},
            "cases": {},
            "reference": {},
        }

    # -- setup / teardown --
    def make_dirs(self):
        parent = self.o["dir"] or tempfile.gettempdir()
        os.makedirs(parent, exist_ok=True)
        self.tmp = tempfile.mkdtemp(prefix="blockd-qos-", dir=parent)
        self.data_dir = os.path.join(self.tmp, "data")
        self.fio_dir = os.path.join(self.tmp, "fio")
        os.makedirs(self.fio_dir)
        if len(os.path.join(self.tmp, "blockd.sock")) > 100:  # unix socket paths are limited to 107 bytes
            self.sockdir = tempfile.mkdtemp(prefix="bq-", dir="/tmp")
        self.sock = os.path.join(self.sockdir or self.tmp, "blockd.sock")
        mnt, fstype, src = bf.fs_type(self.tmp)
        self.res["meta"]["temp_dir"] = self.tmp
        self.res["meta"]["filesystem"] = {"mount": mnt, "type": fstype, "source": src}
        log(f"qos bench: temp dir {self.tmp} (filesystem {fstype})")

    def cleanup(self):
        for h in self.holders:
            h.close()
        self.holders = []
        if self.server is not None:
            try:
                rc = self.server.stop()
                if rc not in (0, None, -signal.SIGTERM):
                    self.res.setdefault("warnings", []).append(
                        f"blockd serve exited with status {rc}\n{self.server.log_tail()}")
            except Exception as exc:
                log(f"qos bench: stopping blockd serve: {exc}")
            self.server = None
        for d in (self.sockdir, None if self.o["keep"] else self.tmp):
            if d and os.path.isdir(d):
                shutil.rmtree(d, ignore_errors=True)
        if self.tmp:
            log(f"qos bench: kept {self.tmp}" if self.o["keep"] else f"qos bench: removed {self.tmp}")

    def cli(self, *args):
        argv = blockd_cli() + ["--data-dir", self.data_dir, *args]
        p = subprocess.run(argv, capture_output=True, text=True)
        if p.returncode != 0:
            raise BenchError(f"{' '.join(argv)} failed ({p.returncode}): {p.stderr.strip()[-2000:]}")
        return p.stdout

    def show(self, name):
        return json.loads(self.cli("volume", "show", name, "--json"))

    def uri(self, name):
        return f"nbd+unix:///{name}?socket={self.sock}"

    def create_volumes(self):
        for name, args in VOLUMES.items():
            self.cli("volume", "create", name, *args)
            self.res["volumes"][name] = {"create": args}

    def start_server(self):
        argv = blockd_cli() + ["--data-dir", self.data_dir, "serve", "--listen", "unix:" + self.sock]
        if self.o["threads"] is not None:
            argv += ["--threads", str(self.o["threads"])]
        # the probe URI names a volume: readiness means exports resolve, not only that the socket listens
        srv = bf.Server("blockd", argv, self.uri("raw"), self.sock, os.path.join(self.tmp, "blockd-serve.log"))
        self.server = srv
        srv.start()
        self.res["meta"]["blockd"] = {"cmdline": srv.cmdline(), "startup_s": srv.startup_seconds}

    def fio(self, name, label, rw, bs, iodepth, runtime):
        self.fio_seq += 1
        out = os.path.join(self.fio_dir, f"{self.fio_seq:03d}-{name}-{label.replace(' ', '_')}.json")
        r = bf.run_fio(self.uri(name), label.replace(" ", "_"), rw, bs, iodepth, self.o["region"], runtime, out,
                       server=self.server)
        r["mibps"] = r["mbps"] * 1e6 / MiB
        return r

    def fill(self):
        region = self.o["region"]
        fill = {}
        for name in VOLUMES:
            r = self.fio(name, "fill", "write", MiB, 8, None)
            fill[name] = {"mibps": r["mibps"], "seconds": r["wall_s"]}
        log(f"fill {region >> 20} MiB per volume: " +
            ", ".join(f"{n} {f['mibps']:.0f} MiB/s" for n, f in fill.items()))
        self.res["fill"] = fill

    def limits(self):
        for name in VOLUMES:
            info = self.show(name)
            self.res["volumes"][name]["limits"] = info["limits"]
        for c in CASES:
            conf = c.configured(self.res["volumes"][c.volume]["limits"])
            if conf is None or abs(conf - c.expected) > 1e-9 * c.expected:
                self.res.setdefault("warnings", []).append(
                    f"{c.name}: configured {conf} from volume show, expected {c.expected}")

    def one(self, case, runtime):
        """One fio run with the volume held attached; returns the fio result plus the volume's QoS counters."""
        holder = Holder(self.uri(case.volume))
        self.holders.append(holder)
        try:
            if case.drain:
                self.cli("volume", "set-credits", case.volume, "0%")
            if case.volume == "raw":
                r, samples = self.fio(case.volume, case.name, case.rw, case.bs, case.iodepth, runtime), []
            else:
                r, samples = self.fio_sampled(case, runtime)
            info = self.show(case.volume)
        finally:
            holder.close()
            self.holders.remove(holder)
        st = info.get("qos_stats") or {}
        r["qos_stats"] = st
        r["throttled_seconds"] = st.get("throttled_seconds")
        r["burst_balance"] = info.get("burst_balance")
        r["value"] = r[case.metric]
        if len(samples) == 2:
            (ta, a), (tb, b) = samples
            key, unit = ("requests", 1) if case.metric == "iops" else ("bytes", MiB)
            if a.get(key) is not None and b.get(key) is not None and tb > ta:
                r["steady"] = {"window_s": tb - ta, "value": (b[key] - a[key]) / unit / (tb - ta)}
        return r

    def fio_sampled(self, case, runtime):
        """fio in a thread; meanwhile two `volume show --json` samples of the server's admission counters,
        1 s after fio starts and 0.3 s before it ends: the admitted rate in steady state, without the start
        burst or fio's start-up and wind-down.  A sample's time is when the CLI exits: it asks the server
        after its imports (whose time varies with load), and exiting takes about as long each time, so
        that lag cancels in the difference."""
        out = {}

        def target():
            try:
                out["r"] = self.fio(case.volume, case.name, case.rw, case.bs, case.iodepth, runtime)
            except BaseException as exc:  # re-raised below, in the main thread
                out["exc"] = exc

        t = threading.Thread(target=target, name="fio", daemon=True)
        t0 = time.monotonic()
        t.start()
        samples = []
        when = (t0 + 1.0, t0 + FIO_STARTUP + runtime - 0.3)
        for at in when if when[1] - when[0] >= 0.5 else ():  # runs under ~2 s: no steady figure
            time.sleep(max(0.0, at - time.monotonic()))
            if not t.is_alive():
                break
            try:
                st = self.show(case.volume).get("qos_stats") or {}
            except BenchError:
                break  # best effort: the fio result below is what counts
            samples.append((time.monotonic(), st))
        t.join()
        if "exc" in out:
            raise out["exc"]
        return out["r"], samples if len(samples) == 2 else []

    def rounds(self):
        o = self.o
        cases, ref = self.res["cases"], self.res["reference"]
        for c in REFERENCE:
            ref[c.name] = {"volume": c.volume, "rw": c.rw, "bs": c.bs, "iodepth": c.iodepth,
                           "runtime": o["ref_runtime"], "runs": []}
        for c in CASES:
            lim = self.res["volumes"][c.volume]["limits"]
            conf = c.configured(lim)
            cases[c.name] = {"volume": c.volume, "type": VOLUMES[c.volume], "rw": c.rw, "bs": c.bs,
                             "iodepth": c.iodepth, "metric": c.metric, "configured": conf, "expected": c.expected,
                             "runtime": o["runtime"], "burst_s": c.burst_seconds(conf), "runs": []}
            burst = cases[c.name]["burst_s"]
            cases[c.name]["max_ratio"] = 1 + burst / o["runtime"] if burst is not None else None
        for rnd in range(o["repeat"]):
            tag = f"[round {rnd + 1}/{o['repeat']}]"
            for c in REFERENCE:  # first: the machine's capability, in the same conditions as this round
                r = self.one(c, o["ref_runtime"])
                r["round"] = rnd + 1
                ref[c.name]["runs"].append(r)
                log(f"{tag} {c.name:<24} {r['iops']:9.0f} IOPS {r['mibps']:8.1f} MiB/s  unthrottled  "
                    f"srv cpu {r.get('server_cpu_pct', 0):3.0f}%")
            for c in CASES:
                e = cases[c.name]
                r = self.one(c, o["runtime"])
                r["round"] = rnd + 1
                r["ratio"] = r["value"] / e["configured"]
                e["runs"].append(r)
                unit = "IOPS " if c.metric == "iops" else "MiB/s"
                steady = r.get("steady", {}).get("value")
                log(f"{tag} {c.name:<24} {r['value']:9.1f} {unit} vs {e['configured']:g} = {r['ratio']:.3f} "
                    f"(steady {fmt(steady / e['configured'] if steady is not None else None, '.3f')})  "
                    f"throttled {fmt(r['throttled_seconds'], '.1f')} s  burst balance {fmt(r['burst_balance'], '.1f')}%  "
                    f"srv cpu {r.get('server_cpu_pct', 0):3.0f}%")

    def summarize(self):
        ref = self.res["reference"]
        for e in ref.values():
            e["iops"] = median([r["iops"] for r in e["runs"]])
            e["mibps"] = median([r["mibps"] for r in e["runs"]])
        ref_for = {"iops": ref["raw randread-4k"]["iops"], "mibps": ref["raw seqread-1m"]["mibps"]}
        for e in self.res["cases"].values():
            e["achieved"] = median([r["value"] for r in e["runs"]])
            e["ratio"] = e["achieved"] / e["configured"] if e["achieved"] is not None else None
            e["steady"] = median([r.get("steady", {}).get("value") for r in e["runs"]])
            e["steady_ratio"] = e["steady"] / e["configured"] if e["steady"] is not None else None
            e["throttled_seconds"] = median([r["throttled_seconds"] for r in e["runs"]])
            e["burst_balance"] = e["runs"][-1]["burst_balance"] if e["runs"] else None
            e["server_cpu_pct"] = median([r.get("server_cpu_pct") for r in e["runs"]])
            e["unthrottled"] = ref_for[e["metric"]]
            e["status"] = status_for(e)


def status_for(e):
    ratio = e.get("ratio")
    if ratio is None:
        return "n/a"
    if e.get("unthrottled") is not None and e["unthrottled"] < e["configured"] * (1 + TOLERANCE):
        return "n/a (raw slower)"  # the machine cannot reach the limit: the 5% goal does not apply
    if abs(ratio - 1) <= TOLERANCE:
        return "within 5%"
    return "MISS high" if ratio > 1 else "MISS low"


def misses(res):
    return [name for name, e in res.get("cases", {}).items() if str(e.get("status", "")).startswith("MISS")]


def print_table(res, host=True):
    cases = {n: e for n, e in (res.get("cases") or {}).items() if e.get("ratio") is not None}
    if not cases:
        return
    o = res["meta"]["options"]
    log()
    log(f"QoS: achieved vs configured, median of {o['repeat']} run(s) of {o['runtime']} s "
        f"(fio 4k randread QD32 / 1M seq read QD8)")
    log("ratio: fio's rate / configured; max: 1 + a full bucket's start burst / runtime; steady: the server's "
        "admitted rate from 1 s in to 0.3 s before the end / configured")
    hdr = (f"{'case':<24} {'metric':<6} {'configured':>10} {'achieved':>9} {'ratio':>6} {'max':>6} {'steady':>6}  {'status':<16} "
           f"{'throttled s':>11} {'burst bal':>9}")
    log(hdr)
    log("-" * len(hdr))
    for name, e in cases.items():
        unit = "IOPS" if e["metric"] == "iops" else "MiB/s"
        log(f"{name:<24} {unit:<6} {e['configured']:>10g} {e['achieved']:>9.1f} {e['ratio']:>6.3f} "
            f"{fmt(e['max_ratio'], '.3f'):>6} {fmt(e.get('steady_ratio'), '.3f'):>6}  {e['status']:<16} "
            f"{fmt(e['throttled_seconds'], '.1f'):>11} "
            f"{fmt(e['burst_balance'], '.1f'):>8}%")
    ref = res.get("reference") or {}
    rr, rs = ref.get("raw randread-4k", {}), ref.get("raw seqread-1m", {})
    if rr.get("iops") is not None and rs.get("mibps") is not None:
        log(f"unthrottled (raw volume, {o['ref_runtime']} s runs): 4k randread {rr['iops']:.0f} IOPS "
            f"({rr['mibps']:.1f} MiB/s); 1M seq read {rs['mibps']:.0f} MiB/s ({rs['iops']:.0f} IOPS)")
    for w in res.get("warnings", []):
        log(f"warning: {w}")
    m = res["meta"]
    if host and m.get("loadavg_after"):
        log(f"host: {m['nproc']} CPUs; load average before {m['loadavg_before'][0]:.2f}, "
            f"after {m['loadavg_after'][0]:.2f}")


def run(opts=None) -> dict:
    """Run the QoS benchmark. opts: argparse.Namespace, dict (keys as in DEFAULTS) or None.

    Returns the results dict (with "summary" rows and "misses"); raises BenchError on failure.
    The server is stopped and the temp dir removed on every exit path.
    """
    for tool in ("fio", "nbdkit"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} not found: run `make setup`")
    try:
        import nbd  # noqa: F401
    except ImportError:
        raise BenchError("python3-libnbd (module nbd) not importable: run `make setup`") from None
    b = QosBench(_options(opts))
    o = b.o
    t0 = time.perf_counter()
    log(f"QoS benchmark: {len(CASES)} cases + {len(REFERENCE)} unthrottled, {o['repeat']} round(s) of "
        f"{o['runtime']} s (reference {o['ref_runtime']} s)")
    try:
        b.make_dirs()
        b.create_volumes()
        b.start_server()
        if o["fill"]:
            b.fill()
        b.limits()
        b.rounds()
        b.summarize()
    finally:
        bf.cleanup_uninterrupted(b.cleanup)
    res = b.res
    res["meta"]["loadavg_after"] = bf.loadavg()
    res["meta"]["seconds"] = time.perf_counter() - t0
    res["summary"] = [{"case": n, **{k: e.get(k) for k in ("metric", "configured", "achieved", "ratio", "max_ratio",
                                                          "steady_ratio", "status", "throttled_seconds",
                                                          "burst_balance")}}
                      for n, e in res["cases"].items()]
    res["misses"] = misses(res)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(prog="tools/bench_qos.py", description=__doc__.splitlines()[0])
    ap.add_argument("--dir", help="parent of the temp dir (default: $TMPDIR or /tmp)")
    ap.add_argument("--runtime", type=int, help="seconds per throttled fio run (default 10; 3 with --quick)")
    ap.add_argument("--repeat", type=int, help="rounds, each running every case once (default 3; 1 with --quick)")
    ap.add_argument("--ref-runtime", type=int, help="seconds per unthrottled reference run (default min(2, --runtime))")
    ap.add_argument("--quick", action="store_true", help="smoke test: 3 s runs, 1 round")
    ap.add_argument("--region", type=parse_size, default=DEFAULTS["region"],
                    help="region filled first and read by every run (default 64MiB)")
    ap.add_argument("--fill", action=argparse.BooleanOptionalAction, default=True,
                    help="write the region of every volume before the runs (default: on; off reads holes)")
    ap.add_argument("--threads", type=int, help="blockd serve --threads (default: blockd's default)")
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (server log, raw fio JSON)")
    ap.add_argument("--check", action="store_true", help="exit 3 if a ratio misses the 5%% goal")
    args = ap.parse_args(argv)
    return bf.main_tail("qos bench", args, run, print_table, "missed (not within 5%)")


if __name__ == "__main__":
    sys.exit(main())
