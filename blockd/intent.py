"""The write-intent log: which chunks may differ from their durable checksums.

Rules (the md write-intent bitmap idea):
- a chunk is recorded, and the record made durable, before the first write to
  it since the last completed flush;
- a chunk is removed only after its data and its checksums are durable;
- at start-up every recorded chunk has its checksums recomputed from the data
  actually on disk, so a crash never produces a false checksum alarm.

On disk: an append-only file of little-endian u64 records.  A record is a
chunk index (added) or a chunk index with the top bit set (removed).  Extra
"added" records are always safe (they only cost a recompute), so a torn tail
(zeros, or a partial record) is harmless: zeros read as "chunk 0 added".
When the file grows large it is rewritten (temp file, fsync, rename, fsync dir).
This module does I/O only through the ``Files`` interface.
"""

import os
import struct

REMOVED = 1 << 63
_REC = struct.Struct("<Q")
COMPACT_AFTER_RECORDS = 4096  # keeps start-up scans and the file tiny


class IntentLog:
    def __init__(self, files, path):
        self._files = files
        self._path = path
        self._fd = None
        self._records = 0
        self.chunks = set()

    def load(self):
        """Read the durable set; a missing file is an empty set."""
        self.chunks = set()
        self._records = 0
        if not self._files.exists(self._path):
            return self.chunks
        fd = self._files.open(self._path)
        try:
            size = self._files.size(fd)
            buf = bytearray(size)
            if size:
                self._files.pread_into(fd, memoryview(buf), 0)
        finally:
            self._files.close(fd)
        usable = size - size % _REC.size
        for (value,) in _REC.iter_unpack(bytes(buf[:usable])):
            if value & REMOVED:
                self.chunks.discard(value & ~REMOVED)
            else:
                self.chunks.add(value)
            self._records += 1
        return self.chunks

    def _open(self):
        if self._fd is None:
            existed = self._files.exists(self._path)
            self._fd = self._files.open(self._path, create=True)
            self._end = self._files.size(self._fd)
            self._end -= self._end % _REC.size
            if not existed:
                self._files.fsync_dir(os.path.dirname(self._path))
        return self._fd

    def _append(self, values):
        fd = self._open()
        data = b"".join(_REC.pack(v) for v in values)
        self._files.pwrite(fd, data, self._end)
        self._files.fdatasync(fd)
        self._end += len(data)
        self._records += len(values)

    def add(self, chunk_indexes):
        """Durably record chunks before they are written."""
        new = [c for c in chunk_indexes if c not in self.chunks]
        if not new:
            return
        self._append(new)
        self.chunks.update(new)

    def remove(self, chunk_indexes):
        """Durably forget chunks whose data and checksums are now durable."""
        gone = [c for c in chunk_indexes if c in self.chunks]
        if not gone:
            return
        self.chunks.difference_update(gone)
        if self._records + len(gone) > max(COMPACT_AFTER_RECORDS, 2 * len(self.chunks)):
            self.rewrite()
        else:
            self._append([c | REMOVED for c in gone])

    def rewrite(self):
        """Replace the file with just the current set (temp, fsync, rename, fsync dir)."""
        tmp = self._path + ".tmp"
        self._files.unlink(tmp)
        fd = self._files.open(tmp, create=True)
        try:
            data = b"".join(_REC.pack(c) for c in sorted(self.chunks))
            if data:
                self._files.pwrite(fd, data, 0)
            self._files.fsync(fd)
        finally:
            self._files.close(fd)
        self.close()
        self._files.rename(tmp, self._path)
        self._files.fsync_dir(os.path.dirname(self._path))
        self._records = len(self.chunks)

    def close(self):
        if self._fd is not None:
            self._files.close(self._fd)
            self._fd = None
