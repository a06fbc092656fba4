"""``blockd status``: one screen for a person, from the running server's metrics endpoint.

Scrapes /metrics twice, ``interval`` apart, and turns counter deltas into
rates (IOPS, bytes/s, throttled time) and histogram deltas into latency
quantiles.  Control plane: no numba, no engine; prometheus_client's text
parser reads what the server exports (so ``status`` sees exactly what
Prometheus would).
"""

import time
import urllib.error
import urllib.request

from .errors import BlockdError
from .sizes import format_size

SCRAPE_TIMEOUT_SECONDS = 5.0


def scrape(url):
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_SECONDS) as resp:
            text = resp.read().decode()
    except (urllib.error.URLError, OSError) as exc:
        raise BlockdError(f"cannot scrape {url}: {getattr(exc, 'reason', exc)}") from None
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def _by(samples, name, label="volume"):
    """{label value: summed sample} for one metric name."""
    out = {}
    for (n, labels), v in samples.items():
        if n == name:
            key = dict(labels).get(label)
            out[key] = out.get(key, 0.0) + v
    return out


def _sum(samples, name, **match):
    total = 0.0
    for (n, labels), v in samples.items():
        if n == name and all(dict(labels).get(k) == want for k, want in match.items()):
            total += v
    return total


def _one(samples, name):
    for (n, _labels), v in samples.items():
        if n == name:
            return v
    return None


def _quantile(before, after, op, q):
    """Latency quantile over the interval from the per-op histogram buckets (upper bound of the bucket)."""
    buckets = []
    for (n, labels), v in after.items():
        d = dict(labels)
        if n == "blockd_request_duration_seconds_bucket" and d.get("op") == op:
            bound = float("inf") if d["le"] == "+Inf" else float(d["le"])
            buckets.append((bound, v - before.get((n, labels), 0.0)))
    buckets.sort()
    if not buckets or buckets[-1][1] <= 0:
        return None
    target = q * buckets[-1][1]
    for bound, cumulative in buckets:
        if cumulative >= target:
            return bound
    return None


def collect(url, interval=1.0, pid=None):
    t0 = time.monotonic()
    before = scrape(url)
    time.sleep(max(0.0, interval))
    after = scrape(url)
    dt = max(1e-6, time.monotonic() - t0)

    def rate(name, **match):
        return max(0.0, (_sum(after, name, **match) - _sum(before, name, **match)) / dt)

    connections = _by(after, "blockd_volume_connections")
    volumes = []
    for name in sorted(v for v, n in connections.items() if n > 0):
        volumes.append({
            "name": name,
            "connections": int(connections[name]),
            "read_iops": rate("blockd_requests_total", volume=name, op="read"),
            "write_iops": rate("blockd_requests_total", volume=name, op="write"),
            "read_bytes_per_second": rate("blockd_request_bytes_total", volume=name, op="read"),
            "write_bytes_per_second": rate("blockd_request_bytes_total", volume=name, op="write"),
            "throttled_seconds_per_second": rate("blockd_volume_throttled_seconds_total", volume=name),
            "burst_balance_percent": _by(after, "blockd_volume_burst_balance_percent").get(name),
            "iops_limit": _by(after, "blockd_volume_iops_limit").get(name),
            "size_bytes": int(_by(after, "blockd_volume_size_bytes").get(name, 0)),
            "allocated_bytes": int(_by(after, "blockd_volume_allocated_bytes").get(name, 0)),
            "checksum_errors": int(_by(after, "blockd_checksum_errors_total").get(name, 0)),
        })
    capacity = {
        "logical_limit": _one(after, "blockd_pool_logical_limit_bytes"),
        "logical_provisioned": _one(after, "blockd_pool_logical_provisioned_bytes"),
        "physical_size": _one(after, "blockd_pool_physical_size_bytes"),
        "physical_used": _one(after, "blockd_pool_physical_used_bytes"),
        "physical_available": _one(after, "blockd_pool_physical_available_bytes"),
        "overcommit_ratio": _one(after, "blockd_pool_overcommit_ratio"),
        "volumes": _one(after, "blockd_pool_volumes"),
    }
    for key, value in capacity.items():
        if value is not None and key != "overcommit_ratio":
            capacity[key] = int(value)
    latency = {}
    for op in ("read", "write", "flush"):
        p50 = _quantile(before, after, op, 0.5)
        if p50 is not None:
            latency[op] = {"p50_seconds_le": p50, "p99_seconds_le": _quantile(before, after, op, 0.99)}
    return {
        "metrics_url": url,
        "pid": pid,
        "interval_seconds": dt,
        "volumes_attached": len(volumes),
        "volumes": volumes,
        "totals": {
            "read_iops": rate("blockd_requests_total", op="read"),
            "write_iops": rate("blockd_requests_total", op="write"),
            "read_bytes_per_second": rate("blockd_request_bytes_total", op="read"),
            "write_bytes_per_second": rate("blockd_request_bytes_total", op="write"),
            "errors_per_second": rate("blockd_request_errors_total"),
            "checksum_errors": int(_sum(after, "blockd_checksum_errors_total")),
        },
        "latency": latency,
        "capacity": capacity,
        "replication": _replication(before, after, dt),
    }


