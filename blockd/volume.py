"""A volume: requests in, verified blocks out.

Owns the request semantics for one volume: range locking, read-modify-write
of partial blocks, per-block checksums (computed on write, verified on every
read), zero-block detection (all-zero blocks become holes), trim, zeroing,
flush and extents.  It does file I/O only through its ``ChunkStore`` and
never knows about NBD, sockets or the catalog.

Unaligned write, drawn (B = 4 KiB block):

    |----B----|----B----|----B----|----B----|
         |<========= request =========>|
    |head|                             |tail|   read (verified), merged
    |<-------- locked and written whole blocks -------->|
"""

import contextlib
import errno
import os

import numpy as np

from . import checksum, fastio
from .errors import BlockdError, ChecksumError, NoSpace, OutOfRange, ReadOnly, VolumeFailed, from_oserror
from .geometry import BLOCK_SIZE, segments
from .rangelock import RangeLock

EXTENT_HOLE = 1
EXTENT_ZERO = 2
EXTENT_SCAN_LIMIT = 1 << 30  # answer block status for at most 1 GiB per call; clients ask again
ZERO = checksum.ZERO_BLOCK_HASH
_MASK = ~(BLOCK_SIZE - 1)


class NullEvents:
    """What the volume reports; the server wires in metrics."""

    def checksum_error(self, volume, offsets):
        pass

    def scrub_started(self, volume):
        pass

    def read_repair(self, volume, blocks):
        pass

    def scrub_progress(self, volume, nbytes):
        pass

    def scrub_finished(self, volume, corrupt):
        pass


def block_hashes(data):
    """(xxh64 per block, all-zero flag per block, number of zero blocks) of whole blocks ``data``."""
    nblocks = len(data) // BLOCK_SIZE
    sums = np.empty(nblocks, dtype=np.uint64)
    zflags = np.empty(nblocks, dtype=np.uint8)
    return sums, zflags, checksum.hash_blocks_zero(data, sums, zflags)


