"""A fault-injecting ``Files`` layer: simulates a power cut.

Wraps the real filesystem under one root directory and models what would
survive losing power:

- a file's contents are durable as of its last fdatasync/fsync;
- a directory entry (create, unlink, rename, mkdir) is durable once its parent
  directory has been fsync'd;
- ``crash()`` rewrites the tree to that durable state, and with ``tear=True``
  each 4 KiB page that changed since the last sync independently keeps its old
  or new contents (the page cache may have written back any subset).

Anything that was only in the page cache is gone, which ``kill -9`` alone can
never show.  Also injects EIO from fdatasync on request.
"""

import errno
import os
import random
import shutil
import time

from blockd.fileio import OsFiles

PAGE = 4096


class FaultFiles(OsFiles):
    """Files are tracked by identity (a counter per created file), not by path or
    inode number, so a file unlinked and re-created under the same name, or an
    inode number reused, is never mistaken for the old one."""

    def __init__(self, root, seed=0):
        self.root = os.path.abspath(root)
        os.makedirs(self.root, exist_ok=True)
        self.rng = random.Random(seed)
        self._next_id = 0
        self.fd_id = {}  # fd -> file identity
        self.path_id = {}  # current path -> identity
        self.durable_data = {}  # identity -> bytes as of its last sync
        self.durable_names = {}  # path -> identity, as of the last fsync of its directory
        self.dirs = set()
        self.fail_fdatasync = False
        self.jitter = 0.0  # seconds: sleep before some writes, to expose races
        self.syncs = 0
        for dirpath, dirnames, filenames in os.walk(self.root):
            for d in dirnames:
                p = os.path.join(dirpath, d)
                self.dirs.add(p)
                self.path_id[p] = self.durable_names[p] = self._new_id()
            for f in filenames:
                p = os.path.join(dirpath, f)
                ident = self.path_id[p] = self.durable_names[p] = self._new_id()
                with open(p, "rb") as fh:
                    self.durable_data[ident] = fh.read()

    def _new_id(self):
        self._next_id += 1
        return self._next_id

    def _inside(self, path):
        return path == self.root or path.startswith(self.root + os.sep)

    # ---- the Files interface -------------------------------------------------
    def open(self, path, create=False, size=None):
        path = os.path.abspath(path)
        existed = os.path.exists(path)
        fd = super().open(path, create, size)
        if self._inside(path):
            if not existed or path not in self.path_id:
                self.path_id[path] = self._new_id()
            self.fd_id[fd] = self.path_id[path]
        return fd

    def open_readonly(self, path):
        path = os.path.abspath(path)
        fd = super().open_readonly(path)
        if path in self.path_id:
            self.fd_id[fd] = self.path_id[path]
        return fd

    def close(self, fd):
        self.fd_id.pop(fd, None)
        super().close(fd)

    def unlink(self, path):
        path = os.path.abspath(path)
        super().unlink(path)
        self.path_id.pop(path, None)

    def rename(self, src, dst):
        src, dst = os.path.abspath(src), os.path.abspath(dst)
        super().rename(src, dst)
        if src in self.path_id:
            self.path_id[dst] = self.path_id.pop(src)

    def mkdir(self, path):
        path = os.path.abspath(path)
        made = super().mkdir(path)
        if made and self._inside(path):
            self.dirs.add(path)
            self.path_id[path] = self._new_id()
        return made

    def pwrite(self, fd, buf, offset):
        if self.jitter and self.rng.random() < 0.3:
            time.sleep(self.jitter)  # widen race windows between bookkeeping and the write
        return super().pwrite(fd, buf, offset)

    def _sync(self, fd):
        if self.fail_fdatasync:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        self.syncs += 1
        ident = self.fd_id.get(fd)
        if ident is not None:
            size = os.fstat(fd).st_size
            self.durable_data[ident] = os.pread(fd, size, 0) if size else b""

    def fdatasync(self, fd):
        self._sync(fd)
        super().fdatasync(fd)

    def fsync(self, fd):
        self._sync(fd)
        super().fsync(fd)

    def fsync_dir(self, path):
        path = os.path.abspath(path)
        if self.fail_fdatasync:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        if not self._inside(path):
            return
        for p in list(self.durable_names):
            if os.path.dirname(p) == path:
                del self.durable_names[p]
        for name in os.listdir(path):
            p = os.path.join(path, name)
            if p in self.path_id:
                self.durable_names[p] = self.path_id[p]

    # ---- the power cut -------------------------------------------------------
    def crash(self, tear=False, image=None):
        """Close every descriptor handed out and rewrite the tree to what a power cut leaves.

        ``image`` is a ``cut()`` taken earlier: the power went out then, even
        if the program kept running until now.
        """
        if image is None:
            image = self.cut(tear)
        for fd in list(self.fd_id):
            try:
                os.close(fd)
            except OSError:
                pass
        self.fd_id.clear()
        for name in os.listdir(self.root):
            full = os.path.join(self.root, name)
            if os.path.isdir(full) and not os.path.islink(full):
                shutil.rmtree(full)
            else:
                os.unlink(full)
        for p in sorted(image):
            if image[p] is None:
                os.makedirs(p, exist_ok=True)
        for p, data in image.items():
            if data is not None:
                os.makedirs(os.path.dirname(p), exist_ok=True)
                with open(p, "wb") as fh:
                    fh.write(data)

    def cut(self, tear=False):
        """What the disk holds if the power goes out now: {path: bytes, or None for a dir}."""
        survivors = {}
        for p, ident in sorted(dict(self.durable_names).items()):
            parent = os.path.dirname(p)
            if parent != self.root and parent not in self.durable_names:
                continue  # its directory entry never became durable
            if p in self.dirs and (os.path.isdir(p) or ident not in self.durable_data):
                survivors[p] = None
                continue
            old = self.durable_data.get(ident, b"")
            if tear and self.path_id.get(p) == ident and os.path.isfile(p):
                with open(p, "rb") as fh:
                    survivors[p] = self._tear(old, fh.read())
            else:
                survivors[p] = old
        return survivors

    def _tear(self, old, new):
        length = self.rng.choice([len(old), len(new)])
        out = bytearray(length)
        for page in range(0, length, PAGE):
            src = new if self.rng.random() < 0.5 else old
            chunk = src[page : page + PAGE]
            out[page : page + len(chunk)] = chunk
        return bytes(out)
