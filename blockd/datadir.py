"""The data dir: where a node keeps its catalog and volumes, and who owns it.

    <data dir>/
        catalog.db          SQLite catalog (WAL)
        blockd.lock         flock: held by the process that writes volume data (its text: the
                            holder's pid, then its nbdkit child's when `blockd serve` runs one)
        volumes/<id>/       chunk files, created on first write
        locks/<id>.lock     flock: held while a volume is open (attached)
        resync/<id>.<peer>.log  chunks a replica missed (replication's resync bitmap)

Owns paths and locks; never reads or writes volume data.
"""

import errno
import fcntl
import os
import shutil

from . import replproto as rp
from .catalog import Catalog
from .errors import BadInput, BlockdError, Busy, ReadOnly
from .fileio import fsync_dir

ENV_DATA_DIR = "BLOCKD_DATA_DIR"


def _alive(pid):
    """Whether process ``pid`` exists and is not a zombie (a zombie holds no files any more)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2:stat.rfind(b")") + 3] != b"Z"


def default_data_dir():
    """``$BLOCKD_DATA_DIR``, else /var/lib/blockd for root, else ~/.local/share/blockd."""
    env = os.environ.get(ENV_DATA_DIR)
    if env:
        return env
    if os.geteuid() == 0:
        return "/var/lib/blockd"
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "blockd")


class DataDir:
    def __init__(self, path):
        if not path:
            raise BadInput("invalid data dir: empty path")
        self.path = os.path.abspath(path)
        self.catalog_path = os.path.join(self.path, "catalog.db")
        self.volumes_path = os.path.join(self.path, "volumes")
        self.locks_path = os.path.join(self.path, "locks")
        self.resync_dir = os.path.join(self.path, "resync")
        self.lock_path = os.path.join(self.path, "blockd.lock")
        self._lock_fd = None

    def init(self):
        """Create the directory tree if missing; refuse clearly on a read-only or bad path."""
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise BadInput(f"invalid data dir {self.path}: exists and is not a directory")
        try:
            for p in (self.path, self.volumes_path, self.locks_path, self.resync_dir):
                if not os.path.isdir(p):
                    os.makedirs(p, mode=0o700, exist_ok=True)
                    # A new directory entry is durable only once its parent is synced.
                    fsync_dir(os.path.dirname(p))
                    fsync_dir(p)
            probe = os.path.join(self.path, ".write-probe")
            with open(probe, "wb"):
                pass
            os.unlink(probe)
        except OSError as exc:
            raise self._error(exc) from exc
        return self

    def _error(self, exc):
        """An OSError on the data dir as the error a user sees (read-only gets its own class)."""
        if exc.errno == errno.EROFS:
            return ReadOnly(f"data dir {self.path}: read-only filesystem")
        return BlockdError(f"data dir {self.path}: {exc.strerror}")

    def exists(self):
        return os.path.exists(self.catalog_path)

    def catalog(self, create=True, readonly=False):
        """The catalog; ``readonly`` for commands that only look (works on a read-only mount)."""
        if create and not readonly:
            self.init()
        elif not self.exists():
            raise BlockdError(f"data dir {self.path}: no catalog (create a volume first)")
        return Catalog(self.catalog_path, create=create, readonly=readonly)

    def volume_path(self, volume_id):
        return os.path.join(self.volumes_path, str(volume_id))

    def resync_path(self, volume_id, peer):
        """The durable set of chunks peer ``peer`` missed for a volume (see replication)."""
        return os.path.join(self.resync_dir, f"{volume_id}.{peer}.log")

    def applied_path(self, volume_id):
        """A replica's last applied client write, (epoch, seq) as two little-endian u64s, rewritten in
        place after each one (no sync: as durable as the data it stands for; the catalog has it as of
        the last flush, durably)."""
        return os.path.join(self.volume_path(volume_id), "applied")

    def applied_position(self, volume_id):
        """(epoch, seq) from the applied file, or (0, 0) if there is none (or it is torn)."""
        try:
            with open(self.applied_path(volume_id), "rb") as f:
                raw = f.read(16)
        except OSError:
            return (0, 0)
        if len(raw) != 16:
            return (0, 0)
        return (int.from_bytes(raw[:8], "little"), int.from_bytes(raw[8:], "little"))

    def replica_applied(self, row):
        """A replica copy's last applied client write, (epoch, seq), as its durable records have it: the
        catalog row's (as of the last flush) or the applied file's, whichever is later; (0, 0) for a copy
        whose data is gone (replica_copy_lost)."""
        if self.replica_copy_lost(row):
            return (0, 0)
        return max((row["applied_epoch"] or 0, row["applied_seq"] or 0), self.applied_position(row["id"]))

    def replica_copy_lost(self, row):
        """A replica copy whose data is gone: the catalog says it applied client writes (as of a flush),
        but its volume directory, which holds every chunk and the applied file, is missing (wiped by
        hand, a replaced disk).  Its reads would be zeros; it is not a copy of anything."""
        if row["role"] != "replica" or (row["applied_epoch"] or 0, row["applied_seq"] or 0) <= (0, 0):
            return False
        try:
            os.stat(self.volume_path(row["id"]))
        except FileNotFoundError:
            return True
        except OSError:
            return False  # EACCES, EIO: not known to be gone
        return False

    def replica_sync_state(self, row):
        """The sync state to show and decide on: ``empty`` for a lost copy, else what its primary last said."""
        return rp.EMPTY if self.replica_copy_lost(row) else row["sync_state"]

    def tombstone_path(self, repl_id, peer):
        """Present while ``peer`` still holds a copy of a volume deleted here (it did not answer the
        DELETE): {"name", "epoch"}; the server sends the DELETE again when the peer answers."""
        return os.path.join(self.resync_dir, f"deleted.{repl_id}.{peer}")

    def remember_peer_deletes(self, row, peers):
        """Tombstones for the copies ``peers`` hold of the deleted primary volume ``row``."""
        import json

        os.makedirs(self.resync_dir, exist_ok=True)
        for peer in peers:
            path = self.tombstone_path(row["repl_id"], peer)
            with open(path + ".tmp", "w") as f:  # whole or absent: a torn one would never be delivered
                json.dump({"name": row["name"], "epoch": row["epoch"]}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(path + ".tmp", path)
        if peers:
            fsync_dir(self.resync_dir)

    def tombstones(self):
        """[(path, repl_id, peer, {"name", "epoch"})] of copies still to delete on peers."""
        import json

        out = []
        try:
            names = os.listdir(self.resync_dir)
        except OSError:
            return out
        for name in names:
            parts = name.split(".", 2)
            if len(parts) != 3 or parts[0] != "deleted" or not parts[1].isdigit() or name.endswith(".tmp"):
                continue
            path = os.path.join(self.resync_dir, name)
            try:
                with open(path) as f:
                    info = json.load(f)
            except (OSError, ValueError):
                continue
            if isinstance(info, dict) and isinstance(info.get("epoch"), int):
                out.append((path, int(parts[1]), parts[2], info))
        return out

    def chunk_list_path(self, volume_id, peer):
        """Present while ``peer``'s list of chunks is still to be merged into its resync bitmap (after a
        promotion of a volume too big to compare whole: a chunk only the other copy holds is compared too)."""
        return os.path.join(self.resync_dir, f"{volume_id}.{peer}.list")

    def closed_peer_status(self, volume_id, peer, why):
        """A peer's replication status while its volume is not open here: what its durable resync
        bitmap says (``why``: why nothing better is known)."""
        from .fileio import OsFiles
        from .intent import IntentLog

        try:
            left = len(IntentLog(OsFiles(), self.resync_path(volume_id, peer["name"])).load())
        except OSError:
            left = None
        out = {"state": "out_of_sync" if left else f"unknown ({why})", "address": peer["address"]}
        if left is not None:
            out["resync_remaining_chunks"] = left
        return out

    # ---- locks -------------------------------------------------------------
    def lock(self):
        """Take the data-dir lock (non-blocking) and return its fd; refuse if held."""
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise self._error(exc) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = (self._holder_pids(fd) or ["another process"])[0]
            os.close(fd)
            raise Busy(f"data dir {self.path} is in use by blockd pid {holder}; stop it or use another --data-dir")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd
        return fd

    @staticmethod
    def _holder_pids(fd):
        text = os.pread(fd, 64, 0).decode(errors="replace")
        return [w for w in text.split() if w.isdigit()]

    @staticmethod
    def record_holder(fd, child_pid):
        """`blockd serve`: name its nbdkit child after its own pid in the lock file (see
        wait_for_dead_holder).  Written in place, fixed width: a reader never sees it empty."""
        os.pwrite(fd, f"{os.getpid():>10}\n{child_pid:>10}\n".encode(), 0)

    def _lock_holders(self):
        """The pids recorded by whoever holds the data-dir lock now, or None if it is free (or absent)."""
        try:
            fd = os.open(self.lock_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return None  # free (released when fd closes below)
            except BlockingIOError:
                return self._holder_pids(fd)
        finally:
            os.close(fd)

    def wait_for_dead_holder(self, timeout):
        """If the lock is held but the process that took it (the first pid recorded) has exited (a
        `blockd serve` killed a moment ago: the kernel is still ending its nbdkit child, which dies with
        it), wait up to ``timeout`` seconds for the lock to be free.  Returns at once when the lock is
        free or its taker is alive (`lock` then refuses, naming it): this only ever delays a start."""
        import time

        deadline = time.monotonic() + timeout
        while True:
            pids = self._lock_holders()
            if not pids or _alive(int(pids[0])) or time.monotonic() > deadline:
                return
            time.sleep(0.02)

    def serve_holds_lock(self):
        """Whether a live `blockd serve` holds the data-dir lock (its lock file names it, then its nbdkit):
        a server, perhaps between a crash of its nbdkit and the restart.  False when the lock is free or
        an offline command holds it."""
        pids = self._lock_holders()
        return bool(pids) and len(pids) == 2 and _alive(int(pids[0]))

    def adopt_lock(self, fd):
        """Use a lock fd inherited from `blockd serve` (exec'd into nbdkit)."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # same open file: succeeds if ours
        except OSError as exc:
            raise Busy(f"data dir {self.path}: inherited lock fd {fd} is not usable: {exc.strerror}") from exc
        self._lock_fd = fd
        return fd

    def is_locked(self):
        """True if some process holds the data-dir lock."""
        if not os.path.exists(self.lock_path):
            return False
        fd = os.open(self.lock_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def unlock(self):
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def volume_lock(self, volume_id, blocking=False):
        """flock held while a volume is open; None if another process holds it."""
        try:
            os.makedirs(self.locks_path, mode=0o700, exist_ok=True)
            fd = os.open(
                os.path.join(self.locks_path, f"{volume_id}.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
            )
        except OSError as exc:
            raise self._error(exc) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def allocated_bytes(self, volume_id):
        """Physical bytes of a volume's directory (st_blocks); 0 before its first write.

        Here, not in the store, so control-plane commands never import numba.
        """
        return self._tree_blocks(self.volume_path(volume_id))

    def chunk_count(self, volume_id):
        """Chunk files a volume has on disk (0 before its first write)."""
        try:
            return sum(1 for name in os.listdir(self.volume_path(volume_id)) if name.endswith(".chunk"))
        except FileNotFoundError:
            return 0

    def physical(self):
        """The pool's physical side: filesystem size and free space, bytes blockd itself uses.

        ``used`` is what the data dir holds (chunks, checksums, logs, catalog),
        counted by allocated blocks, so holes cost nothing; ``available`` is
        what can still be written (statvfs f_bavail).  Before the data dir
        exists, the filesystem it would be created on is measured.
        """
        probe = self.path
        while not os.path.isdir(probe):
            parent = os.path.dirname(probe)
            if parent == probe:
                break
            probe = parent
        st = os.statvfs(probe)
        used = 0
        for top in (self.path, self.volumes_path):
            try:
                with os.scandir(top) as it:
                    for entry in it:
                        if entry.is_file(follow_symlinks=False):
                            used += _blocks(entry)
                        elif top == self.volumes_path and entry.is_dir(follow_symlinks=False):
                            used += _blocks(entry) + self._tree_blocks(entry.path)
            except FileNotFoundError:
                continue
        return {"size": st.f_blocks * st.f_frsize, "used": used, "available": st.f_bavail * st.f_frsize}

    @staticmethod
    def _tree_blocks(path):
        total = 0
        try:
            with os.scandir(path) as it:
                for entry in it:
                    total += _blocks(entry)
        except FileNotFoundError:
            pass
        return total

    def remove_volume_files(self, volume_id):
        shutil.rmtree(self.volume_path(volume_id), ignore_errors=True)
        try:
            for name in os.listdir(self.resync_dir):
                if name.startswith(f"{volume_id}."):
                    os.unlink(os.path.join(self.resync_dir, name))
        except FileNotFoundError:
            pass
        try:
            os.unlink(os.path.join(self.locks_path, f"{volume_id}.lock"))
        except FileNotFoundError:
            pass


def _blocks(entry):
    """Allocated bytes of a directory entry; 0 if it vanished meanwhile."""
    try:
        return entry.stat(follow_symlinks=False).st_blocks * 512
    except FileNotFoundError:
        return 0
