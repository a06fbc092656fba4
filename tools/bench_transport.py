#!/usr/bin/env python3
"""The replication transport alone: how many blockd WRITE round trips pyzmq carries on this host.

    python tools/bench_transport.py [--threads N] [--size BYTES] [--seconds S] [--repeat N] [--insecure]

A reference for tools/bench_replication.py, measured in the same run: what a
replicated write would cost if blockd did nothing but move the message.  A
sink process (a ROUTER socket, CurveZMQ unless --insecure, as `blockd serve`
binds it) decodes each WRITE with blockd's own framing (blockd/replproto.py)
and answers an ACK, without hashing or writing anything.  In this process,
--threads threads each own a DEALER socket and keep one WRITE in flight, as
nbdkit's request threads do on a blockd primary: send [header, checksums,
data], wait for the ACK, decode it, again.  Both ends are Python; the same
two zmq I/O threads carry the bytes (and do the CurveZMQ crypto).

Reports round trips per second and MiB/s (median of --repeat runs).  If the
transport alone moves fewer MiB/s than a floor asks of replicated writes,
no change inside blockd can meet that floor on this host with this
transport.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import zmq  # noqa: E402

from blockd import replproto as rp  # noqa: E402  (pure framing: no numba, no I/O)

BLOCK = 4096


def _serve(address_file):
    """The sink end (run in its own process): decode every message, answer an ACK."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    secret = os.environ.get("BENCH_TRANSPORT_SECRET")
    if secret:
        sock.curve_server = True
        sock.curve_publickey = os.environ["BENCH_TRANSPORT_PUBLIC"].encode()
        sock.curve_secretkey = secret.encode()
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    tmp = address_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"tcp://127.0.0.1:{port}")
    os.rename(tmp, address_file)
    while True:
        frames = sock.recv_multipart(copy=False)
        ident = frames[0].bytes
        try:
            msg = rp.decode([f.buffer for f in frames[1:]])
        except rp.ProtocolError as exc:
            reply = rp.json_message(rp.NACK, {"error": str(exc), "code": "malformed"})
        else:
            reply = rp.Message(rp.ACK, volume=msg.volume, epoch=msg.epoch, seq=msg.seq, offset=msg.offset)
        sock.send_multipart([ident, *rp.encode(reply)], copy=False)


