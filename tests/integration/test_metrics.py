"""Prometheus metrics from a real server, parsed with prometheus_client's own parser."""

import json
import os
import re
import shutil
import subprocess
import urllib.request

import nbd
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import ROOT, free_port, js, run_cli, wait_for

MiB = 1 << 20
RULES = os.path.join(ROOT, "tools", "prometheus", "blockd-rules.yml")
PROM_CONFIG = os.path.join(ROOT, "tools", "prometheus", "prometheus.yml")
DASHBOARD = os.path.join(ROOT, "tools", "grafana", "blockd.json")




def scrape(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))))


def names_of(samples):
    return {name for name, _ in samples}




@pytest.fixture
def mserver(data_dir, server_factory, cli):
    cli("volume", "create", "vol0", "--size", "64MiB", check=True)
    cli("volume", "create", "q", "--size", "100GiB", "--type", "gp2", check=True)
    port = free_port()
    srv = server_factory(data_dir, extra=["--metrics", f"127.0.0.1:{port}"]).start()
    srv.metrics_port = port
    return srv


def flip_byte(data_dir, volume_id, offset):
    chunk = os.path.join(data_dir, "volumes", str(volume_id), "0000000000000000.chunk")
    fd = os.open(chunk, os.O_RDWR)
    try:
        b = os.pread(fd, 1, offset)
        os.pwrite(fd, bytes([b[0] ^ 1]), offset)
    finally:
        os.close(fd)


def exercise(server, data_dir, cli):
    """Known traffic on vol0 (plus one EIO and a scrub) and one request on q; returns what was done."""
    h = server.connect("vol0")
    for i in range(40):
        h.pwrite(bytes([i]) * 4096, i * 4096)
    for i in range(25):
        h.pread(4096, i * 4096)
    h.pread(1000, 3)  # unaligned: 1000 bytes
    h.flush()
    h.trim(1 * MiB, 8192)  # libnbd: (count, offset)
    h.zero(2 * MiB, 8192)
    h.cache(4096, 0)
    h.block_status(1 * MiB, 0, lambda *a: 0)
    vol_id = js(cli("volume", "show", "vol0", "--json"))["id"]
    h.pwrite(b"C" * 4096, 32 * MiB)
    h.flush()
    flip_byte(data_dir, vol_id, 4096 + 100)  # block 1 (block 0 is all zeros: a hole)
    with pytest.raises(nbd.Error):
        h.pread(4096, 4096)
    out = cli("scrub", "vol0", "--json")
    assert out.returncode == 1  # the flipped block
    q = server.connect("q")
    q.pread(4096, 0)
    return h, q


