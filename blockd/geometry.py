"""Geometry: how a byte range maps onto chunks and 4 KiB blocks.

Pure arithmetic, no I/O.  A volume is cut into chunks (one sparse file each,
default 4 MiB) and each chunk into 4 KiB blocks, the unit of checksums.

    offset                                    offset+length
      |<------------------- request ------------------->|
   ...|....chunk k....|..........chunk k+1..........|..chunk k+2..|...
      ^ seg 0 (tail)  ^ seg 1 (whole chunk)         ^ seg 2 (head)

Each segment is then widened to whole blocks: the head and tail blocks of an
unaligned write are read-modify-written by the caller.
"""

from collections import namedtuple

BLOCK_SIZE = 4096
DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024  # 1024 checksums (8 KiB) per chunk; a file per 4 MiB keeps dirs small

Segment = namedtuple(
    "Segment",
    [
        "chunk_index",  # which chunk file
        "chunk_offset",  # byte offset of the request part inside the chunk
        "length",  # bytes of the request inside this chunk
        "buf_offset",  # where this part starts inside the request buffer
    ],
)


def check_chunk_size(chunk_size):
    if chunk_size < BLOCK_SIZE or chunk_size % BLOCK_SIZE or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk size {chunk_size} must be a power of two multiple of {BLOCK_SIZE}")
    return chunk_size


def segments(offset, length, chunk_size):
    """Split ``[offset, offset+length)`` into per-chunk segments."""
    out = []
    buf_offset = 0
    while length > 0:
        chunk_index, chunk_offset = divmod(offset, chunk_size)
        part = min(length, chunk_size - chunk_offset)
        out.append(Segment(chunk_index, chunk_offset, part, buf_offset))
        offset += part
        buf_offset += part
        length -= part
    return out


def block_span(chunk_offset, length):
    """First block and block count covering ``[chunk_offset, chunk_offset+length)``."""
    first = chunk_offset // BLOCK_SIZE
    last = (chunk_offset + length + BLOCK_SIZE - 1) // BLOCK_SIZE
    return first, last - first


def inner_blocks(chunk_offset, length):
    """First block and count of the blocks wholly inside the range (for trim)."""
    first = (chunk_offset + BLOCK_SIZE - 1) // BLOCK_SIZE
    last = (chunk_offset + length) // BLOCK_SIZE
    return first, max(0, last - first)


def is_aligned(offset, length):
    return offset % BLOCK_SIZE == 0 and length % BLOCK_SIZE == 0