class Sink:
    """The sink process, started and stopped around the runs."""

    def __init__(self, tmpdir, insecure=False):
        self.insecure = insecure
        self.public = self.secret = None
        env = dict(os.environ)
        if not insecure:
            self.public, self.secret = zmq.curve_keypair()
            env["BENCH_TRANSPORT_PUBLIC"] = self.public.decode()
            env["BENCH_TRANSPORT_SECRET"] = self.secret.decode()
        self._address_file = os.path.join(tmpdir, f"transport-sink-{os.getpid()}.address")
        if os.path.exists(self._address_file):
            os.unlink(self._address_file)
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", self._address_file],
                                     env=env, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not os.path.exists(self._address_file):
            if self.proc.poll() is not None:
                raise RuntimeError(f"the transport sink exited with status {self.proc.returncode}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the transport sink did not start within 30 s")
            time.sleep(0.02)
        with open(self._address_file) as f:
            self.address = f.read()

    def cpu_seconds(self):
        """User + system CPU time the sink process used so far."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        try:
            os.unlink(self._address_file)
        except FileNotFoundError:
            pass


def _self_cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def measure(sink, threads, size, seconds):
    """Round trips/s and MiB/s of ``threads`` synchronous senders of ``size``-byte WRITEs for ``seconds``,
    and the CPU time both ends used per round trip (this whole process, zmq's I/O thread included, and the
    sink process; anything else this process runs meanwhile is counted too)."""
    if size <= 0 or size % BLOCK:
        raise ValueError(f"size must be a positive multiple of {BLOCK}")
    ctx = zmq.Context()
    counts = [0] * threads
    errors = []
    start = threading.Barrier(threads + 1)
    stop = threading.Event()
    payload = os.urandom(size)
    sums = bytes(8 * (size // BLOCK))

    def sender(i):
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if not sink.insecure:
            client_public, client_secret = zmq.curve_keypair()
            sock.curve_serverkey = sink.public
            sock.curve_publickey, sock.curve_secretkey = client_public, client_secret
        sock.connect(sink.address)
        seq = 0
        try:
            # One round trip before the clock starts: the CurveZMQ handshake is not what is measured.
            sock.send_multipart(rp.encode(rp.Message(rp.HEARTBEAT, volume=1, seq=0)), copy=False)
            if not sock.poll(10000):
                raise RuntimeError("no answer to the first message within 10 s")
            sock.recv_multipart(copy=False)
            start.wait()
            while not stop.is_set():
                seq += 1
                # The copy a primary makes (nbdkit's buffer is only valid during the callback).
                data = bytes(memoryview(payload))
                msg = rp.Message(rp.WRITE, volume=1, epoch=1, seq=seq, offset=0, length=size, sums=sums, data=data)
                sock.send_multipart(rp.encode(msg), copy=False)
                if not sock.poll(10000):
                    raise RuntimeError("no answer within 10 s")
                reply = rp.decode([f.buffer for f in sock.recv_multipart(copy=False)])
                if reply.type != rp.ACK or reply.seq != seq:
                    raise RuntimeError(f"unexpected answer {rp.NAMES.get(reply.type)} seq {reply.seq}")
                counts[i] += 1
        except Exception as exc:  # reported below; the other senders stop too
            errors.append(exc)
            stop.set()
            try:
                start.abort()
            except threading.BrokenBarrierError:
                pass
        finally:
            sock.close(linger=0)

    workers = [threading.Thread(target=sender, args=(i,), daemon=True) for i in range(threads)]
    for w in workers:
        w.start()
    try:
        start.wait(30)
    except threading.BrokenBarrierError:
        pass
    t0, cpu0, sink0 = time.monotonic(), _self_cpu(), sink.cpu_seconds()
    before = sum(counts)
    stop.wait(seconds)
    done = sum(counts) - before
    elapsed = time.monotonic() - t0
    cpu = (_self_cpu() - cpu0) + (sink.cpu_seconds() - sink0)
    stop.set()
    for w in workers:
        w.join(15)
    ctx.term()
    if errors:
        raise RuntimeError(f"transport benchmark failed: {errors[0]}")
    rate = done / elapsed
    return {"round_trips_per_s": rate, "mibps": rate * size / (1024 * 1024), "seconds": elapsed,
            "cpu_us_per_round_trip": 1e6 * cpu / done if done else None}


def run(threads, sizes, seconds, repeat, insecure=False, tmpdir="/tmp"):
    """Median results per size: {size: {"round_trips_per_s", "mibps", "runs": [...]}}."""
    sink = Sink(tmpdir, insecure)
    try:
        out = {}
        for size in sizes:
            runs = [measure(sink, threads, size, seconds) for _ in range(repeat)]
            cpu = [r["cpu_us_per_round_trip"] for r in runs if r["cpu_us_per_round_trip"] is not None]
            out[size] = {"round_trips_per_s": statistics.median(r["round_trips_per_s"] for r in runs),
                         "mibps": statistics.median(r["mibps"] for r in runs),
                         "cpu_us_per_round_trip": statistics.median(cpu) if cpu else None, "runs": runs}
        return out
    finally:
        sink.stop()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--threads", type=int, default=4, help="senders, each with one WRITE in flight (default 4)")
    p.add_argument("--size", type=int, action="append", help="WRITE size in bytes (repeatable; default 4096 and 1 MiB)")
    p.add_argument("--seconds", type=float, default=3.0, help="seconds per run (default 3)")
    p.add_argument("--repeat", type=int, default=3, help="runs per size; the median is reported (default 3)")
    p.add_argument("--insecure", action="store_true", help="plain TCP instead of CurveZMQ")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--serve", metavar="ADDRESS_FILE", help=argparse.SUPPRESS)
    o = p.parse_args(argv)
    if o.serve:
        _serve(o.serve)
        return 0
    sizes = o.size or [4096, 1024 * 1024]
    if o.threads < 1 or o.seconds <= 0 or o.repeat < 1 or any(s <= 0 or s % BLOCK for s in sizes):
        p.error(f"--threads, --seconds and --repeat must be positive; sizes positive multiples of {BLOCK}")
    res = run(o.threads, sizes, o.seconds, o.repeat, o.insecure)
    if o.json:
        print(json.dumps({str(k): v for k, v in res.items()}, indent=2))
    else:
        for size, r in res.items():
            print(f"{size:>8} B x {o.threads} threads ({'plain TCP' if o.insecure else 'CurveZMQ'}): "
                  f"{r['round_trips_per_s']:8.0f} round trips/s {r['mibps']:8.1f} MiB/s, "
                  f"{r['cpu_us_per_round_trip']:.0f} us of CPU per round trip (both ends)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