def _replication(before, after, dt):
    """Replicated volumes (open ones), peers and the sink, from the replication metrics; None if this
    server replicates nothing (no such metrics)."""
    names = {n for n, _ in after}
    if not names & {"blockd_volume_min_copies", "blockd_peer_connected", "blockd_sink_applied_total"}:
        return None
    volumes = {}
    for (n, labels), v in after.items():
        d = dict(labels)
        if n == "blockd_volume_min_copies":
            volumes.setdefault(d["volume"], {"peers": {}})["min_copies"] = int(v)
        elif n == "blockd_volume_fenced":
            volumes.setdefault(d["volume"], {"peers": {}})["fenced"] = bool(v)
    for (n, labels), v in after.items():
        d = dict(labels)
        if d.get("volume") not in volumes or "peer" not in d:
            continue
        peer = volumes[d["volume"]]["peers"].setdefault(d["peer"], {})
        if n == "blockd_replica_state" and v == 1:
            peer["state"] = d["state"]
        elif n == "blockd_replica_resync_remaining_bytes":
            peer["resync_remaining_bytes"] = int(v)
        elif n == "blockd_replica_resynced_bytes_total":
            key = (n, labels)
            peer["resync_bytes_per_second"] = max(0.0, (v - before.get(key, v)) / dt)
    peers = {}
    for name in sorted(_by(after, "blockd_peer_connected", "peer")):
        acks = _sum(after, "blockd_peer_acks_total", peer=name) - _sum(before, "blockd_peer_acks_total", peer=name)
        secs = (_sum(after, "blockd_peer_ack_seconds_total", peer=name)
                - _sum(before, "blockd_peer_ack_seconds_total", peer=name))
        peers[name] = {
            "connected": bool(_sum(after, "blockd_peer_connected", peer=name)),
            "pending_messages": int(_sum(after, "blockd_peer_pending_messages", peer=name)),
            "acks_per_second": max(0.0, acks / dt),
            "mean_ack_seconds": secs / acks if acks > 0 else None,
            "failures": int(_sum(after, "blockd_peer_failures_total", peer=name)),
        }
    sink = None
    if "blockd_sink_applied_total" in names or "blockd_sink_refused_total" in names:
        sink = {"applied_per_second": max(0.0, (_sum(after, "blockd_sink_applied_total")
                                                - _sum(before, "blockd_sink_applied_total")) / dt),
                "refused": int(_sum(after, "blockd_sink_refused_total"))}
    return {"volumes": volumes, "peers": peers, "sink": sink}


def _bar(fraction, width=30):
    fraction = max(0.0, min(1.0, fraction))
    filled = round(fraction * width)
    return "[" + "#" * filled + "." * (width - filled) + f"] {fraction * 100:5.1f}%"


