"""One error hierarchy for blockd.

Every error carries the errno an NBD client should see and the exit code the
CLI should return.  Errors are translated to errno in the nbdkit plugin and to
an exit code plus one line on stderr in the CLI, nowhere else.  Messages are
short, lowercase-first context prefixes followed by what the caller can do.
"""

import errno as _errno


class BlockdError(Exception):
    """Base class.  ``errno`` is what an NBD client sees; ``exit_code`` what the CLI returns."""

    errno = _errno.EIO
    exit_code = 1


class BadInput(BlockdError):
    """Malformed or out-of-range input: nothing was changed."""

    errno = _errno.EINVAL
    exit_code = 2


class NotFound(BlockdError):
    """An unknown volume or export."""

    errno = _errno.ENOENT
    exit_code = 1


class Refused(BlockdError):
    """A well-formed request that cannot be done now (attached, locked, over capacity)."""

    errno = _errno.EPERM
    exit_code = 1


class Busy(Refused):
    """The data dir or a volume is held by another process."""

    errno = _errno.EBUSY


class OutOfRange(BlockdError):
    """An I/O request past the end of the volume."""

    errno = _errno.EINVAL
    exit_code = 2


class ChecksumError(BlockdError):
    """Stored data does not match its checksum: never return it."""

    errno = _errno.EIO

    def __init__(self, message, offsets=()):
        super().__init__(message)
        self.offsets = tuple(offsets)


class VolumeFailed(BlockdError):
    """A volume whose durability can no longer be trusted (an fdatasync failed)."""

    errno = _errno.EIO


class NoSpace(BlockdError):
    """The data dir's filesystem is full."""

    errno = _errno.ENOSPC


class ReadOnly(BlockdError):
    """The volume or data dir cannot be written."""

    errno = _errno.EROFS


def from_oserror(context, exc):
    """Wrap an OSError from the store with a context prefix and the right class."""
    code = exc.errno
    cls = {
        _errno.ENOSPC: NoSpace,
        _errno.EDQUOT: NoSpace,
        _errno.EROFS: ReadOnly,
    }.get(code, BlockdError)
    err = cls(f"{context}: {exc.strerror or exc}")
    if cls is BlockdError and code:
        err.errno = code
    return err
