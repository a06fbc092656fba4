"""File operations the store performs, behind one small interface.

The store never calls ``os`` directly for data files: it goes through a
``Files`` object so that the same engine runs over the real filesystem
(``OsFiles``) and over the fault-injecting layer the tests use to simulate a
power cut (tests/faultfs.py).  This module owns nothing else: no caching, no
policy, no checksums.
"""

import ctypes
import ctypes.util
import errno
import os

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


# preadv2 through a PyDLL: the call keeps the GIL.  With RWF_NOWAIT it only
# copies from the page cache (a few microseconds) and returns EAGAIN instead of
# waiting for the disk; then the ordinary GIL-releasing os.preadv takes over.
# Keeping the GIL for a cached read avoids a GIL hand-off per request, which
# is what makes several nbdkit threads slower than one for small I/O.
RWF_NOWAIT = 0x08
NOWAIT_MAX_BYTES = 64 * 1024


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


try:
    _pylibc = ctypes.PyDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    _preadv2 = _pylibc.preadv2
    _preadv2.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int]
    _preadv2.restype = ctypes.c_ssize_t
except (OSError, AttributeError):  # no preadv2: always the plain path
    _preadv2 = None


def pread_cached(fd, buf, offset):
    """Bytes read from the page cache without releasing the GIL (0: not cached, try os.preadv)."""
    if _preadv2 is None:
        return 0
    try:
        iov = _Iovec(ctypes.addressof(ctypes.c_char.from_buffer(buf)), len(buf))
    except (TypeError, ValueError):
        return 0
    n = _preadv2(fd, ctypes.addressof(iov), 1, offset, RWF_NOWAIT)
    return n if n > 0 else 0


def fsync_dir(path):
    """Make a directory's entries (created, removed, renamed files) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def punch_hole(fd, offset, length):
    """Deallocate ``[offset, offset+length)`` keeping the file size; reads return zeros."""
    if length <= 0:
        return
    if _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


class OsFiles:
    """The real filesystem."""

    def open(self, path, create=False, size=None):
        """Open read-write; with ``create`` make the file (sparse, ``size`` bytes) if missing."""
        flags = os.O_RDWR | os.O_CLOEXEC
        if create:
            flags |= os.O_CREAT
        fd = os.open(path, flags, 0o600)
        if create and size is not None:
            try:
                if os.fstat(fd).st_size < size:
                    os.ftruncate(fd, size)
            except BaseException:
                os.close(fd)
                raise
        return fd

    def open_readonly(self, path):
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def close(self, fd):
        os.close(fd)

    def pread_into(self, fd, buf, offset):
        """Fill ``buf`` (a writable memoryview) from ``offset``; bytes past EOF read as zeros."""
        total = want = len(buf)
        if want <= NOWAIT_MAX_BYTES:
            done = pread_cached(fd, buf, offset)
            if done == want:
                return total
            if done:
                buf = buf[done:]
                offset += done
                want -= done
        done = os.preadv(fd, [buf], offset)
        while done < want:
            n = os.preadv(fd, [buf[done:]], offset + done)
            if n == 0:
                buf[done:] = bytes(want - done)
                break
            done += n
        return total

    def pwrite(self, fd, buf, offset):
        done = os.pwrite(fd, buf, offset)
        while done < len(buf):
            done += os.pwrite(fd, buf[done:], offset + done)
        return done

    def fdatasync(self, fd):
        os.fdatasync(fd)

    def fsync(self, fd):
        os.fsync(fd)

    def fsync_dir(self, path):
        fsync_dir(path)

    def punch_hole(self, fd, offset, length):
        punch_hole(fd, offset, length)

    def truncate(self, fd, length):
        os.ftruncate(fd, length)

    def size(self, fd):
        return os.fstat(fd).st_size

    def unlink(self, path):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def exists(self, path):
        return os.path.exists(path)

    def mkdir(self, path):
        try:
            os.mkdir(path, 0o700)
            return True
        except FileExistsError:
            return False

    def rename(self, src, dst):
        os.rename(src, dst)

    def seek_data(self, fd, offset):
        """Next data offset at or after ``offset``, or None past the last data."""
        try:
            return os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return None
            raise

    def seek_hole(self, fd, offset):
        return os.lseek(fd, offset, os.SEEK_HOLE)
