"""EBS volume types: the published figures, validation, and the QoS profile each gives.

One table, ``TYPES``, holds every figure with where it came from; AWS changes
them (gp3's limits were raised in 2025; since April 2025 every io2 volume is
Block Express), so older figures stay in ``HISTORY``.  docs/volume-types.md
explains each.  ``raw`` is blockd's own: unthrottled unless ``--iops`` or
``--throughput`` caps it.

Pure: no I/O.  Every refusal is a BadInput naming the limit.
"""

from .errors import BadInput
from .qos import Profile
from .sizes import format_size

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40

SOURCE_GP = "https://docs.aws.amazon.com/ebs/latest/userguide/general-purpose.html"
SOURCE_IO = "https://docs.aws.amazon.com/ebs/latest/userguide/provisioned-iops.html"
SOURCE_HDD = "https://docs.aws.amazon.com/ebs/latest/userguide/hdd-vols.html"
SOURCE_MOD = "https://docs.aws.amazon.com/ebs/latest/userguide/modify-volume-requirements.html"

# Figures as of 2026-11 (checked against AWS's user guide pages above).
TYPES = {
    "gp3": {
        "media": "ssd", "min_size": 1 * GiB, "max_size": 64 * TiB,
        "base_iops": 3000, "max_iops": 80000, "iops_per_gib": 500,
        "base_mibps": 125, "max_mibps": 2000, "mibps_per_iops": 0.25,
        "iops_provisionable": True, "throughput_provisionable": True,
        "source": SOURCE_GP, "as_of": "2025-09 (raised from 16 TiB / 16,000 IOPS / 1,000 MiB/s)",
    },
    "gp2": {
        "media": "ssd", "min_size": 1 * GiB, "max_size": 16 * TiB,
        "iops_per_gib": 3, "min_iops": 100, "max_iops": 16000,
        "burst_iops": 3000, "credit_depth": 5_400_000, "max_mibps": 250,
        "small_mibps": 128, "small_max_gib": 170, "full_mibps_from_gib": 334,
        "iops_provisionable": False, "throughput_provisionable": False,
        "source": SOURCE_GP, "as_of": "unchanged since 2018",
    },
    "io2": {
        "media": "ssd", "min_size": 4 * GiB, "max_size": 64 * TiB,
        "min_iops": 100, "max_iops": 256000, "iops_per_gib": 1000, "max_mibps": 4000,
        "mibps_per_iops": 0.256, "iops_provisionable": True, "iops_required": True,
        "throughput_provisionable": False,
        "source": SOURCE_IO, "as_of": "2025-04 (every io2 volume is Block Express)",
    },
    "io1": {
        "media": "ssd", "min_size": 4 * GiB, "max_size": 16 * TiB,
        "min_iops": 100, "max_iops": 64000, "iops_per_gib": 50, "max_mibps": 1000,
        # throughput: 256 KiB x IOPS up to 500 MiB/s at <= 32,000 IOPS; 16 KiB x IOPS above
        "mibps_per_iops": 0.25, "low_iops_max_mibps": 500, "high_iops_from": 32000, "high_mibps_per_iops": 16 / 1024,
        "iops_provisionable": True, "iops_required": True,
        "throughput_provisionable": False,
        "source": SOURCE_IO, "as_of": "unchanged since 2020",
    },
    "st1": {
        "media": "hdd", "min_size": 125 * GiB, "max_size": 16 * TiB,
        "base_mibps_per_tib": 40, "burst_mibps_per_tib": 250, "max_mibps": 500, "max_iops": 500,
        "credit_per_tib": 1 * TiB,
        "iops_provisionable": False, "throughput_provisionable": False,
        "source": SOURCE_HDD, "as_of": "unchanged since 2016",
    },
    "sc1": {
        "media": "hdd", "min_size": 125 * GiB, "max_size": 16 * TiB,
        "base_mibps_per_tib": 12, "burst_mibps_per_tib": 80, "max_mibps": 250, "max_iops": 250,
        "credit_per_tib": 1 * TiB,
        "iops_provisionable": False, "throughput_provisionable": False,
        "source": SOURCE_HDD, "as_of": "unchanged since 2016",
    },
}

HISTORY = {
    "gp3": [{"until": "2025-09", "max_size": 16 * TiB, "max_iops": 16000, "max_mibps": 1000}],
    "io2": [{"until": "2025-04", "note": "io2 without Block Express: 16 TiB, 64,000 IOPS, 1,000 MiB/s"}],
}

VOLUME_TYPES = ("raw", *TYPES)
# EBS asked for six hours between modifications of a volume until January 2026,
# when it moved to "up to four within a rolling 24 hours"; blockd keeps one
# cooldown per pool (default six hours, settable for rehearsals).
MODIFY_COOLDOWN_SECONDS = 6 * 3600
MODIFYING_SECONDS = 1.0  # a modification's "modifying" phase; the new limits apply when it ends
OPTIMIZE_BYTES_PER_SECOND = 16 * GiB  # "optimizing" lasts size / this (1 TiB a minute)


