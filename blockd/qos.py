"""Token buckets and the per-volume admission that throttles I/O.

Pure: time comes from an injected clock, so tests drive it without sleeping.
``Admission.reserve`` is the whole data-path cost: under one small lock it
finds the earliest time every bucket can pay for the request (FIFO: never
before an earlier request's reservation), takes the tokens as of that time,
and returns how long the caller must wait.  The caller sleeps outside any
lock (``time.sleep`` releases the GIL), so a throttled request blocks only
its own connection's worker and never another volume.  A request is never
failed for being throttled.

A bucket may hold at most ``depth`` tokens and refills at ``rate`` per
second.  A request waits until every bucket holds its whole cost, so over
any window W a bucket admits at most ``rate * W + depth``; depths are at
least one maximal request's cost, so every request fits.
"""

import math
import threading
import time

SSD_UNIT = 256 * 1024  # an SSD I/O counts as one operation per 256 KiB
HDD_UNIT = 1024 * 1024  # HDD accounting unit: small random I/Os are charged as 1 MiB
MAX_REQUEST = 32 * 1024 * 1024  # largest NBD request blockd accepts (BLOCK_SIZES max)
BURST_SECONDS = 0.05  # a bucket's depth beyond one maximal request: 50 ms at its rate


class TokenBucket:
    __slots__ = ("name", "rate", "depth", "tokens", "stamp")

    def __init__(self, name, rate, depth, tokens=None, stamp=0.0):
        if rate <= 0 or depth <= 0:
            raise ValueError(f"bucket {name}: rate and depth must be positive")
        self.name = name
        self.rate = float(rate)
        self.depth = float(depth)
        self.tokens = self.depth if tokens is None else min(float(tokens), self.depth)
        self.stamp = stamp  # time the tokens figure is valid at (may be a future reservation)

    def level(self, t):
        """Tokens at time ``t`` (>= stamp), capped at depth."""
        if t <= self.stamp:
            return self.tokens
        return min(self.depth, self.tokens + self.rate * (t - self.stamp))

    def ready_at(self, t, cost):
        """Earliest time >= t at which the bucket holds ``cost`` (at most its depth)."""
        need = min(cost, self.depth)
        have = self.level(t)
        if have >= need:
            return t
        return t + (need - have) / self.rate

    def take(self, t, cost):
        self.tokens = self.level(t) - cost
        self.stamp = t

    def set_level(self, t, tokens):
        self.tokens = max(0.0, min(float(tokens), self.depth))
        self.stamp = t


class Profile:
    """What throttles one volume: the rates its type and provisioning give it.

    ``iops``/``bytes_per_second`` are the admission ceilings (burst ceilings
    for gp2/st1/sc1); ``credit_rate``/``credit_depth`` the credit bucket
    (I/O credits for gp2, bytes for st1/sc1) that refills at the baseline;
    ``hdd`` switches to HDD accounting.  None means no limit.
    """

    __slots__ = ("iops", "bytes_per_second", "credit_rate", "credit_depth", "credit_unit", "hdd")

    def __init__(self, iops=None, bytes_per_second=None, credit_rate=None, credit_depth=None, credit_unit=None,
                 hdd=False):
        self.iops = iops
        self.bytes_per_second = bytes_per_second
        self.credit_rate = credit_rate
        self.credit_depth = credit_depth
        self.credit_unit = credit_unit  # "ops" or "bytes"
        self.hdd = hdd

    @property
    def unlimited(self):
        return self.iops is None and self.bytes_per_second is None and self.credit_rate is None

    def as_dict(self):
        return {k: getattr(self, k) for k in self.__slots__}


def cost(profile, offset, length, sequential):
    """(operations, bytes) charged for one read or write."""
    if profile.hdd:
        if sequential:
            return length / HDD_UNIT, length  # merged into 1 MiB units
        units = max(1, math.ceil(length / HDD_UNIT))
        return units, max(length, units * HDD_UNIT)
    return max(1, math.ceil(length / SSD_UNIT)), length


def _depth(rate, max_cost):
    return max(rate * BURST_SECONDS, max_cost)


class Stats:
    """Counters for show/metrics: what was admitted and how long requests waited."""

    __slots__ = ("ops", "bytes", "requests", "throttled", "throttled_seconds", "iops_exceeded", "bytes_exceeded")

    def __init__(self):
        for k in self.__slots__:
            setattr(self, k, 0)

    def as_dict(self):
        return {k: getattr(self, k) for k in self.__slots__}


