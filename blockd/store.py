"""The chunk store: one volume's sparse chunk files, checksums and intent log.

Owns the bytes on disk for one volume directory:

    volumes/<id>/
        <chunk_index:016x>.chunk   sparse, chunk_size bytes, holes read as zeros
        checksums                  u64 xxh64 per 4 KiB block, chunk c at c*8*blocks_per_chunk
        intent.log                 chunks that may differ from their durable checksums

The store keeps every touched chunk's checksums in memory, makes them durable
on flush, and recomputes them at open for chunks named in the intent log.  It
never interprets requests (that is the volume's job) and never decides policy;
it performs file I/O only through a ``Files`` object.

Locking: ``_lock`` guards the maps and the dirty set.  File descriptors are
pinned while in use so the LRU never closes one under a reader.  At most
MAX_OPEN_CHUNKS descriptors stay open per volume, dirty ones included: flush
reopens a closed dirty chunk to fdatasync it (Linux reports an unseen
writeback error to a descriptor opened after it).

The checksums file stores each sum XOR the zero-block hash, so never-written
and zero blocks are stored as 0 and whole zero pages are punched: a chunk
with one written block costs one 4 KiB page of checksums, not 8 KiB.
"""

import collections
import os
import threading

import numpy as np

from . import checksum
from .errors import VolumeFailed, from_oserror
from .geometry import BLOCK_SIZE
from .intent import IntentLog

MAX_OPEN_CHUNKS = 256  # descriptors kept open per volume
MAX_CACHED_SUMS = 65536  # chunks whose checksums stay in memory (512 MiB of sums for 256 GiB of data)
SUMS_FILE = "checksums"
SUMS_PAGE = 4096  # the filesystem's allocation unit: whole zero pages of sums are punched
INTENT_FILE = "intent.log"


def chunk_filename(chunk_index):
    return f"{chunk_index:016x}.chunk"


class _Writing:
    """The mark_dirty / end_write bracket as a context manager (a class: cheaper than a generator)."""

    __slots__ = ("store", "chunks")

    def __init__(self, store, chunks):
        self.store = store
        self.chunks = chunks

    def __enter__(self):
        self.store.mark_dirty(self.chunks)

    def __exit__(self, *exc):
        self.store.end_write(self.chunks)
        return False


