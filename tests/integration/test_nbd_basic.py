"""A real nbdkit serving the real plugin, driven through libnbd."""

import os
import random

import nbd
import pytest

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
CHUNK = 4 * MiB


def test_unaligned_io_across_chunk_boundaries(server):
    h = server.connect("vol0")
    rng = random.Random(7)
    model = bytearray(h.get_size())
    cases = [
        (CHUNK - 1000, 3 * MiB + 123),  # starts in chunk 0, ends inside chunk 1
        (7, 100),  # inside one block
        (4095, 2),  # straddles a block boundary
        (2 * CHUNK - 1, 2),  # straddles a chunk boundary
        (0, 4096),
        (5 * CHUNK + 512, 9 * 4096),
        (h.get_size() - 513, 513),  # the very end
    ]
    for offset, length in cases:
        data = rng.randbytes(length)
        h.pwrite(data, offset)
        model[offset : offset + length] = data
    for offset, length in cases:
        assert h.pread(length, offset) == bytes(model[offset : offset + length])
    # A read spanning everything written, in odd-sized pieces.
    for offset in range(0, 12 * MiB, 1_000_003):
        length = min(1_000_003, h.get_size() - offset)
        assert h.pread(length, offset) == bytes(model[offset : offset + length])
    h.flush()
    h.shutdown()


def test_advertised_capabilities(server):
    h = server.connect("vol0")
    assert h.get_size() == 64 * MiB
    assert h.can_flush() and h.can_fua() and h.can_trim() and h.can_zero()
    assert h.can_fast_zero() and h.can_multi_conn() and h.can_cache()
    assert h.can_meta_context("base:allocation")
    assert not h.is_read_only()
    h.shutdown()


def test_unknown_export_refused_at_handshake(server):
    with pytest.raises(nbd.Error):
        server.connect("no-such-volume")


def test_read_past_end_fails(server):
    h = server.connect("vol0")
    with pytest.raises(nbd.Error):
        h.pread(4096, 64 * MiB - 2048)
    with pytest.raises(nbd.Error):
        h.pwrite(b"x" * 4096, 64 * MiB)
    h.shutdown()


def test_volume_created_while_running_is_attachable(server, cli):
    cli("volume", "create", "late", "--size", "1GiB", check=True)
    h = server.connect("late")
    assert h.get_size() == 1 << 30
    h.pwrite(b"hello", 0)
    assert h.pread(5, 0) == b"hello"
    h.shutdown()


def test_block_status_reports_holes_after_trim_and_zero(server):
    h = server.connect("vol0")
    h.pwrite(os.urandom(8 * MiB), 0)

    def extents(offset, length):
        out = []

        def cb(meta, off, entries, err):
            if meta == "base:allocation":
                out.extend(zip(entries[0::2], entries[1::2]))

        h.block_status(length, offset, cb)
        return out

    assert extents(0, 8 * MiB)[0][1] == 0  # data
    h.trim(1 * MiB, 1 * MiB)  # libnbd: count first, then offset
    h.zero(2 * MiB, 5 * MiB)
    h.flush()
    for offset, length in ((1 * MiB, 1 * MiB), (5 * MiB, 2 * MiB)):
        runs = extents(offset, length)
        assert sum(n for n, _ in runs) >= length
        covered = 0
        for n, flags in runs:
            if covered >= length:
                break
            assert flags == 3, runs  # hole + zero
            covered += n
    assert extents(3 * MiB, 1 * MiB)[0][1] == 0  # untouched data stays data
    assert h.pread(1 * MiB, 1 * MiB) == bytes(1 * MiB)  # trimmed blocks read as zeros here
    assert h.pread(2 * MiB, 5 * MiB) == bytes(2 * MiB)
    h.shutdown()


def test_resize_while_attached_new_connections_see_the_new_size(server, cli):
    h = server.connect("vol0")
    h.pwrite(b"keep", 0)
    cli("volume", "resize", "vol0", "--size", "128MiB", check=True)
    h2 = server.connect("vol0")
    assert h2.get_size() == 128 * MiB
    h2.pwrite(b"tail", 128 * MiB - 4)
    assert h2.pread(4, 128 * MiB - 4) == b"tail"
    assert h2.pread(4, 0) == b"keep"
    assert h.get_size() == 64 * MiB  # an existing connection keeps its negotiated size
    h.shutdown()
    h2.shutdown()
