"""QoS: token buckets, EBS I/O accounting, credit buckets and volume-type rules, on an injected clock."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockd import voltypes
from blockd.errors import BadInput
from blockd.qos import HDD_UNIT, SSD_UNIT, Admission, Profile, TokenBucket, cost

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t

    def sleep(self, seconds):
        self.t += seconds


def drive(adm, clock, length, until, offset=0, step=None):
    """Issue back-to-back requests (each waits its turn) until ``until``; returns (requests, ops)."""
    n = 0
    while clock.t < until:
        adm.admit(offset, length, sleep=clock.sleep)
        n += 1
        offset = (offset + (step or length)) % (1 << 40)
    return n


# ---- buckets ------------------------------------------------------------------------
def test_bucket_refills_at_its_rate_and_caps_at_depth():
    b = TokenBucket("t", rate=100, depth=50, tokens=0, stamp=0)
    assert b.level(0.1) == pytest.approx(10)
    assert b.level(0.5) == 50  # capped
    assert b.ready_at(0, 30) == pytest.approx(0.3)
    b.take(0.3, 30)
    assert b.level(0.3) == pytest.approx(0)
    assert b.ready_at(0.3, 80) == pytest.approx(0.8)  # a cost above depth waits for a full bucket


@pytest.mark.parametrize(
    "length, ssd_ops, hdd_random_units",
    [(4 * KiB, 1, 1), (256 * KiB, 1, 1), (1 * MiB, 4, 1), (4 * MiB, 16, 4)],
)
def test_io_size_accounting_ssd_and_hdd(length, ssd_ops, hdd_random_units):
    ssd = Profile(iops=1000)
    hdd = Profile(bytes_per_second=40 * MiB, hdd=True)
    assert cost(ssd, 0, length, sequential=False) == (ssd_ops, length)
    assert cost(ssd, 0, length, sequential=True) == (ssd_ops, length)
    units, charged = cost(hdd, 0, length, sequential=False)
    assert units == hdd_random_units and charged == max(length, hdd_random_units * HDD_UNIT)
    units, charged = cost(hdd, 0, length, sequential=True)  # merged into 1 MiB units: the real bytes
    assert charged == length and units == pytest.approx(length / HDD_UNIT)
    assert SSD_UNIT == 256 * KiB


def test_hdd_small_random_io_is_punished_sequential_is_not():
    clock = Clock()
    prof = voltypes.profile("st1", 1 * TiB)
    prof.credit_rate = None  # baseline/burst aside: the throughput ceiling alone
    rand = Admission(prof, clock=clock)
    n_rand = drive(rand, clock, 4 * KiB, clock.t + 10, step=7 * MiB)
    clock2 = Clock()
    seq = Admission(prof, clock=clock2)
    n_seq = drive(seq, clock2, 4 * KiB, clock2.t + 10)
    # 250 MiB/s burst ceiling: random 4 KiB pays 1 MiB each, ~250/s; sequential pays its bytes (IOPS-bound: 500).
    assert n_rand == pytest.approx(250 * 10, rel=0.05)
    assert n_seq > 20 * n_rand


# ---- gp3 ------------------------------------------------------------------------------
def test_gp3_default_limits_hold_for_ops_and_bytes():
    clock = Clock()
    adm = Admission(voltypes.profile("gp3", 100 * GiB), clock=clock, trace=100000)
    start = clock.t
    n = drive(adm, clock, 4 * KiB, start + 20)
    assert 3000 * 20 <= n <= 3000 * 20 + adm.ops_bucket.depth + 1
    clock2 = Clock()
    adm2 = Admission(voltypes.profile("gp3", 100 * GiB), clock=clock2)
    n2 = drive(adm2, clock2, 1 * MiB, clock2.t + 20)
    # throughput-bound at 1 MiB: 125 MiB/s plus the bucket's depth (one 32 MiB request)
    assert 125 * 20 <= n2 <= 125 * 20 + adm2.bytes_bucket.depth / MiB + 1
    assert adm2.stats.throttled > 0 and adm2.stats.bytes_exceeded > 0


@settings(max_examples=30, deadline=None)
@given(
    sizes=st.lists(st.sampled_from([512, 4 * KiB, 64 * KiB, 256 * KiB, 1 * MiB, 4 * MiB, 32 * MiB]),
                   min_size=50, max_size=300),
    gaps=st.lists(st.floats(0, 0.01), min_size=50, max_size=300),
)
def test_no_window_ever_admits_more_than_rate_times_window_plus_depth(sizes, gaps):
    clock = Clock()
    adm = Admission(voltypes.profile("gp3", 200 * GiB, iops=6000, throughput=250), clock=clock, trace=10000)
    for length, gap in zip(sizes, gaps):
        clock.t += gap
        adm.admit(0, length, sleep=clock.sleep)
    trace = adm.snapshot()["trace"]
    ops_b, bytes_b = adm.ops_bucket, adm.bytes_bucket
    times = [t for t, _, _ in trace]
    for i in range(len(trace)):
        ops = nbytes = 0
        for j in range(i, len(trace)):
            ops += trace[j][1]
            nbytes += trace[j][2]
            window = times[j] - times[i]
            assert ops <= ops_b.rate * window + ops_b.depth + 1e-6  # float slack on times near 1000 s
            assert nbytes <= bytes_b.rate * window + bytes_b.depth + 0.01


def test_requests_are_admitted_in_order_and_never_refused():
    clock = Clock()
    adm = Admission(Profile(iops=10), clock=clock)
    waits = [adm.reserve(0, 4096) for _ in range(200)]  # all arrive at once
    depth = int(adm.ops_bucket.depth)
    assert waits == sorted(waits) and waits[depth - 1] == 0 and waits[depth] > 0
    assert waits[-1] == pytest.approx((200 - depth) / 10)


# ---- gp2 credits --------------------------------------------------------------------------
def test_gp2_100gib_drains_a_full_bucket_in_about_2000s_and_refills_in_about_5h():
    prof = voltypes.profile("gp2", 100 * GiB)
    assert (prof.iops, prof.credit_rate, prof.credit_depth) == (3000, 300, 5_400_000)
    # Drive 3,000 IOPS with 32 MiB I/Os (128 ops each, to keep the run short); the 128 MiB/s
    # throughput cap of a 100 GiB gp2 would bind first at that size, so this run looks at
    # operations alone.
    prof.bytes_per_second = None
    clock = Clock()
    adm = Admission(prof, clock=clock)
    start = clock.t
    while adm.credit_level()[0] > 200:
        for _ in range(100):
            adm.admit(0, 32 * MiB, sleep=clock.sleep)
    drained = clock.t - start
    assert drained == pytest.approx(5_400_000 / 2700, rel=0.01)  # ~2000 s
    assert adm.burst_balance() < 0.01
    # Drained: the baseline, 300 IOPS.
    t0 = clock.t
    n = drive(adm, clock, 256 * KiB, t0 + 60)
    assert n == pytest.approx(300 * 60, rel=0.02)
    # Idle: refills at the baseline rate, full after ~5 h.
    clock.t += 2.5 * 3600
    assert adm.burst_balance() == pytest.approx(50, abs=1)
    clock.t += 2.5 * 3600 + 10
    assert adm.burst_balance() == 100


def test_gp2_over_1tib_has_no_burst_and_hdd_baselines():
    big = voltypes.limits("gp2", 2 * TiB)
    assert big["iops"] == big["baseline_iops"] == 6144 and big["credits_max"] is None
    assert voltypes.limits("gp2", 100 * GiB)["throughput_mibps"] == 128
    assert voltypes.limits("gp2", 500 * GiB)["throughput_mibps"] == 250
    assert voltypes.limits("gp2", 10 * TiB)["baseline_iops"] == 16000
    st1 = voltypes.limits("st1", 2 * TiB)
    assert (st1["baseline_throughput_mibps"], st1["throughput_mibps"], st1["credits_max"]) == (80, 500, 2 * TiB)
    sc1 = voltypes.limits("sc1", 16 * TiB)
    assert (sc1["baseline_throughput_mibps"], sc1["throughput_mibps"]) == (192, 250)
    assert voltypes.limits("io1", 100 * GiB, iops=5000)["throughput_mibps"] == 500
    assert voltypes.limits("io1", 2 * TiB, iops=48000)["throughput_mibps"] == 750
    assert voltypes.limits("io2", 1 * TiB, iops=10000)["throughput_mibps"] == pytest.approx(2560)
    assert voltypes.limits("io2", 1 * TiB, iops=256000)["throughput_mibps"] == 4000


def test_st1_burst_then_baseline_on_throughput_credits():
    clock = Clock()
    prof = voltypes.profile("st1", 1 * TiB)
    adm = Admission(prof, clock=clock, credits=250 * MiB * 4)  # ~4 s of burst above baseline
    t0 = clock.t
    n_burst = drive(adm, clock, 1 * MiB, t0 + 4)
    assert n_burst == pytest.approx(250 * 4, rel=0.1)
    t1 = clock.t
    while adm.credit_level()[0] > 2 * MiB:
        adm.admit(0, 1 * MiB, sleep=clock.sleep)
    t2 = clock.t
    n = drive(adm, clock, 1 * MiB, t2 + 30)
    assert n == pytest.approx(40 * 30, rel=0.05)  # 40 MiB/s baseline for 1 TiB
    assert t1 >= t0


def test_scheduled_profile_applies_at_its_time_and_keeps_the_balance_fraction():
    clock = Clock()
    adm = Admission(voltypes.profile("gp2", 100 * GiB), clock=clock, credits=2_700_000)
    adm.schedule(voltypes.profile("gp2", 200 * GiB), clock.t + 5)
    assert adm.profile.credit_rate == 300
    clock.t += 5
    adm.reserve(0, 4096)
    assert adm.profile.credit_rate == 600
    assert adm.burst_balance() == pytest.approx(50, abs=0.1)
    adm.set_credits(0)
    assert adm.burst_balance() == pytest.approx(0, abs=0.01)


def test_unlimited_raw_has_no_admission_cost():
    assert voltypes.profile("raw", 1 * TiB).unlimited
    clock = Clock()
    adm = Admission(voltypes.profile("raw", 1 * TiB, iops=100), clock=clock)
    n = drive(adm, clock, 4096, clock.t + 10)
    assert 1000 <= n <= 1000 + adm.ops_bucket.depth + 1


# ---- type rules ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "type_, size, iops, throughput, needle",
    [
        ("gp3", 10 * GiB, 6000, None, "500 IOPS per GiB"),
        ("gp3", 100 * GiB, 2000, None, "3000-80000"),
        ("gp3", 200 * GiB, 90000, None, "3000-80000"),
        ("gp3", 100 * GiB, 3000, 1000, "0.25 MiB/s per provisioned IOPS"),
        ("gp3", 100 * GiB, None, 100, "125-2000"),
        ("gp3", 100 * GiB, None, 3000, "125-2000"),
        ("gp3", 65 * TiB, None, None, "1GiB-64TiB"),
        ("gp3", 512 * MiB, None, None, "1GiB-64TiB"),
        ("gp2", 17 * TiB, None, None, "1GiB-16TiB"),
        ("gp2", 100 * GiB, 500, None, "cannot be provisioned"),
        ("gp2", 100 * GiB, None, 200, "cannot be provisioned"),
        ("io1", 100 * GiB, 6000, None, "50 IOPS per GiB"),
        ("io1", 100 * GiB, None, None, "need --iops"),
        ("io1", 2 * GiB, 100, None, "4GiB-16TiB"),
        ("io1", 2 * TiB, 70000, None, "100-64000"),
        ("io2", 100 * GiB, 200000, None, "1000 IOPS per GiB"),
        ("io2", 1 * TiB, 300000, None, "100-256000"),
        ("io2", 1 * TiB, 50, None, "100-256000"),
        ("io2", 1 * TiB, 10000, 500, "cannot be provisioned"),
        ("st1", 100 * GiB, None, None, "125GiB-16TiB"),
        ("sc1", 20 * TiB, None, None, "125GiB-16TiB"),
        ("st1", 1 * TiB, 500, None, "cannot be provisioned"),
        ("gp9", 1 * TiB, None, None, "invalid volume type"),
    ],
)
def test_invalid_combinations_name_the_limit(type_, size, iops, throughput, needle):
    with pytest.raises(BadInput, match=None) as err:
        voltypes.check(type_, size, iops, throughput)
    assert needle in str(err.value), str(err.value)


@pytest.mark.parametrize(
    "type_, size, iops, throughput",
    [("gp3", 1 * GiB, None, None), ("gp3", 160 * GiB, 80000, 2000), ("gp3", 64 * TiB, None, None),
     ("gp2", 1 * GiB, None, None), ("io2", 4 * GiB, 4000, None), ("io2", 256 * GiB, 256000, None),
     ("io1", 16 * TiB, 64000, None), ("st1", 125 * GiB, None, None), ("sc1", 16 * TiB, None, None),
     ("raw", 4096, None, None), ("raw", 1 * GiB, 5, 1)],
)
def test_valid_combinations(type_, size, iops, throughput):
    voltypes.check(type_, size, iops, throughput)


def test_every_type_cites_its_source_and_date():
    for name, t in voltypes.TYPES.items():
        assert t["source"].startswith("https://docs.aws.amazon.com/"), name
        assert t["as_of"], name


def test_credits_parse_numbers_and_percentages():
    assert voltypes.parse_credits("0%", "gp2", 100 * GiB) == 0
    assert voltypes.parse_credits("50%", "gp2", 100 * GiB) == 2_700_000
    assert voltypes.parse_credits("1000", "gp2", 100 * GiB) == 1000
    assert voltypes.parse_credits("100GiB", "st1", 1 * TiB) == 100 * GiB
    for bad in ("101%", "-1", "lots", "6000000"):
        with pytest.raises(BadInput):
            voltypes.parse_credits(bad, "gp2", 100 * GiB)
    with pytest.raises(BadInput, match="no burst credits"):
        voltypes.parse_credits("10%", "gp3", 100 * GiB)
