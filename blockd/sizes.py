"""Sizes and names: parsing and validation of what operators type.

Owns the grammar of sizes (``10G``, ``16TiB``, ``4096``) and volume names.
Pure functions, no I/O.  Every refusal is a ``BadInput`` whose message is one
line a person can act on.
"""

import re

from .errors import BadInput

BLOCK_SIZE = 4096
# NBD sizes are signed 64-bit on the wire in nbdkit; the largest 4 KiB
# multiple that fits is the largest volume we accept.
MAX_VOLUME_SIZE = (2**63 - 1) // BLOCK_SIZE * BLOCK_SIZE

_BINARY = {"": 1, "K": 1, "M": 2, "G": 3, "T": 4, "P": 5, "E": 6}
_UNITS = {}
for _letter, _power in _BINARY.items():
    if _letter:
        _UNITS[_letter] = 1024**_power
        _UNITS[_letter + "IB"] = 1024**_power
        _UNITS[_letter + "B"] = 1000**_power
_UNITS[""] = 1
_UNITS["B"] = 1

_SIZE_RE = re.compile(r"^\s*([0-9]+)(?:\.([0-9]+))?\s*([A-Za-z]*)\s*$")
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


def parse_size(text):
    """Parse ``text`` into bytes.

    ``K M G T P E`` and ``KiB MiB ...`` are powers of 1024; ``KB MB ...`` are
    powers of 1000; a bare number is bytes.  A fraction is allowed when the
    result is a whole number of bytes (``1.5G``).
    """
    if not isinstance(text, str):
        text = str(text)
    match = _SIZE_RE.match(text)
    if not match:
        raise BadInput(f"invalid size {text!r}: expected a number with an optional unit such as 4096, 10G, 16TiB, 500GB")
    whole, frac, unit = match.groups()
    key = unit.upper()
    # Accept "Ki" style without the trailing B too? No: keep the grammar small and documented.
    if key not in _UNITS:
        raise BadInput(f"invalid size {text!r}: unknown unit {unit!r} (use K/M/G/T/P/E, KiB..EiB or KB..EB)")
    multiplier = _UNITS[key]
    if frac:
        numerator = int(whole + frac) * multiplier
        denominator = 10 ** len(frac)
        if numerator % denominator:
            raise BadInput(f"invalid size {text!r}: not a whole number of bytes")
        return numerator // denominator
    return int(whole) * multiplier


def format_size(length):
    """Human form with binary units, exact when possible: 8GiB, 1.5TiB, 4096B."""
    for suffix, power in (("EiB", 6), ("PiB", 5), ("TiB", 4), ("GiB", 3), ("MiB", 2), ("KiB", 1)):
        unit = 1024**power
        if length >= unit:
            if length % unit == 0:
                return f"{length // unit}{suffix}"
            return f"{length / unit:.2f}{suffix}"
    return f"{length}B"


def check_volume_size(length, text=None):
    """Refuse a size that is not a positive multiple of 4 KiB up to MAX_VOLUME_SIZE."""
    shown = text if text is not None else str(length)
    if length <= 0:
        raise BadInput(f"invalid volume size {shown}: must be positive; the smallest valid size is 4096 (4KiB)")
    if length > MAX_VOLUME_SIZE:
        raise BadInput(
            f"invalid volume size {shown}: larger than the maximum {MAX_VOLUME_SIZE} bytes; "
            f"the nearest valid size is {MAX_VOLUME_SIZE}"
        )
    if length % BLOCK_SIZE:
        down = length // BLOCK_SIZE * BLOCK_SIZE
        up = down + BLOCK_SIZE
        nearest = up if (length - down) * 2 >= BLOCK_SIZE or down == 0 else down
        if nearest > MAX_VOLUME_SIZE:
            nearest = down
        raise BadInput(
            f"invalid volume size {shown} ({length} bytes): must be a multiple of 4096; "
            f"the nearest valid size is {nearest} ({format_size(nearest)})"
        )
    return length


def parse_volume_size(text):
    return check_volume_size(parse_size(text), text)


def check_name(name, what="volume"):
    """Volume (and peer) names: ``[a-z0-9][a-z0-9._-]{0,62}``."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise BadInput(
            f"invalid {what} name {name!r}: use 1-63 characters of a-z 0-9 . _ -, starting with a letter or digit"
        )
    return name
