"""Where numba keeps compiled kernels: one shared, writable cache per user.

Owns choosing NUMBA_CACHE_DIR before numba is imported, so that every
process (the CLI, tests, nbdkit's embedded Python) loads the same compiled
kernels instead of compiling again.  Never inside the package directory
(it may be read-only).  Imports nothing heavy: `blockd serve` uses it to
pass the directory to nbdkit without loading numba itself.
"""

import os
import tempfile


def default_cache_dir():
    """$BLOCKD_CACHE_DIR/numba, else $XDG_CACHE_HOME/blockd/numba, else ~/.cache/blockd/numba."""
    if os.environ.get("BLOCKD_CACHE_DIR"):
        path = os.path.join(os.environ["BLOCKD_CACHE_DIR"], "numba")
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
        path = os.path.join(base, "blockd", "numba")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:  # e.g. read-only home: per-user temp dir, never the package
        path = os.path.join(tempfile.gettempdir(), "blockd-%d" % os.getuid())
        os.makedirs(path, exist_ok=True)
    return path


def ensure():
    """Set NUMBA_CACHE_DIR unless the user already did; returns it."""
    if not os.environ.get("NUMBA_CACHE_DIR"):
        os.environ["NUMBA_CACHE_DIR"] = default_cache_dir()
    return os.environ["NUMBA_CACHE_DIR"]
