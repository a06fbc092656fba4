"""QoS through a real server: bounds checked against the server's own admission trace.

The server runs with BLOCKD_QOS_TRACE (it keeps each volume's last admissions:
time, operations, bytes); fio drives load through the nbd ioengine.  Upper
bounds are exact (rate x window + bucket depth, from the server's clock);
lower bounds (that throttling does not cost a volume more than its own
limit) have generous margins, since this 2-core machine also runs the test.
"""

import json
import shutil
import signal
import subprocess

import pytest

from conftest import control, js, run_cli, wait_for

pytestmark = pytest.mark.skipif(shutil.which("fio") is None, reason="fio not installed")

MiB, GiB = 1 << 20, 1 << 30






def fio(server, name, rw, bs, seconds, iodepth=16, jobs=1, size="256M", background=False):
    cmd = [
        "fio", f"--name={name}", "--ioengine=nbd", f"--uri={server.uri(name)}", f"--rw={rw}", f"--bs={bs}",
        f"--size={size}", f"--iodepth={iodepth}", f"--numjobs={jobs}", "--time_based", f"--runtime={seconds}",
        "--group_reporting", "--output-format=json",
    ]
    if background:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    assert proc.returncode == 0, proc.stderr
    return _json(proc.stdout)


def _json(out):
    return json.loads(out[out.index("{"):])  # fio prints "connected to NBD server" lines first


def finish(proc, seconds):
    out, err = proc.communicate(timeout=seconds + 60)
    assert proc.returncode == 0, err
    return _json(out)


def max_excess(trace, index, rate):
    """max over windows [t_i, t_j] of (admitted - rate * (t_j - t_i)): must stay within the depth."""
    cum = [0.0]
    for entry in trace:
        cum.append(cum[-1] + entry[index])
    best = float("-inf")
    suffix = float("-inf")  # max over j >= i of cum[j+1] - rate * t_j
    for i in range(len(trace) - 1, -1, -1):
        suffix = max(suffix, cum[i + 1] - rate * trace[i][0])
        best = max(best, suffix - (cum[i] - rate * trace[i][0]))
    return best


def in_window(trace, start, end, index=1):
    return sum(e[index] for e in trace if start <= e[0] < end)


@pytest.fixture
def qserver(data_dir, server_factory, monkeypatch):
    monkeypatch.setenv("BLOCKD_QOS_TRACE", "200000")
    run_cli("pool", "set", "--modify-cooldown", "0", data_dir=data_dir, check=True)
    return server_factory(data_dir)


def test_gp3_never_admits_more_than_its_limits(qserver, cli):
    cli("volume", "create", "g3", "--size", "8GiB", "--type", "gp3", check=True)
    server = qserver.start()
    hold = server.connect("g3")  # keeps the volume open (and its trace) between fio runs
    fio(server, "g3", "randread", "4k", 3, iodepth=32, jobs=2)
    fio(server, "g3", "read", "1m", 3, iodepth=8)
    q = control(server.data_dir, {"op": "qos", "name": "g3", "trace": True})
    trace, buckets = q["trace"], q["buckets"]
    assert buckets["ops"]["rate"] == 3000 and buckets["bytes"]["rate"] == 125 * MiB
    assert len(trace) > 3000  # the 4 KiB phase was throttled, not idle
    assert max_excess(trace, 1, 3000) <= buckets["ops"]["depth"] + 1e-6
    assert max_excess(trace, 2, 125 * MiB) <= buckets["bytes"]["depth"] + 1
    assert q["stats"]["throttled"] > 0 and q["stats"]["throttled_seconds"] > 0
    show = js(cli("volume", "show", "g3", "--json"))
    assert show["limits"]["iops"] == 3000 and show["qos_stats"]["requests"] == q["stats"]["requests"]
    hold.shutdown()


def test_gp2_bursts_while_credits_last_then_runs_at_its_baseline(qserver, cli):
    # 1 GiB gp2: baseline 100 IOPS, burst 3,000; 4,500 credits last about 1.5 s at 3,000 IOPS.
    cli("volume", "create", "g2", "--size", "1GiB", "--type", "gp2", "--initial-credits", "4500", check=True)
    server = qserver.start()
    hold = server.connect("g2")
    fio(server, "g2", "randread", "4k", 5, iodepth=16, size="64M")
    q = control(server.data_dir, {"op": "qos", "name": "g2", "trace": True})
    trace = q["trace"]
    t0 = trace[0][0]
    burst = in_window(trace, t0, t0 + 1.0)
    tail = in_window(trace, t0 + 3.0, t0 + 5.0)
    assert burst >= 1500, burst  # bursting (far above the 100 IOPS baseline)
    assert burst <= 3000 * 1.0 + q["buckets"]["ops"]["depth"] + 1
    assert tail <= 100 * 2.0 + 5, tail  # credits gone: the baseline, 100 IOPS
    assert tail >= 100 * 2.0 * 0.5, tail
    assert q["burst_balance"] < 1.0
    show = js(cli("volume", "show", "g2", "--json"))
    assert show["burst_balance"] < 1.0 and show["limits"]["baseline_iops"] == 100
    hold.shutdown()