def _rate(bps):
    return f"{format_size(int(bps))}/s"


def render(st):
    lines = [f"blockd status  pid {st['pid']}  {st['metrics_url']}  (rates over {st['interval_seconds']:.1f} s)"]
    t = st["totals"]
    lines.append(
        f"I/O now: read {t['read_iops']:.0f} IOPS {_rate(t['read_bytes_per_second'])}, "
        f"write {t['write_iops']:.0f} IOPS {_rate(t['write_bytes_per_second'])}, "
        f"errors {t['errors_per_second']:.1f}/s, checksum errors {t['checksum_errors']}"
    )
    if st["latency"]:
        lines.append("latency: " + ", ".join(
            f"{op} p50 <= {v['p50_seconds_le'] * 1e3:g} ms, p99 <= {v['p99_seconds_le'] * 1e3:g} ms"
            for op, v in st["latency"].items()
        ))
    c = st["capacity"]
    if c["logical_limit"] is not None:
        lines.append("")
        limit = c["logical_limit"] or 1
        lines.append(f"logical   {_bar(c['logical_provisioned'] / limit)}  {format_size(c['logical_provisioned'])} "
                     f"of {format_size(c['logical_limit'])} provisioned in {c['volumes']} volumes")
    if c["physical_size"]:
        used = c["physical_size"] - c["physical_available"]
        lines.append(f"physical  {_bar(used / c['physical_size'])}  {format_size(used)} of "
                     f"{format_size(c['physical_size'])} used ({format_size(c['physical_used'])} by blockd), "
                     f"overcommit {c['overcommit_ratio']:,.1f}x")
    lines.append("")
    lines.append(f"{st['volumes_attached']} volume(s) attached")
    if st["volumes"]:
        width = max(6, *(len(v["name"]) for v in st["volumes"]))
        lines.append(f"{'VOLUME':<{width}}  CONN  {'READ IOPS':>9}  {'WRITE IOPS':>10}  {'READ':>11}  {'WRITE':>11}  "
                     f"{'BURST':>6}  {'WAIT s/s':>9}  ALLOCATED")
        for v in st["volumes"]:
            burst = f"{v['burst_balance_percent']:.0f}%" if v["burst_balance_percent"] is not None else "-"
            lines.append(
                f"{v['name']:<{width}}  {v['connections']:>4}  {v['read_iops']:>9.0f}  {v['write_iops']:>10.0f}  "
                f"{_rate(v['read_bytes_per_second']):>11}  {_rate(v['write_bytes_per_second']):>11}  {burst:>6}  "
                f"{v['throttled_seconds_per_second']:>8.2f}s  {format_size(v['allocated_bytes'])}"
            )
    r = st["replication"]
    if r is None:
        lines.append("replication: none configured")
        return "\n".join(lines)
    lines.append("")
    for name, v in sorted(r["volumes"].items()):
        fenced = ", FENCED" if v.get("fenced") else ""
        lines.append(f"replication {name}: min copies {v.get('min_copies')}{fenced}")
        for peer, p in sorted(v["peers"].items()):
            extra = ""
            if p.get("resync_remaining_bytes"):
                extra = (f", {format_size(p['resync_remaining_bytes'])} to resync"
                         f" at {_rate(p.get('resync_bytes_per_second', 0.0))}")
            lines.append(f"  {peer}: {p.get('state', '?')}{extra}")
    for name, p in r["peers"].items():
        ack = f", mean ack {p['mean_ack_seconds'] * 1e3:.2f} ms" if p["mean_ack_seconds"] is not None else ""
        lines.append(f"peer {name}: {'connected' if p['connected'] else 'NOT CONNECTED'}, "
                     f"{p['acks_per_second']:.0f} acks/s{ack}, {p['pending_messages']} pending, "
                     f"{p['failures']} failures")
    if r["sink"] is not None:
        lines.append(f"sink: {r['sink']['applied_per_second']:.0f} messages applied/s, "
                     f"{r['sink']['refused']} refused")
    return "\n".join(lines)