def test_counters_match_the_traffic_exactly(mserver, data_dir, cli):
    h, q = exercise(mserver, data_dir, cli)
    s = scrape(mserver.metrics_port)
    assert value(s, "blockd_requests_total", volume="vol0", op="write") == 41
    assert value(s, "blockd_request_bytes_total", volume="vol0", op="write") == 41 * 4096
    assert value(s, "blockd_requests_total", volume="vol0", op="read") == 25 + 1 + 1
    assert value(s, "blockd_request_bytes_total", volume="vol0", op="read") == 26 * 4096 + 1000
    assert value(s, "blockd_requests_total", volume="vol0", op="flush") == 2
    assert value(s, "blockd_requests_total", volume="vol0", op="trim") == 1
    assert value(s, "blockd_request_bytes_total", volume="vol0", op="trim") == 1 * MiB
    assert value(s, "blockd_request_bytes_total", volume="vol0", op="zero") == 2 * MiB
    assert value(s, "blockd_requests_total", volume="vol0", op="cache") == 1
    assert value(s, "blockd_requests_total", volume="vol0", op="block_status") >= 1
    assert value(s, "blockd_request_errors_total", volume="vol0", op="read", errno="EIO") == 1
    assert value(s, "blockd_checksum_errors_total", volume="vol0") >= 1
    assert value(s, "blockd_scrub_corrupt_blocks_total", volume="vol0") == 1
    assert value(s, "blockd_scrub_scanned_bytes_total", volume="vol0") > 0
    assert value(s, "blockd_scrubs_running") == 0
    in_flight = [v for (n, _), v in s.items() if n == "blockd_requests_in_flight"]
    assert in_flight and all(v == 0 for v in in_flight)
    reads = sum(v for (n, l), v in s.items() if n == "blockd_requests_total" and dict(l)["op"] == "read")
    assert value(s, "blockd_request_duration_seconds_count", op="read") == reads
    assert value(s, "blockd_request_duration_seconds_bucket", op="read", le="+Inf") == reads
    assert value(s, "blockd_request_duration_seconds_bucket", op="read", le="5e-05") <= reads
    # Attachment, allocation and QoS gauges of the open volumes.
    assert value(s, "blockd_volumes_attached") == 2
    assert value(s, "blockd_volume_connections", volume="vol0") == 1
    assert value(s, "blockd_volume_size_bytes", volume="q") == 100 << 30
    show = js(cli("volume", "show", "vol0", "--json"))
    assert value(s, "blockd_volume_allocated_bytes", volume="vol0") == show["allocated_bytes"]
    assert value(s, "blockd_volume_iops_limit", volume="q") == 3000
    assert 99 < value(s, "blockd_volume_burst_balance_percent", volume="q") <= 100
    assert value(s, "blockd_volume_consumed_ops_total", volume="q") == 1
    cap = js(cli("capacity", "show", "--json"))
    for metric, key in (("blockd_pool_logical_limit_bytes", "logical_limit"),
                        ("blockd_pool_logical_provisioned_bytes", "logical_provisioned"),
                        ("blockd_pool_physical_size_bytes", "physical_size"), ("blockd_pool_volumes", "volumes")):
        assert value(s, metric) == cap[key], metric
    assert value(s, "blockd_pool_overcommit_ratio") == pytest.approx(cap["overcommit_ratio"])
    info = [l for (n, l) in s if n == "blockd_build_info"]
    assert info and dict(info[0])["pid"] == str(mserver.proc.pid)
    assert dict(info[0])["nbdkit_pid"] == str(mserver.nbdkit_pid())
    assert value(s, "blockd_server_restarts_total") == 0
    assert value(s, "process_resident_memory_bytes") > 0
    h.shutdown()
    q.shutdown()
    wait_for(lambda: value(scrape(mserver.metrics_port), "blockd_volumes_attached") == 0, what="detach")


def test_only_opened_volumes_carry_per_volume_series(mserver, cli):
    plan = os.path.join(ROOT, "tools", "plans", "prime-day-2020.toml")
    assert cli("provision", plan).returncode == 0
    h = mserver.connect("prime-00042")
    h.pread(4096, 0)
    s = scrape(mserver.metrics_port)
    volumes = {dict(l).get("volume") for (n, l) in s if "volume" in dict(l)}
    assert volumes == {"prime-00042"}  # not 15,424 of them, and not the unopened vol0/q
    assert value(s, "blockd_pool_volumes") == 15426
    h.shutdown()