class Admission:
    """Per-volume QoS state: buckets, credits, a pending profile switch, counters."""

    def __init__(self, profile, clock=time.monotonic, credits=None, trace=0):
        self.clock = clock
        self._lock = threading.Lock()
        self.stats = Stats()
        self._end = None  # end offset of the last request (HDD sequential detection)
        self._pending = None  # (at, profile): a modification's new limits, applied at ``at``
        self._trace = [] if trace else None
        self._trace_max = trace
        self.profile = None
        self._apply(profile, self.clock(), credits)

    # ---- configuration ---------------------------------------------------------
    def _apply(self, profile, now, credits=None):
        old_credit = self.credit_bucket if self.profile is not None else None
        self.profile = profile
        self.ops_bucket = None
        self.bytes_bucket = None
        self.credit_bucket = None
        max_ops = MAX_REQUEST / (HDD_UNIT if profile.hdd else SSD_UNIT)
        if profile.iops:
            self.ops_bucket = TokenBucket("ops", profile.iops, _depth(profile.iops, max_ops), stamp=now)
        if profile.bytes_per_second:
            self.bytes_bucket = TokenBucket(
                "bytes", profile.bytes_per_second, _depth(profile.bytes_per_second, MAX_REQUEST), stamp=now
            )
        if profile.credit_rate:
            if credits is None and old_credit is not None:
                # Keep the balance across a modification, as a fraction of the bucket.
                credits = old_credit.level(now) / old_credit.depth * profile.credit_depth
            self.credit_bucket = TokenBucket(
                "credits", profile.credit_rate, profile.credit_depth, tokens=credits, stamp=now
            )
        self._buckets = [b for b in (self.ops_bucket, self.bytes_bucket, self.credit_bucket) if b is not None]

    def schedule(self, profile, at):
        """Switch to ``profile`` at clock time ``at`` (a modification's optimizing phase)."""
        with self._lock:
            if at <= self.clock():
                self._apply(profile, self.clock())
                self._pending = None
            else:
                self._pending = (at, profile)

    def set_credits(self, tokens):
        with self._lock:
            if self.credit_bucket is None:
                return False
            now = self.clock()
            t = max(now, self.credit_bucket.stamp)
            self.credit_bucket.set_level(t, tokens)
            return True

    # ---- the data path ---------------------------------------------------------
    def reserve(self, offset, length):
        """Account one read/write; returns seconds to wait before doing it (0.0 if none)."""
        now = self.clock()
        with self._lock:
            if self._pending is not None and now >= self._pending[0]:
                self._apply(self._pending[1], now)
                self._pending = None
            profile = self.profile
            sequential = self._end == offset
            self._end = offset + length
            ops, nbytes = cost(profile, offset, length, sequential)
            stats = self.stats
            stats.requests += 1
            stats.ops += ops
            stats.bytes += nbytes
            if not self._buckets:
                return 0.0
            costs = []
            start = now
            for b in self._buckets:
                c = nbytes if (b is self.bytes_bucket or (b is self.credit_bucket and profile.credit_unit == "bytes")) else ops
                costs.append(c)
                if b.stamp > start:
                    start = b.stamp  # FIFO: not before an earlier reservation
            at = start
            for b, c in zip(self._buckets, costs):
                ready = b.ready_at(start, c)
                if ready > at:
                    at = ready
            for b, c in zip(self._buckets, costs):
                b.take(at, c)
            wait = at - now
            if wait > 0:
                stats.throttled += 1
                stats.throttled_seconds += wait
                if self.ops_bucket is not None and self.ops_bucket.ready_at(start, ops) > now:
                    stats.iops_exceeded += 1
                if self.bytes_bucket is not None and self.bytes_bucket.ready_at(start, nbytes) > now:
                    stats.bytes_exceeded += 1
            if self._trace is not None:
                self._trace.append((at, ops, nbytes))
                if len(self._trace) > self._trace_max:
                    del self._trace[: len(self._trace) - self._trace_max]
            return wait if wait > 0 else 0.0

    def admit(self, offset, length, sleep=time.sleep):
        wait = self.reserve(offset, length)
        if wait:
            sleep(wait)

    # ---- inspection --------------------------------------------------------------
    def credit_level(self):
        """(tokens now, depth) of the credit bucket, or None."""
        with self._lock:
            b = self.credit_bucket
            if b is None:
                return None
            return max(0.0, b.level(self.clock())), b.depth

    def burst_balance(self):
        """EBS BurstBalance: percent of the credit bucket left (100 for types without credits)."""
        level = self.credit_level()
        if level is None:
            return 100.0
        return 100.0 * level[0] / level[1]

    def snapshot(self):
        with self._lock:
            out = {
                "profile": self.profile.as_dict(),
                "stats": self.stats.as_dict(),
                "buckets": {b.name: {"rate": b.rate, "depth": b.depth} for b in self._buckets},
            }
            if self._trace is not None:
                out["trace"] = list(self._trace)
        out["burst_balance"] = self.burst_balance()
        level = self.credit_level()
        out["credits"] = level[0] if level else None
        return out