def optimizing_seconds(size):
    return size / OPTIMIZE_BYTES_PER_SECOND


def modification_state(row, now):
    """None (never modified), "modifying", "optimizing" or "completed", from the row's timestamps."""
    if row["mod_started_at"] is None:
        return None
    if now < row["mod_optimizing_at"]:
        return "modifying"
    if now < row["mod_completed_at"]:
        return "optimizing"
    return "completed"


def modification(row, now):
    """The modification as shown: state, progress percent, times, and the figures before it."""
    import json

    state = modification_state(row, now)
    if state is None:
        return None
    span = row["mod_completed_at"] - row["mod_optimizing_at"]
    if state == "modifying":
        progress = 0
    elif state == "optimizing":
        progress = int(100 * (now - row["mod_optimizing_at"]) / span) if span > 0 else 99
    else:
        progress = 100
    return {
        "state": state,
        "progress": progress,
        "started_at": row["mod_started_at"],
        "optimizing_at": row["mod_optimizing_at"],
        "completed_at": row["mod_completed_at"],
        "original": json.loads(row["mod_from"]) if row["mod_from"] else None,
    }


def effective(row, now):
    """(type, size, iops, throughput) whose limits apply at ``now``: the old ones while modifying."""
    import json

    if modification_state(row, now) == "modifying" and row["mod_from"]:
        old = json.loads(row["mod_from"])
        return old["type"], old["size"], old["iops"], old["throughput"]
    return row["type"], row["size"], row["iops"], row["throughput"]


def check(type_, size, iops=None, throughput=None):
    """Refuse an invalid type/size/IOPS/throughput combination, naming the limit."""
    if type_ == "raw":
        return
    t = TYPES.get(type_)
    if t is None:
        raise BadInput(f"invalid volume type {type_!r}: known types are {', '.join(VOLUME_TYPES)}")
    if not t["min_size"] <= size <= t["max_size"]:
        raise BadInput(
            f"invalid size {format_size(size)} for {type_}: {type_} volumes are "
            f"{format_size(t['min_size'])}-{format_size(t['max_size'])}"
        )
    gib = size / GiB
    if iops is not None and not t["iops_provisionable"]:
        raise BadInput(f"invalid --iops for {type_}: {type_} IOPS follow from the size and cannot be provisioned")
    if throughput is not None and not t["throughput_provisionable"]:
        raise BadInput(
            f"invalid --throughput for {type_}: {type_} throughput follows from "
            f"{'the IOPS' if t['media'] == 'ssd' else 'the size'} and cannot be provisioned"
        )
    if t.get("iops_required") and iops is None:
        raise BadInput(
            f"{type_} volumes need --iops ({t['min_iops']}-{t['max_iops']}, at most {t['iops_per_gib']} per GiB)"
        )
    if iops is not None:
        low = t.get("base_iops", t.get("min_iops", 1))
        if not low <= iops <= t["max_iops"]:
            raise BadInput(f"invalid --iops {iops} for {type_}: {type_} takes {low}-{t['max_iops']} IOPS")
        if iops > low and iops > t["iops_per_gib"] * gib:
            raise BadInput(
                f"invalid --iops {iops} for a {format_size(size)} {type_} volume: at most {t['iops_per_gib']} IOPS "
                f"per GiB ({int(t['iops_per_gib'] * gib)} for this size)"
            )
    if throughput is not None:
        low, high = t["base_mibps"], t["max_mibps"]
        if not low <= throughput <= high:
            raise BadInput(f"invalid --throughput {throughput} for {type_}: {type_} takes {low}-{high} MiB/s")
        effective_iops = iops if iops is not None else t["base_iops"]
        cap = effective_iops * t["mibps_per_iops"]
        if throughput > low and throughput > cap:
            raise BadInput(
                f"invalid --throughput {throughput} for {type_} with {effective_iops} IOPS: at most "
                f"{t['mibps_per_iops']} MiB/s per provisioned IOPS ({cap:g} MiB/s)"
            )