class Volume:
    def __init__(self, name, volume_id, size, store, readonly=False, events=None):
        self.name = name
        self.volume_id = volume_id
        self.size = size
        self.store = store
        self.readonly = readonly
        self.events = events or NullEvents()
        self.chunk_size = store.chunk_size
        self._locks = RangeLock()
        self.checksum_errors = 0
        self.read_repairs = 0
        self.gone = None  # reason, once the volume was deleted under its connections (delete --force)
        self.qos = None  # qos.Admission when the volume's type or caps throttle it
        self.replication = None  # replication.VolumeReplication for a replicated primary

    # ---- helpers -----------------------------------------------------------
    def _check_range(self, offset, length):
        if self.gone:
            raise VolumeFailed(f"{self.name}: {self.gone}")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OutOfRange(
                f"{self.name}: request [{offset}, {offset + length}) is past the end of the volume ({self.size} bytes)"
            )

    def _check_writable(self):
        if self.readonly:
            raise ReadOnly(f"{self.name}: volume is read-only")

    # ---- read --------------------------------------------------------------
    def read(self, buf, offset):
        """Fill ``buf`` (writable buffer) with the volume's bytes at ``offset``, verified."""
        length = len(buf)
        self._check_range(offset, length)
        if length == 0:
            return
        qos = self.qos
        if qos is not None:
            qos.admit(offset, length)  # may sleep (GIL released): only this request waits
        # Fast path, no locks: an aligned small read inside one open chunk,
        # served from the page cache and verified in one kernel call.  A
        # concurrent writer or a closed descriptor can only make it fail
        # verification or the read, never pass with wrong data; then the
        # locked path below decides.
        if not (offset | length) & (BLOCK_SIZE - 1) and length <= fastio.MAX_BYTES:
            chunk_index, chunk_offset = divmod(offset, self.chunk_size)
            if chunk_offset + length <= self.chunk_size:
                fd, sums = self.store.peek(chunk_index)
                if sums is not None and fd is not None:
                    first = chunk_offset // BLOCK_SIZE
                    arr = np.frombuffer(buf, dtype=np.uint8)
                    if fastio.read_verify(fd, arr, chunk_offset, sums[first : first + length // BLOCK_SIZE]) == 0:
                        return
        try:
            self._read_locked_path(buf, offset, length)
        except ChecksumError as exc:
            # Read-repair: correct blocks from a replica, rewritten here, then read again.
            if self.replication is None or not self.repair_blocks(exc.offsets):
                raise
            self._read_locked_path(buf, offset, length)

    def _read_locked_path(self, buf, offset, length):
        start = offset & _MASK
        end = (offset + length + BLOCK_SIZE - 1) & _MASK
        held = self._locks.acquire(start, end, False)
        try:
            if start == offset and end == offset + length:
                self._read_blocks(memoryview(buf).cast("B"), offset)
            else:
                tmp = bytearray(end - start)
                self._read_blocks(memoryview(tmp), start)
                memoryview(buf).cast("B")[:] = memoryview(tmp)[offset - start : offset - start + length]
        finally:
            self._locks.release(held)

    def repair_blocks(self, offsets):
        """Fetch each block from an in-sync replica, check it against our checksum, rewrite it locally.

        The replica's block is taken if it matches our checksum (our data rotted), or our data as it is
        on disk (our checksum rotted: the data was right).  Not otherwise: a write still on its way to
        the replica may not be there yet, and its old block must never overwrite the newer one here.
        Returns the offsets repaired; all-or-nothing for a read (False if any
        block could not be repaired: the read then fails with EIO).
        """
        repl = self.replication
        if repl is None:
            return []
        done = []
        for off in offsets:
            held = self._locks.acquire(off, off + BLOCK_SIZE, True)
            try:
                c, co = divmod(off, self.chunk_size)
                expected = int(self.store.sums(c)[co // BLOCK_SIZE])
                accept = {expected}
                local = self._hash_on_disk(c, co)
                if local is not None:
                    accept.add(local)
                data = repl.fetch_block(off, accept)
                if data is None:
                    repl.log_unrepaired(off)
                    continue
                self._write_blocks(data, off)  # local only: the replica already holds it
            finally:
                self._locks.release(held)
            done.append(off)
        if done:
            self.read_repairs += len(done)
            self.events.read_repair(self, len(done))
        return done if len(done) == len(offsets) else []

    def _hash_on_disk(self, c, chunk_offset):
        """xxh64 of one block as it is on disk here, unverified (None if it cannot be read)."""
        buf = np.zeros(BLOCK_SIZE, dtype=np.uint8)
        fd = self.store.pin(c)
        if fd is None:
            return None  # no chunk file here: zeros vouch for nothing (an empty copy would match them)
        try:
            self.store.read_into(fd, chunk_offset, memoryview(buf))
        except OSError:
            return None
        finally:
            self.store.unpin(c)
        out = np.empty(1, dtype=np.uint64)
        checksum.hash_blocks(buf, out)
        return int(out[0])

    def _read_blocks(self, view, offset):
        """Read whole blocks at an aligned ``offset`` into ``view`` and verify them."""
        chunk_index, chunk_offset = divmod(offset, self.chunk_size)
        if chunk_offset + len(view) <= self.chunk_size:  # the common case: one chunk
            self._read_segment(view, chunk_index, chunk_offset)
            return
        for seg in segments(offset, len(view), self.chunk_size):
            self._read_segment(view[seg.buf_offset : seg.buf_offset + seg.length], seg.chunk_index, seg.chunk_offset)

    def _read_segment(self, part, c, chunk_offset):
        store = self.store
        first = chunk_offset // BLOCK_SIZE
        count = len(part) // BLOCK_SIZE
        expected = store.sums(c)[first : first + count]
        arr = np.frombuffer(part, dtype=np.uint8)
        if checksum.count_equal(expected, ZERO) == count:
            arr[:] = 0  # a hole by our own records: no I/O
            return
        fd = store.pin(c)
        if fd is None:
            arr[:] = 0
        else:
            try:
                store.read_into(fd, chunk_offset, part)
            except OSError as exc:
                raise from_oserror(f"{self.name}: read chunk {c}", exc) from exc
            finally:
                store.unpin(c)
        bad = checksum.verify_blocks(arr, expected)
        if len(bad):
            base = c * self.chunk_size + chunk_offset
            offsets = [base + int(i) * BLOCK_SIZE for i in bad]
            self.checksum_errors += len(offsets)
            self.events.checksum_error(self, offsets)
            raise ChecksumError(
                f"{self.name}: checksum mismatch in {len(offsets)} block(s) at offset {offsets[0]}", offsets
            )

    # ---- write -------------------------------------------------------------
    def write(self, buf, offset, fua=False, hashed=None):
        """Write ``buf`` at ``offset``.  ``hashed`` = (sums, zero flags, zero count) of ``buf`` when the
        caller already has them (the replication sink verified them on receipt); aligned writes only."""
        length = len(buf)
        self._check_writable()
        self._check_range(offset, length)
        if length == 0:
            return
        qos = self.qos
        if qos is not None:
            qos.admit(offset, length)
        start = offset & _MASK
        end = (offset + length + BLOCK_SIZE - 1) & _MASK

        def prepare(replicated):
            if start == offset and end == offset + length:
                data, sums = np.frombuffer(buf, dtype=np.uint8), hashed
            else:
                data, sums = self._merge_edges(buf, offset, start, end), None
            if replicated:
                sums = block_hashes(data)  # once: for the replicas' checksum frame and for our own store
            return data, sums

        self._apply("write", start, end, fua, prepare,
                    lambda repl, st: repl.send_write(start, st[0], fua, st[1][0]),
                    lambda st, marked: self._write_blocks(st[0], start, st[1], marked=marked))

    def _apply(self, what, start, end, fua, prepare, send, local):
        """One write, trim or zero: under the range lock [start, end), ``prepare`` (reads
        and checks whatever can fail before anything changes), then ``local`` (this copy's change,
        returning the chunks it touched).  Replicated: the chunks of the range go into the
        intent log first, then ``send`` (sent under the range lock: overlapping requests reach
        every copy in the order applied here), then ``local``; if ``local`` fails, every peer that
        applied it is resynced from this copy (abandon).  Then FUA, then the write quorum."""
        repl = self.replication
        ticket = None
        held = self._locks.acquire(start, end, True)
        try:
            state = prepare(repl is not None)
            if repl is None:
                touched = local(state, False)
            else:
                touched = self._chunks(start, end)
                repl.wait_writable()  # not inside writing(): a flush's snapshot would wait on it
                with self.store.writing(touched):
                    ticket = send(repl, state)
                    try:
                        local(state, True)
                    except BaseException as exc:
                        repl.abandon(ticket, f"the {what} failed on this node: {exc}")
                        raise
        finally:
            try:
                if ticket is not None:
                    repl.collect(ticket)  # the replicas' answers, before an overlapping request may be sent
            finally:
                self._locks.release(held)
        if fua:
            self.store.sync_chunks(touched)
        if ticket is not None:
            repl.wait(ticket)

    def _merge_edges(self, buf, offset, start, end):
        """Widen an unaligned write to whole blocks: read (and verify) head and tail."""
        tmp = bytearray(end - start)
        view = memoryview(tmp)
        if offset != start:
            self._read_blocks(view[:BLOCK_SIZE], start)
        tail = end - BLOCK_SIZE
        if offset + len(buf) != end and (tail != start or offset == start):
            self._read_blocks(view[tail - start :], tail)
        view[offset - start : offset - start + len(buf)] = memoryview(buf).cast("B")
        return np.frombuffer(tmp, dtype=np.uint8)

    def _chunks(self, start, end):
        return [s.chunk_index for s in segments(start, end - start, self.chunk_size)]

    def _write_blocks(self, data, offset, hashed=None, marked=False):
        """Write whole blocks at aligned ``offset``; all-zero blocks become holes.  ``marked``: the
        caller holds ``store.writing()`` for these chunks already."""
        store = self.store
        sums, zflags, nzero = hashed if hashed is not None else block_hashes(data)
        segs = segments(offset, len(data), self.chunk_size)
        chunks = [s.chunk_index for s in segs]
        with contextlib.nullcontext() if marked else store.writing(chunks):
            try:
                for seg in segs:
                    c = seg.chunk_index
                    first = seg.chunk_offset // BLOCK_SIZE
                    b = seg.buf_offset // BLOCK_SIZE
                    count = seg.length // BLOCK_SIZE
                    part = data[seg.buf_offset : seg.buf_offset + seg.length]
                    seg_zero = zflags[b : b + count]
                    zeros = 0 if nzero == 0 else int(np.count_nonzero(seg_zero))
                    if zeros == count:
                        self._zero_blocks(c, seg.chunk_offset, seg.length)
                        continue
                    fd = store.pin(c, create=True)
                    try:
                        if zeros == 0:
                            store.write(fd, seg.chunk_offset, part)
                        else:
                            self._write_runs(fd, seg.chunk_offset, part, seg_zero)
                        # Still pinned: the chunk cannot be dropped between our
                        # data and our checksums.
                        store.writable_sums(c)[first : first + count] = sums[b : b + count]
                    finally:
                        store.unpin(c)
            except OSError as exc:
                # Some blocks may hold new data: re-read what is really there so a
                # later read never reports a false checksum error.
                self._resync_sums(offset, len(data))
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise NoSpace(f"{self.name}: no space left in the data dir") from exc
                raise from_oserror(f"{self.name}: write", exc) from exc
        return chunks

    def _write_runs(self, fd, chunk_offset, part, zero_flags):
        edges = np.flatnonzero(np.diff(zero_flags)) + 1
        bounds = [0, *edges.tolist(), len(zero_flags)]
        for lo, hi in zip(bounds, bounds[1:]):
            o = chunk_offset + lo * BLOCK_SIZE
            if zero_flags[lo]:
                self.store.punch(fd, o, (hi - lo) * BLOCK_SIZE)
            else:
                self.store.write(fd, o, part[lo * BLOCK_SIZE : hi * BLOCK_SIZE])

    def _zero_blocks(self, c, chunk_offset, length):
        """Punch whole blocks, record them as zero, unlink the chunk if it is now empty.

        Punch first: a failed punch leaves checksums that still match the data.
        """
        store = self.store
        fd = store.pin(c)
        if fd is None:
            return  # no file: already zeros
        try:
            store.punch(fd, chunk_offset, length)
        finally:
            store.unpin(c)
        first = chunk_offset // BLOCK_SIZE
        store.writable_sums(c)[first : first + length // BLOCK_SIZE] = ZERO
        store.drop_if_empty(c)

    def _resync_sums(self, offset, length):
        """After a failed write: checksums from what is really on disk.

        If even that fails the checksums cannot be trusted: fail the volume
        (writes refused) rather than risk a false alarm later.
        """
        store = self.store
        for seg in segments(offset, length, self.chunk_size):
            c = seg.chunk_index
            try:
                fd = store.pin(c)
                if fd is None:
                    continue
                try:
                    buf = np.empty(seg.length, dtype=np.uint8)
                    store.read_into(fd, seg.chunk_offset, memoryview(buf))
                    sums = np.empty(seg.length // BLOCK_SIZE, dtype=np.uint64)
                    checksum.hash_blocks(buf, sums)
                    first = seg.chunk_offset // BLOCK_SIZE
                    store.writable_sums(c)[first : first + len(sums)] = sums
                finally:
                    store.unpin(c)
            except OSError as exc:
                store.fail(f"{self.name}: cannot re-read chunk {c} after a failed write: {exc.strerror}")

    # ---- trim / zero -------------------------------------------------------
    def trim(self, offset, length, fua=False):
        """Give whole blocks in the range back to the filesystem (partial blocks are left)."""
        self._check_writable()
        self._check_range(offset, length)
        first = (offset + BLOCK_SIZE - 1) & _MASK
        last = (offset + length) & _MASK
        if last <= first:
            return
        self._apply("trim", first, last, fua, lambda replicated: None,
                    lambda repl, st: repl.send_range("trim", offset, length, fua),
                    lambda st, marked: self._punch_blocks(first, last, marked))

    def zero(self, offset, length, fua=False):
        """Make the range read as zeros: whole blocks are punched, edges rewritten."""
        self._check_writable()
        self._check_range(offset, length)
        if length == 0:
            return
        start = offset & _MASK
        end = (offset + length + BLOCK_SIZE - 1) & _MASK
        first = (offset + BLOCK_SIZE - 1) & _MASK
        last = (offset + length) & _MASK
        self._apply("zero", start, end, fua,
                    lambda replicated: self._zero_edges(offset, length, first, last),
                    lambda repl, st: repl.send_range("zero", offset, length, fua),
                    lambda edges, marked: self._zero_range(first, last, edges, marked))

    def _zero_edges(self, offset, length, first, last):
        """The partial blocks at the ends of a zeroed range, merged with what they hold (read and
        verified first: a checksum error fails the request before anything is sent or changed)."""
        edges = [(offset, first - offset), (last, offset + length - last)] if last > first else [(offset, length)]
        out = []
        for edge_offset, edge_length in edges:
            if edge_length <= 0:
                continue
            s = edge_offset & _MASK
            e = (edge_offset + edge_length + BLOCK_SIZE - 1) & _MASK
            out.append((s, self._merge_edges(bytes(edge_length), edge_offset, s, e)))
        return out

    def _zero_range(self, first, last, edges, marked=False):
        touched = []
        if last > first:
            touched += self._punch_blocks(first, last, marked)
        for s, data in edges:
            touched += self._write_blocks(data, s, marked=marked)
        return touched

    def _punch_blocks(self, first, last, marked=False):
        segs = segments(first, last - first, self.chunk_size)
        chunks = [s.chunk_index for s in segs]
        with contextlib.nullcontext() if marked else self.store.writing(chunks):
            for seg in segs:
                try:
                    self._zero_blocks(seg.chunk_index, seg.chunk_offset, seg.length)
                except OSError as exc:
                    raise from_oserror(f"{self.name}: trim", exc) from exc
        return chunks

    # ---- flush / status ----------------------------------------------------
    def flush(self):
        repl = self.replication
        if repl is None:
            self.store.flush()
            return
        ticket = repl.send_flush()
        self._flush_settled(repl, ticket)
        repl.wait(ticket)

    def _flush_settled(self, repl, ticket):
        """The local flush of a replicated volume, whose peers were sent ``ticket``'s FLUSH (None: not
        sent).  Before the intent log forgets the batch, every peer's answer to what came before is
        in, or its miss is on record (a write acknowledged without it is otherwise recorded nowhere
        once the intent log is cleared); the local fdatasyncs overlap that wait."""

        def settled():
            if ticket is not None:
                repl.collect(ticket)
            # Up to the last seq sent now, after the snapshot: a write that sent after this flush's
            # FLUSH but marked its chunks dirty before the snapshot is in this batch too.
            return repl.settle(repl.last_seq())

        try:
            self.store.flush(settled)
        finally:
            if ticket is not None:
                repl.collect(ticket)  # even if the local flush failed: the replicas' answers are recorded

    # ---- for replication: locked ranges, checksums, reads under a held lock ----
    def lock_range(self, start, end, exclusive=True):
        return self._locks.acquire(start, end, exclusive)

    def unlock_range(self, held):
        self._locks.release(held)

    def block_sums(self, offset, length):
        """Checksums (xxh64) of the whole blocks in [offset, offset+length), as a new array."""
        out = np.empty(length // BLOCK_SIZE, dtype=np.uint64)
        pos = 0
        for seg in segments(offset, length, self.chunk_size):
            first = seg.chunk_offset // BLOCK_SIZE
            n = seg.length // BLOCK_SIZE
            out[pos : pos + n] = self.store.sums(seg.chunk_index)[first : first + n]
            pos += n
        return out

    def read_locked(self, buf, offset):
        """Read and verify whole blocks while the caller holds the range lock."""
        self._read_blocks(memoryview(buf).cast("B"), offset)

    def cache(self, offset, length):
        """Prefetch: ask the kernel to read the chunks ahead (advisory)."""
        self._check_range(offset, length)
        for seg in segments(offset, length, self.chunk_size):
            fd = self.store.pin(seg.chunk_index)
            if fd is None:
                continue
            try:
                os.posix_fadvise(fd, seg.chunk_offset, seg.length, os.POSIX_FADV_WILLNEED)
            finally:
                self.store.unpin(seg.chunk_index)

    def extents(self, offset, length, req_one=False):
        """(offset, length, flags) runs from the checksum map: zero blocks are holes."""
        self._check_range(offset, length)
        length = min(length, EXTENT_SCAN_LIMIT)
        out = []

        def add(o, n, kind):
            if out and out[-1][2] == kind and out[-1][0] + out[-1][1] == o:
                out[-1][1] += n
            else:
                out.append([o, n, kind])

        hole = EXTENT_HOLE | EXTENT_ZERO
        start = offset & _MASK
        end = min(self.size, (offset + length + BLOCK_SIZE - 1) & _MASK)
        for seg in segments(start, end - start, self.chunk_size):
            c = seg.chunk_index
            base = c * self.chunk_size
            if not self.store.exists(c):
                add(base + seg.chunk_offset, seg.length, hole)
            else:
                first = seg.chunk_offset // BLOCK_SIZE
                count = seg.length // BLOCK_SIZE
                is_zero = self.store.sums(c)[first : first + count] == ZERO
                edges = np.flatnonzero(np.diff(is_zero)) + 1
                bounds = [0, *edges.tolist(), count]
                for lo, hi in zip(bounds, bounds[1:]):
                    add(base + (first + lo) * BLOCK_SIZE, (hi - lo) * BLOCK_SIZE, hole if is_zero[lo] else 0)
            if req_one and len(out) > 1:
                break
        # Clip the first extent to start at ``offset`` and the last to the request.
        result = []
        for o, n, kind in out:
            lo = max(o, offset)
            hi = min(o + n, offset + length)
            if hi > lo:
                result.append((lo, hi - lo, kind))
        if req_one:
            result = result[:1]
        return result

    # ---- scrub -------------------------------------------------------------
    def scrub(self, progress=None):
        """Verify every block of every chunk file; returns corrupt block offsets (bytes).

        Safe while the volume is attached: each chunk is read and checked
        under a shared range lock, so a write in flight is never half seen.
        """
        self.events.scrub_started(self)
        try:
            bad = self._scrub(progress)
        except BaseException:
            self.events.scrub_finished(self, 0)
            raise
        self.events.scrub_finished(self, len(bad))
        return bad

    def _scrub(self, progress):
        store = self.store
        bad_offsets = []
        chunks = store.chunk_indexes()
        buf = np.empty(self.chunk_size, dtype=np.uint8)
        for c in chunks:
            held = self._locks.acquire(c * self.chunk_size, (c + 1) * self.chunk_size, False)
            try:
                if self.gone:
                    raise VolumeFailed(f"{self.name}: {self.gone}")
                fd = store.pin(c)
                if fd is not None:
                    try:
                        store.read_into(fd, 0, memoryview(buf))
                    finally:
                        store.unpin(c)
                    bad = checksum.verify_blocks(buf, store.sums(c))
                    bad_offsets.extend(c * self.chunk_size + int(i) * BLOCK_SIZE for i in bad)
            finally:
                self._locks.release(held)
            self.events.scrub_progress(self, self.chunk_size)
            if progress:
                progress(self.chunk_size)
        if bad_offsets:
            self.checksum_errors += len(bad_offsets)
            self.events.checksum_error(self, bad_offsets)
        return bad_offsets

    def retire(self, reason):
        """Deleted under its connections: every later request fails with EIO, nothing is flushed."""
        self.gone = reason
        self.store.fail(reason)

    def close(self):
        repl = self.replication
        try:
            if self.store.failed or self.readonly:
                pass
            elif repl is None:
                self.store.flush()
            else:
                # The peers flush too (what they acknowledged but never flushed is otherwise at risk,
                # and the record of it, PeerState.unflushed, goes with this open).  Best effort on the
                # peers' side: no quorum is awaited (nothing is acknowledged here).
                ticket = None
                try:
                    ticket = repl.send_flush()
                except BlockdError:
                    pass  # fenced: nothing more to tell the peers
                self._flush_settled(repl, ticket)
        finally:
            self.store.close()


def wrap_unexpected(context, exc):
    """Turn an unexpected exception into a BlockdError (EIO) with context."""
    if isinstance(exc, BlockdError):
        return exc
    if isinstance(exc, OSError):
        return from_oserror(context, exc)
    return BlockdError(f"{context}: BUG: {type(exc).__name__}: {exc}")
