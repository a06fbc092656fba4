#!/usr/bin/env python3
"""Throughput benchmark for blockd.checksum against the xxhash C library.

Usage: python tools/bench_checksum.py [--json PATH] [--mib 256] [--runs 7]

Measures (median GB/s over >= 5 runs, same random data, 4 KiB blocks):
  a) blockd hash_blocks, single thread
  b) xxhash.xxh64_intdigest per 4 KiB block, Python loop over memoryview slices
  c) xxhash.xxh64_intdigest over the whole buffer in one call
  d) blockd hash_blocks from 2 threads concurrently, one half each
  e) blockd verify_blocks, single thread
Other bench scripts can ``from tools.bench_checksum import run``.
"""

import argparse
import json
import os
import statistics
import sys
import threading
import time

import numpy as np
import xxhash

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from blockd import checksum  # noqa: E402

BS = checksum.BLOCK_SIZE


def _median_gbps(fn, nbytes, runs):
    fn()  # warm-up (JIT, page faults, caches)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times) / 1e9


def run(mib: int = 256, runs: int = 7) -> dict:
    """Run all measurements on `mib` MiB of random data; return a result dict."""
    runs = max(5, runs)
    nbytes = (mib << 20) // BS * BS
    nblk = nbytes // BS
    data = np.random.default_rng(12345).integers(0, 256, nbytes, dtype=np.uint8)
    mv = memoryview(data)
    out = np.empty(nblk, dtype=np.uint64)
    checksum.warm()

    def ours():
        checksum.hash_blocks(data, out)

    digest = xxhash.xxh64_intdigest

    def xx_blocks():
        for off in range(0, nbytes, BS):
            digest(mv[off:off + BS])

    def xx_whole():
        digest(mv)

    half = nblk // 2 * BS
    parts = [(data[:half], out[:half // BS]), (data[half:], out[half // BS:])]

    def ours_2threads():
        ts = [threading.Thread(target=checksum.hash_blocks, args=p) for p in parts]
        for t in ts:
            t.start()
        for t in ts:
            t.join()

    ours()
    expected = out.copy()
    ref = np.array([digest(mv[o:o + BS]) for o in range(0, nbytes, BS)],
                   dtype=np.uint64)
    if not np.array_equal(expected, ref):
        raise RuntimeError("blockd.checksum disagrees with xxhash")

    def verify():
        if len(checksum.verify_blocks(data, expected)):
            raise RuntimeError("verify_blocks reported a mismatch")

    res = {
        "mib": nbytes >> 20, "runs": runs, "block_size": BS,
        "gbps": {
            "a_hash_blocks": _median_gbps(ours, nbytes, runs),
            "b_xxhash_per_block": _median_gbps(xx_blocks, nbytes, runs),
            "c_xxhash_whole": _median_gbps(xx_whole, nbytes, runs),
            "d_hash_blocks_2threads": _median_gbps(ours_2threads, nbytes, runs),
            "e_verify_blocks": _median_gbps(verify, nbytes, runs),
        },
    }
    b = res["gbps"]["b_xxhash_per_block"]
    c = res["gbps"]["c_xxhash_whole"]
    res["ratio_vs_b"] = {k: v / b for k, v in res["gbps"].items()}
    res["ratio_vs_c"] = {k: v / c for k, v in res["gbps"].items()}
    return res


def _print_table(res):
    print("blockd.checksum benchmark: %d MiB, median of %d runs"
          % (res["mib"], res["runs"]))
    print("%-26s %8s %8s %8s" % ("case", "GB/s", "vs (b)", "vs (c)"))
    for k, v in res["gbps"].items():
        print("%-26s %8.2f %8.2f %8.2f"
              % (k, v, res["ratio_vs_b"][k], res["ratio_vs_c"][k]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", metavar="PATH", help="write results as JSON")
    ap.add_argument("--mib", type=int, default=256, help="buffer size in MiB")
    ap.add_argument("--runs", type=int, default=7, help="runs per case (>= 5)")
    args = ap.parse_args(argv)
    res = run(args.mib, args.runs)
    _print_table(res)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
