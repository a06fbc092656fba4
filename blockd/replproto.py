"""The replication protocol: message framing and the replica state machine.

Pure (no zmq, no I/O): tested with bytes.  A message is a list of frames:

    [header, checksums, data]

``header`` is a fixed 40-byte big-endian struct::

    version u8 | type u8 | flags u16 | volume u64 | epoch u64 | seq u64 | offset u64 | length u32

``volume`` is the volume's replication id (the same on every copy; each node's
own catalog id differs), ``epoch`` the sender's epoch for it, ``seq`` the
per-volume sequence number the primary assigns (a reply carries the seq it
answers), ``offset``/``length`` the byte range.  ``checksums`` is one
little-endian u64 xxh64 per 4 KiB block of ``data`` (WRITE, RESYNC), or
empty.  ``data`` is the payload: block data (WRITE, RESYNC), JSON (HELLO,
CREATE, NACK, STATE, SUMS replies), or empty.

Anything else is refused by ``decode`` with a ``ProtocolError`` naming what
was wrong: a wrong number of frames, a short or long header, an unknown
version or type, an unaligned or oversized range, frame lengths that do not
match the header.  The sink counts and logs those and keeps running.
"""

import json
import struct

from .errors import BadInput

VERSION = 1
HEADER = struct.Struct("!BBHQQQQI")
BLOCK = 4096
MAX_DATA = 64 * 1024 * 1024  # a RESYNC carries one chunk (default 4 MiB); writes at most 32 MiB
MAX_JSON = 1024 * 1024

# Message types
HELLO = 1  # primary -> replica: {"node", "volumes": {...}}; reply STATE
WRITE = 2
TRIM = 3
ZERO = 4
FLUSH = 5
RESIZE = 6  # offset = new size
CREATE = 7  # data: JSON {"name", "size", "chunk_size", "type", ...}
DELETE = 8
ACK = 9
NACK = 10  # data: JSON {"error", "code"}
RESYNC = 11  # one whole chunk: offset = chunk start, data + checksums
HEARTBEAT = 12
SUMS = 13  # request checksums of [offset, offset+length); reply ACK with the checksums frame
READ = 14  # request data of [offset, offset+length); reply ACK with data + checksums (read-repair, verify)
STATE = 15  # reply to HELLO: JSON {"volumes": {...}}
CHUNKS = 16  # request the chunk indexes a copy holds (files, and any its intent log names) from index
#              ``offset`` on, at most ``length`` of them; reply ACK with them as u64s in the checksums
#              frame (fewer than asked: the last page).  After a promotion of a volume too big to compare whole.

NAMES = {
    HELLO: "HELLO", WRITE: "WRITE", TRIM: "TRIM", ZERO: "ZERO", FLUSH: "FLUSH", RESIZE: "RESIZE",
    CREATE: "CREATE", DELETE: "DELETE", ACK: "ACK", NACK: "NACK", RESYNC: "RESYNC", HEARTBEAT: "HEARTBEAT",
    SUMS: "SUMS", READ: "READ", STATE: "STATE", CHUNKS: "CHUNKS",
}

# Flags
FUA = 1  # make it durable before the ACK
FULL = 2  # HELLO/RESYNC: the replica lost its copy: full resync
SESSION = 4  # CREATE: the primary (re)opened its session with this copy: a WRITE, TRIM, ZERO or RESYNC
#              with an older seq at the same epoch was sent before it, counted as missed, and is refused

_BLOCK_RANGED = {WRITE, RESYNC, SUMS, READ}  # offset and length must be whole blocks
_NEEDS_DATA = {WRITE, RESYNC}
_JSON_DATA = {HELLO, CREATE, NACK, STATE}


class ProtocolError(BadInput):
    """A message that does not follow the protocol (refused, counted, logged)."""


class Message:
    __slots__ = ("type", "flags", "volume", "epoch", "seq", "offset", "length", "sums", "data")

    def __init__(self, type, volume=0, epoch=0, seq=0, offset=0, length=0, flags=0, sums=b"", data=b""):
        self.type = type
        self.flags = flags
        self.volume = volume
        self.epoch = epoch
        self.seq = seq
        self.offset = offset
        self.length = length
        self.sums = sums
        self.data = data

    def __repr__(self):
        return (f"Message({NAMES.get(self.type, self.type)}, volume={self.volume}, epoch={self.epoch}, "
                f"seq={self.seq}, offset={self.offset}, length={self.length}, flags={self.flags})")

    def json(self):
        try:
            value = json.loads(bytes(self.data))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ProtocolError(f"{NAMES.get(self.type)}: payload is not JSON: {exc}") from None
        if not isinstance(value, dict):
            raise ProtocolError(f"{NAMES.get(self.type)}: payload must be a JSON object")
        return value


def encode(msg):
    """Frames for ``msg`` (header, checksums, data); data is passed through without a copy."""
    header = HEADER.pack(VERSION, msg.type, msg.flags, msg.volume, msg.epoch, msg.seq, msg.offset, msg.length)
    return [header, msg.sums, msg.data]