def test_dashboard_and_rules_use_only_exported_names(mserver, data_dir, cli):
    h, q = exercise(mserver, data_dir, cli)
    exported = names_of(scrape(mserver.metrics_port))
    with open(DASHBOARD) as f:
        dashboard = json.load(f)
    exprs = []

    def walk(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k in ("expr", "query", "definition") and isinstance(v, str):
                    exprs.append(v)
                else:
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(dashboard)
    with open(RULES) as f:
        exprs.append(f.read())
    used = set()
    for text in exprs:
        used |= set(re.findall(r"\bblockd_[a-z0-9_]+", text))
    assert len(used) > 20
    # Replication names need peers: tests/integration/test_replication.py checks those against a replicating node.
    from blockd.metrics import REPLICATION_PREFIXES

    missing = sorted(n for n in used - exported if not n.startswith(REPLICATION_PREFIXES))
    assert not missing, missing
    h.shutdown()
    q.shutdown()


def test_rules_and_scrape_config_pass_promtool():
    promtool = shutil.which("promtool") or os.path.join(ROOT, "build", "prometheus", "usr", "bin", "promtool")
    assert os.path.exists(promtool), "promtool missing: `make setup` unpacks Debian's prometheus package"
    for args in (["check", "rules", RULES], ["check", "config", PROM_CONFIG]):
        proc = subprocess.run([promtool, *args], capture_output=True, text=True, cwd=os.path.dirname(RULES))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "SUCCESS" in proc.stdout + proc.stderr


def _listening_tcp_ports(pid):
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as f:
            next(f)
            for line in f:
                cols = line.split()
                if cols[3] == "0A" and cols[9] in inodes:  # LISTEN
                    ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


def test_no_endpoint_without_metrics_and_two_nodes_do_not_collide(tmp_path, server_factory, cli, mserver):
    assert _listening_tcp_ports(mserver.nbdkit_pid()) == {mserver.metrics_port}
    plain_dir = tmp_path / "plain"
    run_cli("volume", "create", "v", "--size", "1MiB", data_dir=plain_dir, check=True)
    plain = server_factory(plain_dir, name="plain.sock").start()
    assert _listening_tcp_ports(plain.nbdkit_pid()) == set()
    other_dir = tmp_path / "other"
    run_cli("volume", "create", "v", "--size", "1MiB", data_dir=other_dir, check=True)
    port2 = free_port()
    other = server_factory(other_dir, name="other.sock", extra=["--metrics", f"127.0.0.1:{port2}"]).start()
    pids = set()
    for port in (mserver.metrics_port, port2):
        info = [l for (n, l) in scrape(port) if n == "blockd_build_info"]
        pids.add(dict(info[0])["pid"])
    assert pids == {str(mserver.proc.pid), str(other.proc.pid)}
    # The same port again: refused before anything starts, one line.
    third_dir = tmp_path / "third"
    proc = run_cli("serve", "--listen", f"unix:{tmp_path}/t.sock", "--metrics", f"127.0.0.1:{port2}",
                   data_dir=third_dir, timeout=60)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1
    assert f"127.0.0.1:{port2}" in proc.stderr
    for bad in ("nonsense", "127.0.0.1:0", "127.0.0.1:99999", "unix:/x"):
        proc = run_cli("serve", "--listen", f"unix:{tmp_path}/t.sock", "--metrics", bad, data_dir=third_dir)
        assert proc.returncode == 2 and "--metrics" in proc.stderr, (bad, proc.stderr)


def test_status_under_load(mserver, cli):
    if shutil.which("fio") is None:
        pytest.skip("fio not installed")
    fio = subprocess.Popen(
        ["fio", "--name=s", "--ioengine=nbd", f"--uri={mserver.uri('vol0')}", "--rw=randrw", "--bs=4k",
         "--size=32M", "--time_based", "--runtime=6", "--iodepth=8", "--output-format=json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_for(lambda: js(cli("volume", "show", "vol0", "--json"))["attached"], what="fio to attach")
        st = js(cli("status", "--json", "--interval", "1"))
        assert st["pid"] == mserver.proc.pid and st["volumes_attached"] == 1
        (vol,) = st["volumes"]
        assert vol["name"] == "vol0" and vol["read_iops"] > 0 and vol["write_iops"] > 0
        assert st["totals"]["read_bytes_per_second"] > 0
        assert st["capacity"]["logical_provisioned"] == 64 * MiB + (100 << 30)
        assert "read" in st["latency"]
        text = cli("status", "--interval", "0.5")
        assert text.returncode == 0 and "vol0" in text.stdout and "IOPS" in text.stdout
    finally:
        fio.communicate(timeout=60)


def test_status_refuses_clearly_without_a_server_or_metrics(tmp_path, server_factory):
    d = tmp_path / "d"
    run_cli("volume", "create", "v", "--size", "1MiB", data_dir=d, check=True)
    proc = run_cli("status", data_dir=d)
    assert proc.returncode == 1 and "no server" in proc.stderr
    server_factory(d).start()
    proc = run_cli("status", data_dir=d)
    assert proc.returncode == 1 and "without --metrics" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