def limits(type_, size, iops=None, throughput=None):
    """The effective figures: baseline/burst IOPS and MiB/s and the credit bucket (for show and QoS)."""
    gib = size / GiB
    tib = size / TiB
    if type_ == "raw":
        return {"iops": iops, "throughput_mibps": throughput, "baseline_iops": iops,
                "baseline_throughput_mibps": throughput, "credits_max": None, "credit_unit": None}
    t = TYPES[type_]
    if type_ == "gp3":
        i = iops if iops is not None else t["base_iops"]
        m = throughput if throughput is not None else t["base_mibps"]
        return {"iops": i, "throughput_mibps": m, "baseline_iops": i, "baseline_throughput_mibps": m,
                "credits_max": None, "credit_unit": None}
    if type_ == "gp2":
        base = int(min(t["max_iops"], max(t["min_iops"], t["iops_per_gib"] * gib)))
        bursts = base < t["burst_iops"]
        # 128 MiB/s up to 170 GiB, 250 from 334 GiB; in between AWS gives 250 only
        # while credits last: modelled as 250 (the bucket throttles IOPS, not bytes).
        mibps = t["small_mibps"] if gib <= t["small_max_gib"] else t["max_mibps"]
        base_mibps = t["max_mibps"] if gib >= t["full_mibps_from_gib"] else t["small_mibps"]
        return {"iops": t["burst_iops"] if bursts else base, "throughput_mibps": mibps,
                "baseline_iops": base, "baseline_throughput_mibps": base_mibps,
                "credits_max": t["credit_depth"] if bursts else None, "credit_unit": "ops" if bursts else None}
    if iops is None and t.get("iops_required"):
        iops = t["min_iops"]  # a copy made before replicas kept their IOPS: never a crash, the lowest figure
    if type_ == "io1":
        if iops <= t["high_iops_from"]:
            m = min(t["low_iops_max_mibps"], iops * t["mibps_per_iops"])
        else:
            m = min(t["max_mibps"], iops * t["high_mibps_per_iops"])
        return {"iops": iops, "throughput_mibps": m, "baseline_iops": iops, "baseline_throughput_mibps": m,
                "credits_max": None, "credit_unit": None}
    if type_ == "io2":
        m = min(t["max_mibps"], iops * t["mibps_per_iops"])
        return {"iops": iops, "throughput_mibps": m, "baseline_iops": iops, "baseline_throughput_mibps": m,
                "credits_max": None, "credit_unit": None}
    # st1 / sc1: throughput-bound, burst on credits
    base = min(t["max_mibps"], t["base_mibps_per_tib"] * tib)
    burst = min(t["max_mibps"], t["burst_mibps_per_tib"] * tib)
    return {"iops": t["max_iops"], "throughput_mibps": burst, "baseline_iops": t["max_iops"],
            "baseline_throughput_mibps": base, "credits_max": int(t["credit_per_tib"] * tib),
            "credit_unit": "bytes"}


def profile(type_, size, iops=None, throughput=None):
    """The QoS profile (qos.Profile) for a volume; unlimited for a raw volume without caps."""
    lim = limits(type_, size, iops, throughput)
    hdd = type_ in TYPES and TYPES[type_]["media"] == "hdd"
    p = Profile(
        iops=lim["iops"],
        bytes_per_second=lim["throughput_mibps"] * MiB if lim["throughput_mibps"] else None,
        hdd=hdd,
    )
    if lim["credits_max"]:
        p.credit_depth = lim["credits_max"]
        p.credit_unit = lim["credit_unit"]
        p.credit_rate = lim["baseline_iops"] if lim["credit_unit"] == "ops" else lim["baseline_throughput_mibps"] * MiB
    return p


def parse_credits(text, type_, size):
    """``--initial-credits N`` / ``N%``: I/O credits (gp2) or bytes of throughput credit (st1/sc1)."""
    lim = limits(type_, size)
    depth = lim["credits_max"]
    if depth is None:
        raise BadInput(f"invalid credits: {type_} volumes of {format_size(size)} have no burst credits")
    text = str(text).strip()
    try:
        if text.endswith("%"):
            pct = float(text[:-1])
            if not 0 <= pct <= 100:
                raise ValueError
            return depth * pct / 100
        if lim["credit_unit"] == "bytes":
            from .sizes import parse_size

            value = parse_size(text)
        else:
            value = int(text)
    except (ValueError, BadInput):
        raise BadInput(
            f"invalid credits {text!r}: a number of {'bytes' if lim['credit_unit'] == 'bytes' else 'I/O credits'} "
            f"up to {depth} or a percentage such as 0% or 50%"
        ) from None
    if not 0 <= value <= depth:
        raise BadInput(f"invalid credits {text!r}: the bucket holds 0-{depth}")
    return float(value)


def restored_credits(row, now):
    """(balance, depth) of the burst bucket at wall time ``now``: the stored balance plus what
    accrued at the baseline rate since, capped; a full bucket if none was stored.  None: no credits."""
    p = profile(*effective(row, now))
    if not p.credit_rate:
        return None
    if row["credits"] is None:
        return float(p.credit_depth), float(p.credit_depth)
    elapsed = max(0.0, now - (row["credits_at"] or now))
    return min(float(p.credit_depth), row["credits"] + p.credit_rate * elapsed), float(p.credit_depth)