def json_message(type, payload, **fields):
    data = json.dumps(payload, separators=(",", ":")).encode()
    return Message(type, length=len(data), data=data, **fields)


def decode(frames):
    """Parse and validate frames into a Message; ProtocolError if anything is off."""
    if not isinstance(frames, (list, tuple)) or len(frames) != 3:
        count = len(frames) if isinstance(frames, (list, tuple)) else "?"
        raise ProtocolError(f"expected 3 frames (header, checksums, data), got {count}")
    header, sums, data = (bytes(f) if not isinstance(f, (bytes, memoryview)) else f for f in frames)
    if len(header) != HEADER.size:
        raise ProtocolError(f"header is {len(header)} bytes, expected {HEADER.size}")
    version, type_, flags, volume, epoch, seq, offset, length = HEADER.unpack(bytes(header))
    if version != VERSION:
        raise ProtocolError(f"protocol version {version}, this node speaks {VERSION}")
    if type_ not in NAMES:
        raise ProtocolError(f"unknown message type {type_}")
    name = NAMES[type_]
    if flags & ~(FUA | FULL | SESSION):
        raise ProtocolError(f"{name}: unknown flags {flags:#x}")
    if type_ in _BLOCK_RANGED and (offset % BLOCK or length % BLOCK):
        raise ProtocolError(f"{name}: range [{offset}, +{length}) is not whole 4 KiB blocks")
    limit = MAX_JSON if type_ in _JSON_DATA else MAX_DATA
    if len(data) > limit:
        raise ProtocolError(f"{name}: {len(data)} bytes of data, at most {limit}")
    if type_ in _NEEDS_DATA:
        if length == 0 or len(data) != length:
            raise ProtocolError(f"{name}: header says {length} bytes, data frame has {len(data)}")
        if len(sums) != length // BLOCK * 8:
            raise ProtocolError(f"{name}: {len(sums)} bytes of checksums for {length // BLOCK} blocks")
    elif type_ in _JSON_DATA:
        if len(data) != length:
            raise ProtocolError(f"{name}: header says {length} bytes, data frame has {len(data)}")
    elif type_ in (SUMS, READ):
        if length == 0 or length > MAX_DATA or len(data) or len(sums):
            raise ProtocolError(f"{name}: a request carries a range of 1 block to {MAX_DATA} bytes and no payload")
    elif type_ == ACK:
        if len(sums) % 8:
            raise ProtocolError(f"ACK: checksum frame of {len(sums)} bytes is not whole u64s")
    elif len(data) or len(sums):
        raise ProtocolError(f"{name}: carries no payload, got {len(sums)} + {len(data)} bytes")
    return Message(type_, volume, epoch, seq, offset, length, flags, sums, data)


# ---- the replica state machine ----------------------------------------------------------
IN_SYNC = "in_sync"
OUT_OF_SYNC = "out_of_sync"
RESYNCING = "resyncing"
FENCED = "fenced"
STATES = (IN_SYNC, OUT_OF_SYNC, RESYNCING, FENCED)
# What a replica copy's own record can say besides its primary's word (DataDir.replica_sync_state):
EMPTY = "empty"  # its data is gone (wiped), or it was recreated where its primary had one: full resync due
UNCONFIRMED = "unconfirmed"  # in sync when its node (re)started; no primary has said so since

# event -> {from state: to state}
_TRANSITIONS = {
    "missed": {IN_SYNC: OUT_OF_SYNC, RESYNCING: OUT_OF_SYNC, OUT_OF_SYNC: OUT_OF_SYNC},  # ack deadline or disconnect
    "reconnected": {OUT_OF_SYNC: RESYNCING},
    "resynced": {RESYNCING: IN_SYNC},
    "stale_epoch": {IN_SYNC: FENCED, OUT_OF_SYNC: FENCED, RESYNCING: FENCED, FENCED: FENCED},
}


class BadTransition(Exception):
    pass


class ReplicaState:
    """What the primary believes about one replica of one volume.

    in_sync --missed--> out_of_sync --reconnected--> resyncing --resynced--> in_sync;
    any --stale_epoch--> fenced (the peer holds a newer epoch: this primary is superseded).
    Only an in-sync replica counts toward a write's quorum.
    """

    __slots__ = ("state", "changes")

    def __init__(self, state=IN_SYNC):
        if state not in STATES:
            raise ValueError(f"unknown replica state {state!r}")
        self.state = state
        self.changes = 0

    def on(self, event):
        table = _TRANSITIONS.get(event)
        if table is None:
            raise BadTransition(f"unknown event {event!r}")
        new = table.get(self.state)
        if new is None:
            raise BadTransition(f"{event} in state {self.state}")
        if new != self.state:
            self.changes += 1
        self.state = new
        return new

    @property
    def counts(self):
        return self.state == IN_SYNC

    @property
    def receives_writes(self):
        """In-sync and resyncing replicas are sent every write (a resyncing one does not count yet)."""
        return self.state in (IN_SYNC, RESYNCING)
