"""nbdkit entry point for blockd: a thin adapter, the only file that imports nbdkit.

    nbdkit python plugins/blockd_nbd.py data_dir=DIR [lock_fd=N]

Each callback is one call into ``blockd``; errors are translated to the errno
the client should see (``nbdkit.set_error``) here and nowhere else.  Each data
callback first keeps its worker thread's Python thread state (blockd/pythreads.py:
nbdkit would otherwise build and delete one per request).  Usually
started by ``blockd serve``, which takes the data-dir lock and passes it on.
"""

import time
import traceback

import nbdkit

from blockd import nbd_adapter as blockd
from blockd.errors import BlockdError
from blockd.pythreads import keep as _keep_thread_state

API_VERSION = 2

# A failed request is answered no sooner than this.  A client that keeps a deep queue of writes to a
# volume that fails them all at once (deleted, fenced, failed) gets tens of thousands of error replies a
# second; if it then disconnects, nbdkit 1.32 can abort the whole server (connections.c: raw_send_socket:
# Assertion `sock >= 0' failed: its reply threads race the closing connection).  Pacing the errors made
# that go away in our reproduction (tests/integration/test_control.py); errors are the slow path anyway.
ERROR_PACE_SECONDS = 0.005

_format_exception = traceback.format_exception


def _format_exception_for_nbdkit(exc, *args, **kwargs):
    """nbdkit logs a failed callback with ``traceback.format_exception(type, value, tb)``.  An error
    blockd expects (a full disk, a read-only, failed or deleted volume, an I/O error) is one line
    naming it, not a Python traceback; anything else (a bug) keeps its traceback."""
    value = args[0] if args else kwargs.get("value", exc)
    if getattr(value, "blockd_expected", False):
        return [f"{type(value).__name__}: {value}\n"]
    return _format_exception(exc, *args, **kwargs)


traceback.format_exception = _format_exception_for_nbdkit


def _fail(context, exc):
    err = blockd.to_error(context, exc)
    nbdkit.set_error(err.errno)
    if isinstance(exc, (BlockdError, OSError)):
        err.blockd_expected = True
        time.sleep(ERROR_PACE_SECONDS)
        raise err from None
    raise err


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def config(key, value):
    blockd.config(key, value)


def config_complete():
    blockd.config_complete()


def get_ready():
    blockd.get_ready()


def after_fork():
    blockd.after_fork()


def cleanup():
    blockd.cleanup()


def list_exports(readonly, is_tls):
    return blockd.list_exports()


def default_export(readonly, is_tls):
    return ""


def open(readonly):
    try:
        return blockd.open_export(nbdkit.export_name(), readonly)
    except Exception as exc:
        _fail("open", exc)


def close(h):
    blockd.close_export(h)


def export_description(h):
    return blockd.describe(h)


def get_size(h):
    return h.size


def block_size(h):
    return blockd.BLOCK_SIZES


def is_rotational(h):
    return False


def can_write(h):
    return not h.readonly


def can_flush(h):
    return True


def can_trim(h):
    return True


def can_zero(h):
    return True


def can_fast_zero(h):
    return True


def can_fua(h):
    return nbdkit.FUA_NATIVE


def can_cache(h):
    return nbdkit.CACHE_NATIVE


def can_extents(h):
    return True


def can_multi_conn(h):
    return True


def pread(h, buf, offset, flags):
    _keep_thread_state()
    try:
        h.read(buf, offset)
    except Exception as exc:
        _fail("read", exc)


def pwrite(h, buf, offset, flags):
    _keep_thread_state()
    try:
        h.write(buf, offset, flags & nbdkit.FLAG_FUA)
    except Exception as exc:
        _fail("write", exc)


def flush(h, flags):
    _keep_thread_state()
    try:
        h.flush()
    except Exception as exc:
        _fail("flush", exc)


def trim(h, count, offset, flags):
    _keep_thread_state()
    try:
        h.trim(offset, count, flags & nbdkit.FLAG_FUA)
    except Exception as exc:
        _fail("trim", exc)


def zero(h, count, offset, flags):
    _keep_thread_state()
    try:
        h.zero(offset, count, flags & nbdkit.FLAG_FUA)
    except Exception as exc:
        _fail("zero", exc)


def cache(h, count, offset, flags):
    _keep_thread_state()
    try:
        h.cache(offset, count)
    except Exception as exc:
        _fail("cache", exc)


def extents(h, count, offset, flags):
    _keep_thread_state()
    try:
        return h.extents(offset, count, flags & nbdkit.FLAG_REQ_ONE)
    except Exception as exc:
        _fail("extents", exc)
