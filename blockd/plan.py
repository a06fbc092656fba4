"""Event plans: the TOML file ``blockd provision`` reads.

    [pool]
    logical_limit = "241PiB"       # a target: the limit is raised to this if lower, never lowered

    [[volumes]]                    # one table per group
    name = "prime-{index:05d}"     # str.format pattern; {index} is the only field
    count = 15424                  # default 1
    start = 0                      # first index, default 0
    size = "16TiB"                 # bytes or a size with a unit
    type = "raw"                   # default raw
    iops = 3000                    # optional, provisioned IOPS
    throughput = 125               # optional, provisioned MiB/s

Owns parsing and validation (every refusal names the file and the key) and
turning groups into catalog rows, lazily and in batches, so a plan of a
million volumes never sits in memory at once.  Pure: no I/O beyond reading
the file.
"""

import string
import tomllib

from . import voltypes
from .catalog import PROVISION_BATCH, check_qos, check_type
from .errors import BadInput
from .sizes import NAME_RE, check_volume_size, parse_size

MAX_PLAN_VOLUMES = 10_000_000
_TOP_KEYS = {"pool", "volumes", "description"}
_POOL_KEYS = {"logical_limit"}
_GROUP_KEYS = {"name", "count", "start", "size", "type", "iops", "throughput"}


class Group:
    __slots__ = ("number", "pattern", "count", "start", "size", "type", "iops", "throughput")

    def __init__(self, number, pattern, count, start, size, type_, iops, throughput):
        self.number = number
        self.pattern = pattern
        self.count = count
        self.start = start
        self.size = size
        self.type = type_
        self.iops = iops
        self.throughput = throughput

    def names(self):
        fmt = self.pattern.format
        for index in range(self.start, self.start + self.count):
            yield fmt(index=index)

    def first_and_last(self):
        return self.pattern.format(index=self.start), self.pattern.format(index=self.start + self.count - 1)


class Plan:
    def __init__(self, path, logical_limit, groups, description=None):
        self.path = path
        self.logical_limit = logical_limit
        self.groups = groups
        self.description = description

    @property
    def total_volumes(self):
        return sum(g.count for g in self.groups)

    @property
    def total_bytes(self):
        return sum(g.count * g.size for g in self.groups)

    def batches(self, size=PROVISION_BATCH):
        """Lists of catalog rows (name, size, type, iops, throughput, group), every name checked."""
        batch = []
        fullmatch = NAME_RE.fullmatch
        for g in self.groups:
            row_tail = (g.size, g.type, g.iops, g.throughput, g.number)
            for name in g.names():
                if not fullmatch(name):
                    raise BadInput(
                        f"invalid plan {self.path}: group {g.number} pattern {g.pattern!r} makes the invalid "
                        f"volume name {name!r} (use a-z 0-9 . _ -, at most 63 characters)"
                    )
                batch.append((name, *row_tail))
                if len(batch) >= size:
                    yield batch
                    batch = []
        if batch:
            yield batch


