"""Prometheus metrics: cheap counting on the request path, everything else at scrape time.

The request path only touches per-thread counters (no lock, no prometheus
objects): each nbdkit worker thread owns a ``_ThreadStats`` and increments
plain Python lists in it.  A scrape sums every thread's counters and reads
gauges (capacity, allocation, burst balance, connections) from the engine,
the catalog and the data dir at that moment.

Label cardinality stays bounded: per-volume series exist only for volumes
opened since the server started (not for every provisioned volume), and
latency histograms are per operation only, never per volume.

Names (units in the name) are listed in ``METRIC_NAMES``; the Grafana
dashboard and alert rules under tools/ use exactly these (a test checks).
"""

import bisect
import errno as errno_mod
import os
import platform
import threading
import time

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, InfoMetricFamily
from prometheus_client.process_collector import ProcessCollector

from . import __version__
from .errors import BlockdError
from .serveinfo import serve_pid, serve_restarts

OPS = ("read", "write", "flush", "trim", "zero", "cache", "block_status")
# 50 us .. 5 s: a cached 4 KiB read is ~30 us, a throttled or fsync'd one seconds.
LATENCY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0)
DEFAULT_METRICS_PORT = 9810

METRIC_NAMES = (
    "blockd_build_info",
    "blockd_requests_total",
    "blockd_request_bytes_total",
    "blockd_request_errors_total",
    "blockd_requests_in_flight",
    "blockd_request_duration_seconds",
    "blockd_pool_logical_limit_bytes",
    "blockd_pool_logical_provisioned_bytes",
    "blockd_pool_physical_size_bytes",
    "blockd_pool_physical_used_bytes",
    "blockd_pool_physical_available_bytes",
    "blockd_pool_overcommit_ratio",
    "blockd_pool_volumes",
    "blockd_volume_size_bytes",
    "blockd_volume_allocated_bytes",
    "blockd_volume_connections",
    "blockd_volumes_attached",
    "blockd_checksum_errors_total",
    "blockd_read_repairs_total",
    "blockd_scrub_scanned_bytes_total",
    "blockd_scrub_corrupt_blocks_total",
    "blockd_scrubs_running",
    "blockd_volume_burst_balance_percent",
    "blockd_volume_iops_limit",
    "blockd_volume_throughput_limit_bytes_per_second",
    "blockd_volume_throttled_seconds_total",
    "blockd_volume_throttled_requests_total",
    "blockd_volume_iops_exceeded_total",
    "blockd_volume_throughput_exceeded_total",
    "blockd_volume_consumed_ops_total",
    "blockd_volume_min_copies",
    "blockd_volume_fenced",
    "blockd_replica_in_sync",
    "blockd_replica_state",
    "blockd_replica_resync_remaining_bytes",
    "blockd_replica_resynced_bytes_total",
    "blockd_peer_connected",
    "blockd_peer_pending_messages",
    "blockd_peer_acks_total",
    "blockd_peer_ack_seconds_total",
    "blockd_peer_failures_total",
    "blockd_peer_sent_bytes_total",
    "blockd_sink_refused_total",
    "blockd_sink_applied_total",
)
REPLICATION_PREFIXES = ("blockd_replica_", "blockd_peer_", "blockd_sink_", "blockd_volume_min_copies",
                        "blockd_volume_fenced")


class _ThreadStats:
    """One worker thread's counters; only that thread writes them."""

    __slots__ = ("counts", "errors", "hist")

    def __init__(self):
        self.counts = {}  # (volume id, op) -> [requests, bytes, in flight]
        self.errors = {}  # (volume id, op, errno name) -> count
        self.hist = {op: [0] * (len(LATENCY_BUCKETS) + 2) for op in OPS}  # per-bucket counts, +Inf, sum


def _nbytes_read(args):
    return len(args[0])


def _nbytes_range(args):
    return args[1]


def _nbytes_none(args):
    return 0