class ChunkStore:
    def __init__(self, files, root, chunk_size):
        self.files = files
        self.root = root
        self.chunk_size = chunk_size
        self.blocks_per_chunk = chunk_size // BLOCK_SIZE
        self._sums_bytes = self.blocks_per_chunk * 8
        self._zero_sums = np.full(self.blocks_per_chunk, checksum.ZERO_BLOCK_HASH, dtype=np.uint64)
        self._zero_sums.setflags(write=False)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # writers drained / snapshot taken
        self._writers = 0  # writes between mark_dirty and end_write
        self._active = collections.Counter()  # chunk -> writes in progress on it
        self._snapshotting = False
        self._flush_lock = threading.Lock()  # one flush at a time: a second waits for the first
        self._dir_lock = threading.Lock()  # "is the directory dirty? fsync it" as one step
        self._sums = {}  # chunk_index -> np.uint64 array (maybe the shared read-only zero array)
        self._present = set()  # chunk files on disk: listed once at open, then kept up to date
        self._fds = collections.OrderedDict()  # chunk_index -> fd, LRU order
        self._pins = collections.Counter()
        self.dirty = set()  # written since the last flush began
        self._dir_dirty = False
        self._sums_fd = None
        self._root_ready = False
        self.intent = IntentLog(files, os.path.join(root, INTENT_FILE))
        self.failed = None  # reason, once durability can no longer be trusted
        self.deferred_flushes = 0  # flushes that left their batch in the intent log (peers not settled)
        self.recovered_chunks = 0
        self.recovered = []

    # ---- open / recovery -------------------------------------------------
    def open(self):
        """Load the intent log and recompute checksums of chunks dirty at the last crash."""
        if not self.files.exists(self.root):
            return
        self._root_ready = True
        self._present = set(self.chunk_indexes())
        pending = sorted(self.intent.load())
        if pending:
            self._recover(pending)

    def _recover(self, chunk_indexes):
        buf = np.empty(self.chunk_size, dtype=np.uint8)
        for c in chunk_indexes:
            if c not in self._present:  # listed by open() just before
                self._sums[c] = self._zero_sums
                continue
            fd = self.files.open(self._chunk_path(c))
            try:
                self.files.pread_into(fd, memoryview(buf), 0)
                # Make the data we are about to vouch for durable first: after
                # kill -9 it may still be only in the page cache.
                self.files.fdatasync(fd)
            finally:
                self.files.close(fd)
            sums = np.empty(self.blocks_per_chunk, dtype=np.uint64)
            checksum.hash_blocks(buf, sums)
            self._present.add(c)
            self._sums[c] = sums
            self._write_sums(c, sums)
        self.files.fsync_dir(self.root)
        self._sync_sums()
        # Data and checksums are durable now, but the chunks stay in the intent log until the next
        # flush: a replicated primary first adds them to every peer's resync bitmap (the copies may
        # have split), and a crash before that must find them here again.
        self.dirty.update(chunk_indexes)
        self.recovered_chunks = len(chunk_indexes)
        self.recovered = list(chunk_indexes)  # replication resyncs these too: a crash may have split the copies

    # ---- paths and descriptors -------------------------------------------
    def _chunk_path(self, chunk_index):
        return os.path.join(self.root, chunk_filename(chunk_index))

    def _ensure_root(self):
        """Create the volume directory on first write, durably (its parent fsync'd)."""
        if self._root_ready:
            return
        try:
            self.files.mkdir(self.root)
            self.files.fsync_dir(os.path.dirname(self.root))
        except OSError as exc:
            self.fail(f"volume directory: {exc.strerror}")
            raise from_oserror("volume directory", exc) from exc
        self._root_ready = True

    def exists(self, chunk_index):
        """Whether the chunk has a file (no syscall: a set kept since open)."""
        return chunk_index in self._present

    def pin(self, chunk_index, create=False):
        """Return an open descriptor for the chunk, pinned; None if it does not exist."""
        with self._lock:
            fd = self._fds.get(chunk_index)
            if fd is not None:
                self._fds.move_to_end(chunk_index)
                self._pins[chunk_index] += 1
                return fd
            if not self.exists(chunk_index):
                if not create:
                    return None
                self._ensure_root()
                fd = self.files.open(self._chunk_path(chunk_index), create=True, size=self.chunk_size)
                self._present.add(chunk_index)
                # A new file is all holes: never read stale sidecar entries for it.
                self._sums[chunk_index] = self._zero_sums
                self._dir_dirty = True
            else:
                fd = self.files.open(self._chunk_path(chunk_index))
            self._fds[chunk_index] = fd
            self._pins[chunk_index] += 1
            self._evict_locked()
            return fd

    def peek(self, chunk_index):
        """(descriptor or None, checksums or None) without locking or opening anything.

        Only for the verified lock-free read: the descriptor may be closed or
        reused by the time it is used, which verification catches.
        """
        return self._fds.get(chunk_index), self._sums.get(chunk_index)

    def unpin(self, chunk_index):
        with self._lock:
            self._pins[chunk_index] -= 1
            if self._pins[chunk_index] <= 0:
                del self._pins[chunk_index]

    def _evict_locked(self):
        if len(self._fds) <= MAX_OPEN_CHUNKS:
            return
        for c in list(self._fds):
            if len(self._fds) <= MAX_OPEN_CHUNKS:
                break
            if c in self._pins:
                continue
            self.files.close(self._fds.pop(c))

    # ---- checksums ---------------------------------------------------------
    def sums(self, chunk_index):
        """The chunk's per-block checksums (read-only view for chunks never written)."""
        sums = self._sums.get(chunk_index)
        if sums is None:
            with self._lock:
                sums = self._sums.get(chunk_index)
                if sums is None:
                    sums = self._load_sums(chunk_index)
                    self._sums[chunk_index] = sums
                    if len(self._sums) > MAX_CACHED_SUMS:
                        self._evict_sums_locked(chunk_index)
        return sums

    def _evict_sums_locked(self, keep):
        """Forget the checksums of the oldest clean chunks: the checksums file holds them.

        Never a chunk written since the last flush or named in the intent log
        (its only up-to-date checksums are in memory).  A lock-free reader
        holding an evicted array still has a valid array.
        """
        excess = len(self._sums) - MAX_CACHED_SUMS
        for c in list(self._sums):
            if excess <= 0:
                break
            if c == keep or c in self.dirty or c in self.intent.chunks:
                continue
            del self._sums[c]
            excess -= 1

    def writable_sums(self, chunk_index):
        sums = self.sums(chunk_index)
        if not sums.flags.writeable:
            with self._lock:
                sums = self._sums[chunk_index]
                if not sums.flags.writeable:
                    sums = sums.copy()
                    self._sums[chunk_index] = sums
        return sums

    def _load_sums(self, chunk_index):
        if not self.exists(chunk_index):
            return self._zero_sums
        sums = np.zeros(self.blocks_per_chunk, dtype=np.uint64)
        path = os.path.join(self.root, SUMS_FILE)
        if self.files.exists(path):
            fd = self._open_sums()
            self.files.pread_into(fd, memoryview(sums).cast("B"), chunk_index * self._sums_bytes)
        np.bitwise_xor(sums, np.uint64(checksum.ZERO_BLOCK_HASH), out=sums)
        return sums

    def _open_sums(self):
        if self._sums_fd is None:
            with self._dir_lock:  # not _lock: _load_sums already holds it
                return self._open_sums_once()
        return self._sums_fd

    def _open_sums_once(self):
        if self._sums_fd is None:
            path = os.path.join(self.root, SUMS_FILE)
            existed = self.files.exists(path)
            self._sums_fd = self.files.open(path, create=True)
            if not existed:
                self._dir_dirty = True
        return self._sums_fd

    def _write_sums(self, chunk_index, sums):
        fd = self._open_sums()
        encoded = np.bitwise_xor(sums, np.uint64(checksum.ZERO_BLOCK_HASH))
        offset = chunk_index * self._sums_bytes
        if self._sums_bytes % SUMS_PAGE:
            self.files.pwrite(fd, memoryview(encoded).cast("B"), offset)
            return
        per_page = SUMS_PAGE // 8
        for first in range(0, len(encoded), per_page):
            page = encoded[first : first + per_page]
            if checksum.count_equal(page, 0) == per_page:
                self.files.punch_hole(fd, offset + first * 8, SUMS_PAGE)
            else:
                self.files.pwrite(fd, memoryview(page).cast("B"), offset + first * 8)

    def _sync_sums(self):
        if self._sums_fd is not None:
            self.files.fdatasync(self._sums_fd)
        self._sync_dir()

    def _sync_dir(self):
        """fsync the volume directory if entries changed; a concurrent caller waits for it.

        The flag is cleared before the fsync so a change made meanwhile sets
        it again; the lock makes a second caller wait until the fsync that
        covers its change has completed, instead of returning early.
        """
        with self._dir_lock:
            if not self._dir_dirty:
                return
            self._dir_dirty = False
            try:
                self.files.fsync_dir(self.root)
            except BaseException:
                self._dir_dirty = True
                raise

    # ---- data ---------------------------------------------------------------
    def writing(self, chunk_indexes):
        """``with store.writing(chunks):`` brackets a write: mark_dirty on entry, end_write on exit."""
        return _Writing(self, chunk_indexes)

    def mark_dirty(self, chunk_indexes):
        """Begin a write: record chunks as written, durably in the intent log.

        Every successful call must be paired with ``end_write()`` once the
        data and the in-memory checksums are updated (``writing()`` does both).  Flush waits for writes
        in progress before it takes its snapshot of the dirty set, so a chunk
        is only ever forgotten by the intent log after every write that
        touched it before the snapshot is fully in the page cache and synced.
        """
        if self.failed:
            raise VolumeFailed(f"volume failed: {self.failed}; writes refused")
        with self._lock:
            while self._snapshotting:
                self._idle.wait()
            self.dirty.update(chunk_indexes)
            if any(c not in self.intent.chunks for c in chunk_indexes):
                self._ensure_root()
                try:
                    self.intent.add(chunk_indexes)
                except OSError as exc:
                    self.fail(f"intent log: {exc.strerror}")
                    raise from_oserror("intent log", exc) from exc
            self._writers += 1
            self._active.update(chunk_indexes)

    def end_write(self, chunk_indexes):
        with self._lock:
            self._writers -= 1
            self._active.subtract(chunk_indexes)
            for c in chunk_indexes:
                if self._active[c] <= 0:
                    del self._active[c]
            if self._writers == 0 and self._snapshotting:
                self._idle.notify_all()

    def read_into(self, fd, chunk_offset, buf):
        self.files.pread_into(fd, buf, chunk_offset)

    def write(self, fd, chunk_offset, buf):
        self.files.pwrite(fd, buf, chunk_offset)

    def punch(self, fd, chunk_offset, length):
        self.files.punch_hole(fd, chunk_offset, length)

    def drop_if_empty(self, chunk_index):
        """Unlink a chunk whose blocks are all zero (caller holds the range lock)."""
        with self._lock:
            sums = self._sums.get(chunk_index)
            if sums is None or not self.exists(chunk_index):
                return False
            # Another write to a different range of this chunk may have
            # written its data and not yet its checksums: never unlink then.
            if chunk_index in self._pins or self._active[chunk_index] > 1:
                return False
            if checksum.count_equal(sums, checksum.ZERO_BLOCK_HASH) != self.blocks_per_chunk:
                return False
            fd = self._fds.pop(chunk_index, None)
            if fd is not None:
                self.files.close(fd)
            self.files.unlink(self._chunk_path(chunk_index))
            self._present.discard(chunk_index)
            self._sums[chunk_index] = self._zero_sums
            self._dir_dirty = True
        return True

    def _sync_data(self, chunk_indexes):
        """fdatasync chunks, then the directory if files were created or removed."""
        for c in chunk_indexes:
            # Reopens a chunk whose descriptor the LRU closed: since Linux
            # 4.16 an fsync on a new descriptor still reports a writeback
            # error nobody has seen.  None: dropped (all zero) meanwhile.
            fd = self.pin(c)
            if fd is None:
                continue
            try:
                self.files.fdatasync(fd)
            finally:
                self.unpin(c)
        self._sync_dir()

    def sync_chunks(self, chunk_indexes):
        """FUA: make the given chunks' data durable (checksums are covered by the intent log)."""
        if self.failed:
            raise VolumeFailed(f"volume failed: {self.failed}")
        try:
            self._sync_data(chunk_indexes)
        except OSError as exc:
            self.fail(f"fdatasync: {exc.strerror}")
            raise VolumeFailed(f"volume failed: fdatasync: {exc.strerror}") from exc

    def flush(self, settled=None):
        """Make every write so far durable, with its checksums, then clear the intent log.

        Flushes run one at a time: a flush that found nothing dirty because
        another flush had just taken the batch must still wait for that
        flush's fdatasync before it may report success.  ``settled()``, when
        given, runs after the syncs and before the intent log forgets the batch;
        if it returns False the batch stays in the intent log (a later flush
        clears it): replication uses it so that a peer's miss is on record in
        its resync bitmap before the chunks leave the intent log.
        """
        with self._flush_lock:
            self._flush(settled)

    def _flush(self, settled=None):
        if self.failed:
            raise VolumeFailed(f"volume failed: {self.failed}")
        with self._lock:
            # No write may be half done at the snapshot: one that began
            # before it must be in the page cache before we sync.
            self._snapshotting = True
            try:
                while self._writers:
                    self._idle.wait()
                batch = self.dirty
                self.dirty = set()
            finally:
                self._snapshotting = False
                self._idle.notify_all()
        try:
            self._sync_data(sorted(batch))
            for c in sorted(batch):
                sums = self._sums.get(c)
                if sums is not None and self.exists(c):
                    self._write_sums(c, sums)
            self._sync_sums()
            keep = True  # also if settled() raises
            try:
                # A miss the callback's wait saw recorded nowhere (the bitmap could not be written)
                # failed the store meanwhile: then the intent log is the only record left.
                keep = (settled is not None and not settled()) or bool(self.failed)
            finally:
                if keep:
                    with self._lock:
                        self.dirty.update(batch)  # still in the intent log: the next flush tries again
            if keep:
                if self.failed:
                    raise VolumeFailed(f"volume failed: {self.failed}")
                self.deferred_flushes += 1
                return
            with self._lock:
                clean = [c for c in batch if c not in self.dirty]
                self.intent.remove(clean)
        except OSError as exc:
            self.fail(f"flush: {exc.strerror}")
            raise VolumeFailed(f"volume failed: flush: {exc.strerror}") from exc
        finally:
            with self._lock:
                self._evict_locked()

    def fail(self, reason):
        """Mark the volume failed (writes and flushes refused with EIO from now on)."""
        # An fdatasync that failed may have dropped the dirty pages: retrying
        # and trusting a later success would lie.  Refuse writes from now on.
        if not self.failed:
            self.failed = reason

    # ---- inspection ------------------------------------------------------
    def chunk_indexes(self):
        """Chunk files present on disk, sorted."""
        if not os.path.isdir(self.root):
            return []
        out = []
        for name in os.listdir(self.root):
            if name.endswith(".chunk"):
                try:
                    out.append(int(name[:-6], 16))
                except ValueError:
                    continue
        return sorted(out)

    def close(self):
        with self._lock:
            for fd in self._fds.values():
                self.files.close(fd)
            self._fds.clear()
            if self._sums_fd is not None:
                self.files.close(self._sums_fd)
                self._sums_fd = None
            self.intent.close()
