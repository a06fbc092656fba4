"""The small-read fast path: read from the page cache and verify in one kernel call.

Owns one numba kernel that does, without releasing the GIL and without a
single Python-level step in between: "are these blocks holes by our records?
then zeros" / ``preadv2(RWF_NOWAIT)`` (copy from the page cache, never wait
for the disk) / verify every block's xxh64.  Per 4 KiB read this replaces
about six Python calls, locks and GIL hand-offs with one.

It decides nothing: a result other than ``OK`` means "not settled here" and
the caller takes the ordinary path (locks, ``os.preadv``, error reporting).
No writes, ever.
"""

import numba
import numpy as np
from numba import types

from .checksum import ZERO_BLOCK_HASH, equal_count, mismatches

RWF_NOWAIT = 0x08
OK = 0
NOT_CACHED = -1  # not (entirely) in the page cache, or any read error
MISMATCH = -2  # some block failed its checksum: re-check under the range lock
MAX_BYTES = 64 * 1024  # bigger reads release the GIL on the ordinary path

# Resolved by name in this process (libc), so the kernel can be cached on disk.
_preadv2 = types.ExternalFunction("preadv2", types.intp(types.intc, types.intp, types.intc, types.int64, types.intc))
_ZERO = np.uint64(ZERO_BLOCK_HASH)


@numba.njit(cache=True)
def read_verify(fd, data, offset, expected):
    """Fill ``data`` from ``fd`` at ``offset`` if cached, and verify against ``expected``."""
    if equal_count(expected, _ZERO) == expected.shape[0]:
        data[:] = 0
        return OK
    iov = np.empty(2, np.uint64)
    iov[0] = data.ctypes.data
    iov[1] = data.size
    if _preadv2(fd, iov.ctypes.data, 1, offset, RWF_NOWAIT) != data.size:
        return NOT_CACHED
    if mismatches(data, expected):
        return MISMATCH
    return OK


def warm():
    import os
    import tempfile

    with tempfile.TemporaryFile() as f:
        f.write(b"\0" * 4096)
        f.flush()
        data = np.empty(4096, np.uint8)
        sums = np.zeros(1, np.uint64)
        read_verify(f.fileno(), data, 0, sums)
        ro = sums.copy()
        ro.setflags(write=False)
        read_verify(f.fileno(), data, 0, ro)
        os.fsync(f.fileno())