# op -> how many bytes a call covers, from its arguments (see nbd_adapter.Export)
_SIZE_OF = {
    "read": _nbytes_read, "write": _nbytes_read, "trim": _nbytes_range, "zero": _nbytes_range,
    "cache": _nbytes_range, "block_status": _nbytes_range, "flush": _nbytes_none,
}


class Metrics:
    """Per-request counting (``wrap``), volume events, and the scrape-time collector."""

    def __init__(self, engine=None):
        self.engine = engine
        self._by_thread = {}  # OS thread id -> _ThreadStats
        self._threads = []
        self._lock = threading.Lock()
        self.names = {}  # volume id -> name, for every volume opened since start
        self.checksum_errors = {}  # volume id -> blocks
        self.read_repairs = {}  # volume id -> blocks
        self.scrub_scanned = {}  # volume id -> bytes
        self.scrub_corrupt = {}  # volume id -> blocks
        self.scrubs_running = 0
        self._http = None

    # ---- the request path -------------------------------------------------------
    def _mine(self):
        # Keyed by the OS thread, not threading.local: a thread-local lives as long as a Python
        # thread state, and nbdkit makes a fresh one per callback unless blockd.pythreads keeps it
        # (the plugin does; code that calls in some other way may not).
        ident = threading.get_ident()
        stats = self._by_thread.get(ident)
        if stats is None:
            with self._lock:
                stats = self._by_thread.get(ident)
                if stats is None:
                    stats = _ThreadStats()
                    self._by_thread[ident] = stats
                    self._threads.append(stats)
        return stats

    def wrap(self, volume, op, fn):
        """``fn`` counted: requests, bytes, errors by errno, in-flight, latency."""
        key = (volume.volume_id, op)
        self.names[volume.volume_id] = volume.name
        size_of = _SIZE_OF[op]
        mine = self._mine
        perf = time.perf_counter
        bounds = LATENCY_BUCKETS
        where = bisect.bisect_left
        inf = len(LATENCY_BUCKETS)

        def counted(*args):
            stats = mine()
            c = stats.counts.get(key)
            if c is None:
                c = stats.counts[key] = [0, 0, 0]
            c[2] += 1
            t0 = perf()
            try:
                return fn(*args)
            except Exception as exc:
                code = exc.errno if isinstance(exc, BlockdError) else getattr(exc, "errno", None) or errno_mod.EIO
                ekey = (volume.volume_id, op, errno_mod.errorcode.get(code, str(code)))
                stats.errors[ekey] = stats.errors.get(ekey, 0) + 1
                raise
            finally:
                dt = perf() - t0
                c[0] += 1
                c[1] += size_of(args)
                c[2] -= 1
                h = stats.hist[op]
                h[where(bounds, dt) if dt <= bounds[-1] else inf] += 1
                h[-1] += dt

        return counted

    # ---- volume events (the engine's events interface) ----------------------------
    def checksum_error(self, volume, offsets):
        self.names[volume.volume_id] = volume.name
        with self._lock:
            self.checksum_errors[volume.volume_id] = self.checksum_errors.get(volume.volume_id, 0) + len(offsets)

    def read_repair(self, volume, blocks):
        with self._lock:
            self.read_repairs[volume.volume_id] = self.read_repairs.get(volume.volume_id, 0) + blocks

    def scrub_started(self, volume):
        self.names[volume.volume_id] = volume.name
        with self._lock:
            self.scrubs_running += 1

    def scrub_progress(self, volume, nbytes):
        with self._lock:
            self.scrub_scanned[volume.volume_id] = self.scrub_scanned.get(volume.volume_id, 0) + nbytes

    def scrub_finished(self, volume, corrupt):
        with self._lock:
            self.scrubs_running -= 1
            self.scrub_corrupt[volume.volume_id] = self.scrub_corrupt.get(volume.volume_id, 0) + corrupt

    # ---- HTTP ------------------------------------------------------------------------
    def serve(self, host, port):
        """Start the /metrics endpoint (a daemon thread); call after nbdkit forks."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(self))
        registry.register(ProcessCollector(registry=None))
        self._http = start_http_server(port, addr=host, registry=registry)
        return self

    # ---- scrape ---------------------------------------------------------------------
    def collect(self):
        with self._lock:
            threads = list(self._threads)
        counts = {}
        errors = {}
        hist = {op: [0] * (len(LATENCY_BUCKETS) + 2) for op in OPS}
        for t in threads:
            for key, c in list(t.counts.items()):
                acc = counts.setdefault(key, [0, 0, 0])
                acc[0] += c[0]
                acc[1] += c[1]
                acc[2] += c[2]
            for key, n in list(t.errors.items()):
                errors[key] = errors.get(key, 0) + n
            for op, h in t.hist.items():
                acc = hist[op]
                for i, v in enumerate(list(h)):
                    acc[i] += v
        name = self.names.get

        yield InfoMetricFamily(
            "blockd_build", "blockd version and runtime",
            value={"version": __version__, "python": platform.python_version(), "pid": str(serve_pid()),
                   "nbdkit_pid": str(os.getpid())},
        )
        yield CounterMetricFamily("blockd_server_restarts", "times blockd serve restarted a crashed nbdkit",
                                  value=serve_restarts())
        req = CounterMetricFamily("blockd_requests", "NBD requests completed", labels=["volume", "op"])
        nbytes = CounterMetricFamily("blockd_request_bytes", "bytes covered by completed requests",
                                     labels=["volume", "op"])
        flight = GaugeMetricFamily("blockd_requests_in_flight", "requests being served now", labels=["volume", "op"])
        for (vid, op), (n, b, f) in sorted(counts.items()):
            vol = name(vid, str(vid))
            req.add_metric([vol, op], n)
            nbytes.add_metric([vol, op], b)
            flight.add_metric([vol, op], max(0, f))
        yield req
        yield nbytes
        yield flight
        err = CounterMetricFamily("blockd_request_errors", "failed requests by errno",
                                  labels=["volume", "op", "errno"])
        for (vid, op, code), n in sorted(errors.items()):
            err.add_metric([name(vid, str(vid)), op, code], n)
        yield err
        lat = HistogramMetricFamily("blockd_request_duration_seconds", "request latency, including QoS waits",
                                    labels=["op"])
        for op in OPS:
            h = hist[op]
            cumulative = 0
            buckets = []
            for bound, v in zip(LATENCY_BUCKETS, h):
                cumulative += v
                buckets.append((repr(bound), cumulative))
            cumulative += h[len(LATENCY_BUCKETS)]
            buckets.append(("+Inf", cumulative))
            lat.add_metric([op], buckets, sum_value=h[-1])
        yield lat
        yield from self._collect_integrity()
        if self.engine is not None:
            yield from self._collect_engine()

    def _collect_integrity(self):
        name = self.names.get
        with self._lock:
            ce = dict(self.checksum_errors)
            scanned = dict(self.scrub_scanned)
            corrupt = dict(self.scrub_corrupt)
            running = self.scrubs_running
        fam = CounterMetricFamily("blockd_checksum_errors", "blocks whose data did not match their checksum",
                                  labels=["volume"])
        for vid in sorted(set(ce) | set(self.names)):
            fam.add_metric([name(vid, str(vid))], ce.get(vid, 0))
        yield fam
        with self._lock:
            repairs = dict(self.read_repairs)
        fam = CounterMetricFamily("blockd_read_repairs", "blocks read back correct from a replica and rewritten",
                                  labels=["volume"])
        for vid in sorted(set(self.names) | set(repairs)):
            fam.add_metric([name(vid, str(vid))], repairs.get(vid, 0))
        yield fam
        fam = CounterMetricFamily("blockd_scrub_scanned_bytes", "bytes verified by scrubs", labels=["volume"])
        for vid, n in sorted(scanned.items()):
            fam.add_metric([name(vid, str(vid))], n)
        yield fam
        fam = CounterMetricFamily("blockd_scrub_corrupt_blocks", "corrupt blocks found by scrubs", labels=["volume"])
        for vid, n in sorted(corrupt.items()):
            fam.add_metric([name(vid, str(vid))], n)
        yield fam
        yield GaugeMetricFamily("blockd_scrubs_running", "scrubs in progress", value=running)

    def _collect_engine(self):
        engine = self.engine
        datadir = engine.datadir
        try:
            pool = engine.catalog.pool()
        except Exception:
            pool = None
        try:
            phys = datadir.physical()
        except OSError:
            phys = None
        if pool is not None:
            provisioned = pool["provisioned"]
            limit = pool["logical_limit"] if pool["logical_limit"] is not None else provisioned
            yield GaugeMetricFamily("blockd_pool_logical_limit_bytes", "logical capacity limit (provisioned if unset)",
                                    value=limit)
            yield GaugeMetricFamily("blockd_pool_logical_provisioned_bytes", "sum of volume sizes", value=provisioned)
            yield GaugeMetricFamily("blockd_pool_volumes", "provisioned volumes", value=pool["volumes"])
        if phys is not None:
            yield GaugeMetricFamily("blockd_pool_physical_size_bytes", "filesystem under the data dir",
                                    value=phys["size"])
            yield GaugeMetricFamily("blockd_pool_physical_used_bytes", "bytes the data dir uses", value=phys["used"])
            yield GaugeMetricFamily("blockd_pool_physical_available_bytes", "bytes that can still be written",
                                    value=phys["available"])
            if pool is not None and phys["size"]:
                yield GaugeMetricFamily("blockd_pool_overcommit_ratio", "logical provisioned / physical size",
                                        value=pool["provisioned"] / phys["size"])
        size = GaugeMetricFamily("blockd_volume_size_bytes", "size of an attached volume", labels=["volume"])
        alloc = GaugeMetricFamily("blockd_volume_allocated_bytes", "disk used by an attached volume",
                                  labels=["volume"])
        conns = GaugeMetricFamily("blockd_volume_connections", "NBD connections to a volume", labels=["volume"])
        burst = GaugeMetricFamily("blockd_volume_burst_balance_percent", "EBS BurstBalance: credit bucket left",
                                  labels=["volume"])
        iops = GaugeMetricFamily("blockd_volume_iops_limit", "current IOPS ceiling", labels=["volume"])
        tput = GaugeMetricFamily("blockd_volume_throughput_limit_bytes_per_second", "current throughput ceiling",
                                 labels=["volume"])
        thr_s = CounterMetricFamily("blockd_volume_throttled_seconds", "time requests waited for QoS tokens",
                                    labels=["volume"])
        thr_n = CounterMetricFamily("blockd_volume_throttled_requests", "requests that waited for QoS tokens",
                                    labels=["volume"])
        iops_x = CounterMetricFamily("blockd_volume_iops_exceeded", "requests held back by the IOPS limit",
                                     labels=["volume"])
        tput_x = CounterMetricFamily("blockd_volume_throughput_exceeded", "requests held back by the throughput limit",
                                     labels=["volume"])
        ops = CounterMetricFamily("blockd_volume_consumed_ops", "operations as EBS counts them (256 KiB / 1 MiB units)",
                                  labels=["volume"])
        attached = engine.attached()
        for volume in engine.open_volumes():
            label = [volume.name]
            self.names.setdefault(volume.volume_id, volume.name)
            size.add_metric(label, volume.size)
            alloc.add_metric(label, datadir.allocated_bytes(volume.volume_id))
            conns.add_metric(label, attached.get(volume.name, 0))
            q = volume.qos
            if q is None:
                burst.add_metric(label, 100.0)
                continue
            snap = q.snapshot()
            st = snap["stats"]
            prof = snap["profile"]
            burst.add_metric(label, snap["burst_balance"])
            if prof["iops"]:
                iops.add_metric(label, prof["iops"])
            if prof["bytes_per_second"]:
                tput.add_metric(label, prof["bytes_per_second"])
            thr_s.add_metric(label, st["throttled_seconds"])
            thr_n.add_metric(label, st["throttled"])
            iops_x.add_metric(label, st["iops_exceeded"])
            tput_x.add_metric(label, st["bytes_exceeded"])
            ops.add_metric(label, st["ops"])
        yield GaugeMetricFamily("blockd_volumes_attached", "volumes with at least one connection",
                                value=len(attached))
        yield from (size, alloc, conns, burst, iops, tput, thr_s, thr_n, iops_x, tput_x, ops)
        yield from self._collect_replication(engine)

    def _collect_replication(self, engine):
        manager = engine.replication
        if manager is None and engine.sink is None:
            return
        mins = GaugeMetricFamily("blockd_volume_min_copies", "copies a write needs", labels=["volume"])
        fenced = GaugeMetricFamily("blockd_volume_fenced", "1 if a newer primary superseded this copy",
                                   labels=["volume"])
        in_sync = GaugeMetricFamily("blockd_replica_in_sync", "1 if the replica counts toward the write quorum",
                                    labels=["volume", "peer"])
        state = GaugeMetricFamily("blockd_replica_state", "replica state (1 for the current one)",
                                  labels=["volume", "peer", "state"])
        remaining = GaugeMetricFamily("blockd_replica_resync_remaining_bytes", "bytes of chunks still to resync",
                                      labels=["volume", "peer"])
        resynced = CounterMetricFamily("blockd_replica_resynced_bytes", "bytes sent by resyncs",
                                       labels=["volume", "peer"])
        for volume in engine.open_volumes():
            vr = volume.replication
            if vr is None:
                continue
            st = vr.status()
            mins.add_metric([volume.name], st["min_copies"])
            fenced.add_metric([volume.name], 1 if st["fenced"] else 0)
            for peer, ps in st["peers"].items():
                in_sync.add_metric([volume.name, peer], 1 if ps["state"] == "in_sync" else 0)
                for name in ("in_sync", "out_of_sync", "resyncing", "fenced"):
                    state.add_metric([volume.name, peer, name], 1 if ps["state"] == name else 0)
                remaining.add_metric([volume.name, peer], ps["resync_remaining_bytes"])
                resynced.add_metric([volume.name, peer], ps["resynced_bytes"])
        yield from (mins, fenced, in_sync, state, remaining, resynced)
        if manager is not None:
            connected = GaugeMetricFamily("blockd_peer_connected", "1 while the peer answers", labels=["peer"])
            pending = GaugeMetricFamily("blockd_peer_pending_messages", "messages sent and not yet answered",
                                        labels=["peer"])
            acks = CounterMetricFamily("blockd_peer_acks", "answers received", labels=["peer"])
            ack_s = CounterMetricFamily("blockd_peer_ack_seconds", "time from send to answer, summed (ack latency)",
                                        labels=["peer"])
            failures = CounterMetricFamily("blockd_peer_failures", "link failures (deadline, disconnect)",
                                           labels=["peer"])
            sent = CounterMetricFamily("blockd_peer_sent_bytes", "data bytes sent", labels=["peer"])
            for name, link in sorted(manager.links().items()):
                connected.add_metric([name], 1 if link.up else 0)
                pending.add_metric([name], link.pending())
                acks.add_metric([name], link.acks)
                ack_s.add_metric([name], link.ack_seconds)
                failures.add_metric([name], link.failures)
                sent.add_metric([name], link.bytes_sent)
            yield from (connected, pending, acks, ack_s, failures, sent)
        if engine.sink is not None:
            st = engine.sink.status()
            refused = CounterMetricFamily("blockd_sink_refused", "replication messages refused, by reason",
                                          labels=["reason"])
            for reason in sorted(set(st["refused"]) | {"malformed", "unknown_key", "corrupt", "stale_epoch"}):
                refused.add_metric([reason], st["refused"].get(reason, 0))
            applied = CounterMetricFamily("blockd_sink_applied", "replication messages applied, by type",
                                          labels=["type"])
            for kind, n in sorted(st["applied"].items()):
                applied.add_metric([kind], n)
            yield from (refused, applied)


class _Collector:
    def __init__(self, metrics):
        self.metrics = metrics

    def collect(self):
        return self.metrics.collect()