def test_two_throttled_volumes_do_not_slow_each_other(qserver, cli):
    cli("volume", "create", "a", "--size", "1GiB", "--iops", "800", check=True)
    cli("volume", "create", "b", "--size", "1GiB", "--iops", "1600", check=True)
    server = qserver.start()
    holds = [server.connect(name) for name in "ab"]
    runs = [fio(server, name, "randread", "4k", 4, iodepth=16, size="64M", background=True) for name in "ab"]
    results = [finish(p, 4) for p in runs]
    for name, limit, res in zip("ab", (800, 1600), results):
        q = control(server.data_dir, {"op": "qos", "name": name, "trace": True})
        assert max_excess(q["trace"], 1, limit) <= q["buckets"]["ops"]["depth"] + 1e-6
        iops = res["jobs"][0]["read"]["iops"]
        assert iops >= 0.8 * limit, (name, iops)  # its own limit, not the other's load, bounds it
    for h in holds:
        h.shutdown()


def test_burst_balance_survives_a_restart_and_a_kill(qserver, cli, data_dir):
    cli("volume", "create", "g2", "--size", "100GiB", "--type", "gp2", "--initial-credits", "0%", check=True)
    server = qserver.start()
    h = server.connect("g2")
    h.pread(4096, 0)
    h.shutdown()
    assert server.stop(signal.SIGTERM) == 0
    bal = js(cli("volume", "show", "g2", "--json"))["burst_balance"]
    assert bal < 1.0, bal  # 300 credits/s of accrual: seconds, not a refill
    server.start()
    assert js(cli("volume", "show", "g2", "--json"))["burst_balance"] < 1.0
    cli("volume", "set-credits", "g2", "50%", check=True)  # online
    live = control(server.data_dir, {"op": "qos", "name": "g2"})
    assert 49.9 < live["burst_balance"] < 51
    server.kill9()
    assert 49.9 < js(cli("volume", "show", "g2", "--json"))["burst_balance"] < 52  # persisted at once


def test_modify_applies_new_limits_while_attached_and_cooldown_refuses(qserver, cli, data_dir):
    cli("volume", "create", "m", "--size", "2GiB", check=True)  # raw: unthrottled
    server = qserver.start()
    h = server.connect("m")
    h.pread(4096, 0)
    out = js(cli("volume", "modify", "m", "--type", "gp3", "--iops", "3000", "--throughput", "200", "--json"))
    assert out["modification"]["state"] == "modifying" and out["modification"]["original"]["type"] == "raw"
    one = cli("volume", "modify", "m", "--size", "4GiB")
    assert one.returncode == 1 and "modifying" in one.stderr and len(one.stderr.strip().splitlines()) == 1
    wait_for(lambda: js(cli("volume", "show", "m", "--json"))["modification"]["state"] == "completed",
             timeout=30, what="modification to complete")
    show = js(cli("volume", "show", "m", "--json"))
    assert show["type"] == "gp3" and show["limits"]["iops"] == 3000 and show["limits"]["throughput_mibps"] == 200
    fio(server, "m", "randread", "4k", 2, iodepth=16, size="64M")
    q = control(server.data_dir, {"op": "qos", "name": "m", "trace": True})
    assert q["buckets"]["ops"]["rate"] == 3000
    assert max_excess(q["trace"], 1, 3000) <= q["buckets"]["ops"]["depth"] + 1e-6
    h.shutdown()
    cli("pool", "set", "--modify-cooldown", "6h", check=True)
    before = js(cli("volume", "show", "m", "--json"))
    refused = cli("volume", "modify", "m", "--iops", "4000")
    assert refused.returncode == 1 and "cooldown" in refused.stderr
    after = js(cli("volume", "show", "m", "--json"))
    assert (after["iops"], after["modification"]["started_at"]) == (before["iops"], before["modification"]["started_at"])