def load(path):
    """Read and validate a plan file; raises BadInput naming the problem."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise BadInput(f"cannot read plan {path}: {exc.strerror}") from None
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise BadInput(f"invalid plan {path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise BadInput(f"invalid plan {path}: TOML: {exc}") from None
    return parse(doc, path)


def parse(doc, path="plan"):
    _known(doc, _TOP_KEYS, path, "the plan")
    description = doc.get("description")
    if description is not None and not isinstance(description, str):
        raise BadInput(f"invalid plan {path}: description must be a string")
    pool = doc.get("pool", {})
    if not isinstance(pool, dict):
        raise BadInput(f"invalid plan {path}: [pool] must be a table")
    _known(pool, _POOL_KEYS, path, "[pool]")
    limit = None
    if "logical_limit" in pool:
        limit = _size(pool["logical_limit"], path, "[pool] logical_limit", volume=False)
    groups_raw = doc.get("volumes", [])
    if not isinstance(groups_raw, list) or not all(isinstance(g, dict) for g in groups_raw):
        raise BadInput(f"invalid plan {path}: volumes must be an array of tables ([[volumes]])")
    if not groups_raw and limit is None:
        raise BadInput(f"invalid plan {path}: nothing to do (no [pool] logical_limit and no [[volumes]])")
    groups = [_group(number, g, path) for number, g in enumerate(groups_raw, 1)]
    total = sum(g.count for g in groups)
    if total > MAX_PLAN_VOLUMES:
        raise BadInput(f"invalid plan {path}: {total} volumes; one plan creates at most {MAX_PLAN_VOLUMES}")
    return Plan(path, limit, groups, description)


def _known(table, allowed, path, where):
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise BadInput(
            f"invalid plan {path}: unknown key {unknown[0]!r} in {where} (allowed: {', '.join(sorted(allowed))})"
        )


def _size(value, path, where, volume=True):
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise BadInput(f"invalid plan {path}: {where} must be a size such as \"16TiB\" or a number of bytes")
    try:
        size = parse_size(value) if isinstance(value, str) else value
        if volume:
            check_volume_size(size, str(value))
        elif size <= 0:
            raise BadInput(f"invalid size {value!r}: must be positive")
    except BadInput as exc:
        raise BadInput(f"invalid plan {path}: {where}: {exc}") from None
    return size


def _whole(value, path, where, low):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise BadInput(f"invalid plan {path}: {where} must be a whole number >= {low}, not {value!r}")
    return value


def _group(number, g, path):
    where = f"[[volumes]] #{number}"
    _known(g, _GROUP_KEYS, path, where)
    for key in ("name", "size"):
        if key not in g:
            raise BadInput(f"invalid plan {path}: {where} needs {key}")
    pattern = g["name"]
    if not isinstance(pattern, str):
        raise BadInput(f"invalid plan {path}: {where} name must be a string pattern such as \"web-{{index:03d}}\"")
    count = _whole(g.get("count", 1), path, f"{where} count", 1)
    start = _whole(g.get("start", 0), path, f"{where} start", 0)
    size = _size(g["size"], path, f"{where} size")
    type_ = g.get("type", "raw")
    try:
        if not isinstance(type_, str):
            raise BadInput(f"invalid volume type {type_!r}")
        check_type(type_)
        check_qos(g.get("iops"), g.get("throughput"))
        voltypes.check(type_, size, g.get("iops"), g.get("throughput"))
    except BadInput as exc:
        raise BadInput(f"invalid plan {path}: {where}: {exc}") from None
    _check_pattern(pattern, count, path, where)
    group = Group(number, pattern, count, start, size, type_, g.get("iops"), g.get("throughput"))
    for name in group.first_and_last():
        if not NAME_RE.fullmatch(name):
            raise BadInput(
                f"invalid plan {path}: {where} name pattern {pattern!r} makes the invalid volume name {name!r} "
                "(use a-z 0-9 . _ -, starting with a letter or digit, at most 63 characters)"
            )
    return group


def _check_pattern(pattern, count, path, where):
    """Only ``{index}`` with an integer format spec; without it, a group names one volume."""
    fields = 0
    try:
        for _literal, field, spec, conversion in string.Formatter().parse(pattern):
            if field is None:
                continue
            if field != "index" or conversion is not None:
                raise BadInput(f"field {{{field}{'!' + conversion if conversion else ''}}} (only {{index}} is allowed)")
            if "{" in (spec or ""):
                raise BadInput("nested fields are not allowed")
            format(0, spec or "")
            fields += 1
    except ValueError as exc:
        raise BadInput(f"invalid plan {path}: {where} name pattern {pattern!r}: {exc}") from None
    except BadInput as exc:
        raise BadInput(f"invalid plan {path}: {where} name pattern {pattern!r}: {exc}") from None
    if fields == 0 and count > 1:
        raise BadInput(
            f"invalid plan {path}: {where} name pattern {pattern!r} has no {{index}} but count is {count}: "
            "every volume needs its own name"
        )

