"""Geometry: byte ranges onto chunks and blocks."""

from hypothesis import given
from hypothesis import strategies as st

from blockd.geometry import block_span, inner_blocks, segments

CHUNK = 64 * 1024


def test_segments_cross_chunk_boundaries():
    segs = segments(CHUNK - 10, 20 + CHUNK, CHUNK)
    assert [(s.chunk_index, s.chunk_offset, s.length, s.buf_offset) for s in segs] == [
        (0, CHUNK - 10, 10, 0),
        (1, 0, CHUNK, 10),
        (2, 0, 10, 10 + CHUNK),
    ]


@given(st.integers(0, 1 << 40), st.integers(0, 5 * CHUNK))
def test_segments_tile_the_range(offset, length):
    segs = segments(offset, length, CHUNK)
    assert sum(s.length for s in segs) == length
    pos = offset
    for s in segs:
        assert s.chunk_index * CHUNK + s.chunk_offset == pos
        assert 0 < s.length <= CHUNK - s.chunk_offset
        assert s.buf_offset == pos - offset
        pos += s.length


def test_block_spans():
    assert block_span(0, 4096) == (0, 1)
    assert block_span(1, 4096) == (0, 2)
    assert block_span(4095, 2) == (0, 2)
    assert inner_blocks(1, 8192) == (1, 1)
    assert inner_blocks(1, 100) == (1, 0)
    assert inner_blocks(0, 8192) == (0, 2)
