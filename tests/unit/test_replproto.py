"""The replication wire format and the replica state machine, with bytes only (no zmq)."""

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blockd import replproto as rp


def frames(type_=rp.WRITE, version=rp.VERSION, flags=0, volume=7, epoch=3, seq=9, offset=4096, length=8192,
           sums=None, data=None):
    data = bytes(length) if data is None else data
    sums = bytes(8 * (length // 4096)) if sums is None else sums
    header = rp.HEADER.pack(version, type_, flags, volume, epoch, seq, offset, length)
    return [header, sums, data]


def test_round_trip_keeps_every_field():
    msg = rp.Message(rp.WRITE, volume=2**62, epoch=5, seq=123456, offset=1 << 40, length=4096, flags=rp.FUA,
                     sums=b"\x01" * 8, data=b"\x02" * 4096)
    back = rp.decode(rp.encode(msg))
    for field in ("type", "volume", "epoch", "seq", "offset", "length", "flags"):
        assert getattr(back, field) == getattr(msg, field)
    assert bytes(back.sums) == msg.sums and bytes(back.data) == msg.data
    assert rp.HEADER.size == 40


def test_json_messages():
    m = rp.decode(rp.encode(rp.json_message(rp.CREATE, {"name": "v", "size": 4096}, volume=1, seq=2)))
    assert m.json() == {"name": "v", "size": 4096}
    bad = rp.Message(rp.CREATE, length=3, data=b"[1]")
    with pytest.raises(rp.ProtocolError, match="JSON object"):
        rp.decode(rp.encode(bad)).json()


@pytest.mark.parametrize(
    "bad, needle",
    [
        (frames()[:2], "expected 3 frames"),
        (frames() + [b""], "expected 3 frames"),
        ("not frames", "expected 3 frames"),
        ([frames()[0][:39], b"", b""], "header is 39 bytes"),
        ([frames()[0] + b"x", b"", b""], "header is 41 bytes"),
        (frames(version=2), "protocol version 2"),
        (frames(version=0), "protocol version 0"),
        (frames(type_=99), "unknown message type 99"),
        (frames(flags=0x80), "unknown flags"),
        (frames(offset=100), "not whole 4 KiB blocks"),
        (frames(length=4095, data=bytes(4095), sums=b""), "not whole 4 KiB blocks"),
        (frames(data=bytes(4096)), "data frame has 4096"),  # truncated data
        (frames(sums=bytes(8)), "checksums for 2 blocks"),
        (frames(length=rp.MAX_DATA + 4096, data=bytes(rp.MAX_DATA + 4096)), "at most"),  # oversized
        (frames(type_=rp.FLUSH, length=0, data=b"x", sums=b""), "carries no payload"),
        (frames(type_=rp.HEARTBEAT, length=0, data=b"", sums=b"12345678"), "carries no payload"),
        (frames(type_=rp.SUMS, length=0, data=b"", sums=b""), "a request carries a range"),
        (frames(type_=rp.READ, length=4096, data=b"x", sums=b""), "a request carries a range"),
        (frames(type_=rp.ACK, length=0, data=b"", sums=b"123"), "not whole u64s"),
        (frames(type_=rp.CREATE, length=10, data=b"{}", sums=b""), "header says 10 bytes"),
    ],
)
def test_malformed_messages_are_refused_with_a_reason(bad, needle):
    with pytest.raises(rp.ProtocolError) as err:
        rp.decode(bad)
    assert needle in str(err.value)


@given(st.lists(st.binary(max_size=64), min_size=0, max_size=5))
def test_arbitrary_bytes_never_crash_the_decoder(junk):
    try:
        rp.decode(junk)
    except rp.ProtocolError:
        pass


@given(st.binary(min_size=40, max_size=40), st.binary(max_size=32), st.binary(max_size=9000))
def test_arbitrary_headers_decode_or_are_refused(header, sums, data):
    try:
        m = rp.decode([header, sums, data])
    except rp.ProtocolError:
        return
    version = struct.unpack("!B", header[:1])[0]
    assert version == rp.VERSION and m.type in rp.NAMES


def test_state_machine_paths():
    s = rp.ReplicaState()
    assert s.state == rp.IN_SYNC and s.counts and s.receives_writes
    assert s.on("missed") == rp.OUT_OF_SYNC and not s.counts and not s.receives_writes
    assert s.on("missed") == rp.OUT_OF_SYNC
    assert s.on("reconnected") == rp.RESYNCING and not s.counts and s.receives_writes
    assert s.on("missed") == rp.OUT_OF_SYNC
    s.on("reconnected")
    assert s.on("resynced") == rp.IN_SYNC and s.counts
    assert s.on("stale_epoch") == rp.FENCED
    with pytest.raises(rp.BadTransition):
        s.on("reconnected")
    with pytest.raises(rp.BadTransition):
        s.on("resynced")
    with pytest.raises(rp.BadTransition):
        rp.ReplicaState().on("resynced")
    with pytest.raises(rp.BadTransition):
        rp.ReplicaState().on("teleport")
    with pytest.raises(ValueError):
        rp.ReplicaState("confused")
