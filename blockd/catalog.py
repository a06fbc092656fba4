"""The catalog: pools and volumes in SQLite (WAL, synchronous=FULL) in the data dir.

Owns the schema, its format version and every query.  Provisioning a volume
writes one row and nothing else (no files).  Volume ids are never reused
(AUTOINCREMENT), so a deleted volume's leftover directory can never be
mistaken for a new volume's.  Never touches chunk files.
"""

import sqlite3
import threading
import time

from .errors import BadInput, BlockdError, NotFound, Refused
from .geometry import DEFAULT_CHUNK_SIZE
from .sizes import check_name, check_volume_size

FORMAT_VERSION = 1
DEFAULT_POOL = "default"
BUSY_TIMEOUT_SECONDS = 30  # a CLI waiting on a long provisioning transaction

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS pools (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    name          TEXT NOT NULL UNIQUE,
    chunk_size    INTEGER NOT NULL,
    logical_limit INTEGER            -- NULL: no limit set yet
);
CREATE TABLE IF NOT EXISTS volumes (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    name       TEXT NOT NULL UNIQUE,
    pool_id    INTEGER NOT NULL REFERENCES pools(id),
    size       INTEGER NOT NULL CHECK (size > 0 AND size % 4096 = 0),
    type       TEXT NOT NULL DEFAULT 'raw',
    role       TEXT NOT NULL DEFAULT 'primary',
    epoch      INTEGER NOT NULL DEFAULT 1,
    created_at REAL NOT NULL
);
"""

VOLUME_TYPES = ("raw",)  # the EBS types arrive with QoS


class Catalog:
    def __init__(self, path, create=True, readonly=False):
        """Open (and with ``create``, initialise) the catalog.

        ``readonly`` opens without writing anything (listing commands), and
        still works on a read-only filesystem where WAL's shared-memory file
        cannot be created.
        """
        self.path = path
        self._lock = threading.Lock()
        try:
            if readonly:
                self._db = self._connect_readonly(path)
            else:
                self._db = sqlite3.connect(
                    path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None, check_same_thread=False
                )
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")
                self._db.execute("PRAGMA foreign_keys=ON")
            self._db.row_factory = sqlite3.Row
            if create and not readonly:
                self._init_schema()
            self._check_version()
        except sqlite3.OperationalError as exc:
            raise BlockdError(f"catalog {path}: {exc}") from exc

    @staticmethod
    def _connect_readonly(path):
        from urllib.parse import quote

        uri = "file:" + quote(path)
        for mode in ("?mode=ro", "?mode=ro&immutable=1"):
            db = sqlite3.connect(
                uri + mode, uri=True, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None, check_same_thread=False
            )
            try:
                db.execute("SELECT COUNT(*) FROM meta").fetchone()
                return db
            except sqlite3.OperationalError:
                db.close()
                if mode.endswith("immutable=1"):
                    raise
        raise AssertionError("unreachable")

    def _init_schema(self):
        with self.transaction() as db:
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('format_version', ?)", (str(FORMAT_VERSION),)
            )
            db.execute(
                "INSERT OR IGNORE INTO pools (name, chunk_size) VALUES (?, ?)", (DEFAULT_POOL, DEFAULT_CHUNK_SIZE)
            )

    def _check_version(self):
        row = self._db.execute("SELECT value FROM meta WHERE key='format_version'").fetchone()
        if row is None or int(row[0]) != FORMAT_VERSION:
            found = row[0] if row else "none"
            raise Refused(f"catalog {self.path}: format version {found}, this blockd reads {FORMAT_VERSION}")

    class _Tx:
        def __init__(self, catalog):
            self.catalog = catalog

        def __enter__(self):
            self.catalog._lock.acquire()
            try:
                self.catalog._db.execute("BEGIN IMMEDIATE")
            except BaseException:
                self.catalog._lock.release()
                raise
            return self.catalog._db

        def __exit__(self, exc_type, exc, tb):
            try:
                self.catalog._db.execute("ROLLBACK" if exc_type else "COMMIT")
            finally:
                self.catalog._lock.release()
            return False

    def transaction(self):
        """``with catalog.transaction() as db:`` — one write transaction, all or nothing."""
        return Catalog._Tx(self)

    def _query(self, sql, args=()):
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # ---- pools -------------------------------------------------------------
    def pool(self, name=DEFAULT_POOL):
        rows = self._query("SELECT * FROM pools WHERE name=?", (name,))
        if not rows:
            raise NotFound(f"unknown pool {name!r}")
        return dict(rows[0])

    def set_chunk_size(self, chunk_size, name=DEFAULT_POOL):
        """Only while the pool has no volumes: chunk size is fixed per pool."""
        with self.transaction() as db:
            pool = db.execute("SELECT id FROM pools WHERE name=?", (name,)).fetchone()
            used = db.execute("SELECT COUNT(*) FROM volumes WHERE pool_id=?", (pool[0],)).fetchone()[0]
            if used:
                raise Refused(f"pool {name}: chunk size is fixed once volumes exist")
            db.execute("UPDATE pools SET chunk_size=? WHERE id=?", (chunk_size, pool[0]))

    # ---- volumes -----------------------------------------------------------
    def create_volume(self, name, size, type_="raw"):
        check_name(name)
        check_volume_size(size)
        if type_ not in VOLUME_TYPES:
            raise BadInput(f"invalid volume type {type_!r}: known types are {', '.join(VOLUME_TYPES)}")
        with self.transaction() as db:
            if db.execute("SELECT 1 FROM volumes WHERE name=?", (name,)).fetchone():
                raise Refused(f"volume {name} already exists")
            pool = db.execute("SELECT id FROM pools WHERE name=?", (DEFAULT_POOL,)).fetchone()
            cur = db.execute(
                "INSERT INTO volumes (name, pool_id, size, type, created_at) VALUES (?, ?, ?, ?, ?)",
                (name, pool[0], size, type_, time.time()),
            )
            volume_id = cur.lastrowid
        return self.volume(name) if volume_id else None

    def volume(self, name):
        rows = self._query(
            "SELECT v.*, p.chunk_size FROM volumes v JOIN pools p ON p.id = v.pool_id WHERE v.name=?", (name,)
        )
        if not rows:
            raise NotFound(f"unknown volume {name!r}")
        return dict(rows[0])

    def find_volume(self, name):
        try:
            return self.volume(name)
        except NotFound:
            return None

    def volume_by_id(self, volume_id):
        rows = self._query("SELECT * FROM volumes WHERE id=?", (volume_id,))
        return dict(rows[0]) if rows else None

    def volumes(self, limit=None, type_=None):
        sql = "SELECT v.*, p.chunk_size FROM volumes v JOIN pools p ON p.id = v.pool_id"
        args = []
        if type_ is not None:
            sql += " WHERE v.type = ?"
            args.append(type_)
        sql += " ORDER BY v.name"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(int(limit))
        return [dict(r) for r in self._query(sql, args)]

    def resize_volume(self, name, size):
        """Grow only: a block device that shrinks under a filesystem loses data."""
        check_volume_size(size)
        with self.transaction() as db:
            row = db.execute("SELECT size FROM volumes WHERE name=?", (name,)).fetchone()
            if not row:
                raise NotFound(f"unknown volume {name!r}")
            if size < row[0]:
                raise Refused(f"volume {name}: shrinking from {row[0]} to {size} bytes is refused (grow only)")
            db.execute("UPDATE volumes SET size=? WHERE name=?", (size, name))

    def volume_names(self, limit):
        return [r[0] for r in self._query("SELECT name FROM volumes ORDER BY name LIMIT ?", (limit,))]

    def count_volumes(self):
        return self._query("SELECT COUNT(*) FROM volumes")[0][0]

    def delete_volume(self, name):
        with self.transaction() as db:
            row = db.execute("SELECT id FROM volumes WHERE name=?", (name,)).fetchone()
            if not row:
                raise NotFound(f"unknown volume {name!r}")
            db.execute("DELETE FROM volumes WHERE id=?", (row[0],))
            return row[0]

    def close(self):
        with self._lock:
            self._db.close()
