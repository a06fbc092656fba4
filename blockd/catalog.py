"""The catalog: pools and volumes in SQLite (WAL, synchronous=FULL) in the data dir.

Owns the schema, its format version and every query.  Provisioning a volume
writes one row and nothing else (no files).  Volume ids are never reused
(AUTOINCREMENT), so a deleted volume's leftover directory can never be
mistaken for a new volume's.  Never touches chunk files.
"""

import sqlite3
import threading
import time

from . import voltypes
from .errors import BadInput, BlockdError, NotFound, Refused
from .geometry import DEFAULT_CHUNK_SIZE
from .sizes import check_name, check_volume_size, format_size

FORMAT_VERSION = 7
DEFAULT_POOL = "default"
MAX_LOGICAL_LIMIT = 2**63 - 1  # SQLite integers are signed 64-bit
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
    logical_limit INTEGER,           -- NULL: no limit set (unlimited)
    provisioned   INTEGER NOT NULL DEFAULT 0,  -- sum of its volumes' sizes, kept in the same transactions
    modify_cooldown REAL NOT NULL DEFAULT 21600   -- seconds between modifications of a volume (EBS: 6 h)
);
CREATE TABLE IF NOT EXISTS volumes (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    name       TEXT NOT NULL UNIQUE,
    pool_id    INTEGER NOT NULL REFERENCES pools(id),
    size       INTEGER NOT NULL CHECK (size > 0 AND size % 4096 = 0),
    type       TEXT NOT NULL DEFAULT 'raw',
    role       TEXT NOT NULL DEFAULT 'primary',
    epoch      INTEGER NOT NULL DEFAULT 1,
    created_at REAL NOT NULL,
    iops       INTEGER,                -- provisioned IOPS (NULL: the type's default)
    throughput INTEGER,                -- provisioned MiB/s (NULL: the type's default)
    credits    REAL,                   -- burst credit balance (gp2: I/Os, st1/sc1: bytes) at credits_at
    credits_at REAL,                   -- wall time (NULL credits: a full bucket)
    mod_started_at    REAL,            -- last Elastic Volumes modification: modifying from here,
    mod_optimizing_at REAL,            --   optimizing (new limits apply) from here,
    mod_completed_at  REAL,            --   completed from here
    mod_from          TEXT,            -- JSON: type, size, iops, throughput before it
    repl_id    INTEGER,                -- replication id, the same on every copy (NULL: not replicated)
    min_copies INTEGER NOT NULL DEFAULT 1,  -- copies a write needs before it is acknowledged
    sync_state TEXT,                   -- replica: in_sync/out_of_sync as its primary last said
    copies     TEXT,                   -- replica: JSON list of every copy {name, key, address} as the primary knows them
    applied_seq INTEGER NOT NULL DEFAULT 0,   -- replica: the last client write applied here (its seq,
    applied_epoch INTEGER NOT NULL DEFAULT 0  --   and the epoch it came at), as of its last flush
);
CREATE UNIQUE INDEX IF NOT EXISTS volumes_repl_id ON volumes(repl_id);
CREATE TABLE IF NOT EXISTS peers (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    name       TEXT NOT NULL UNIQUE,
    address    TEXT NOT NULL,          -- tcp://HOST:PORT of its replication sink
    public_key TEXT,                   -- CurveZMQ public key (Z85); NULL only for insecure peers
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS volume_replicas (
    volume_id  INTEGER NOT NULL REFERENCES volumes(id) ON DELETE CASCADE,
    peer_id    INTEGER NOT NULL REFERENCES peers(id),
    seeded     INTEGER NOT NULL DEFAULT 0,  -- the peer has held a copy (a fresh one there means: full resync)
    PRIMARY KEY (volume_id, peer_id)
);
"""

# Upgrades from older formats, in order: version -> statements reaching version + 1.
MIGRATIONS = {
    1: [
        "ALTER TABLE pools ADD COLUMN provisioned INTEGER NOT NULL DEFAULT 0",
        "UPDATE pools SET provisioned = (SELECT COALESCE(SUM(size), 0) FROM volumes WHERE pool_id = pools.id)",
        "ALTER TABLE volumes ADD COLUMN iops INTEGER",
        "ALTER TABLE volumes ADD COLUMN throughput INTEGER",
    ],
    2: [
        "ALTER TABLE pools ADD COLUMN modify_cooldown REAL NOT NULL DEFAULT 21600",
        "ALTER TABLE volumes ADD COLUMN credits REAL",
        "ALTER TABLE volumes ADD COLUMN credits_at REAL",
        "ALTER TABLE volumes ADD COLUMN mod_started_at REAL",
        "ALTER TABLE volumes ADD COLUMN mod_optimizing_at REAL",
        "ALTER TABLE volumes ADD COLUMN mod_completed_at REAL",
        "ALTER TABLE volumes ADD COLUMN mod_from TEXT",
    ],
    3: [
        "ALTER TABLE volumes ADD COLUMN repl_id INTEGER",
        "ALTER TABLE volumes ADD COLUMN min_copies INTEGER NOT NULL DEFAULT 1",
        "CREATE UNIQUE INDEX IF NOT EXISTS volumes_repl_id ON volumes(repl_id)",
        "CREATE TABLE IF NOT EXISTS peers (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL UNIQUE, "
        "address TEXT NOT NULL, public_key TEXT, created_at REAL NOT NULL)",
        "CREATE TABLE IF NOT EXISTS volume_replicas (volume_id INTEGER NOT NULL REFERENCES volumes(id) "
        "ON DELETE CASCADE, peer_id INTEGER NOT NULL REFERENCES peers(id), seeded INTEGER NOT NULL DEFAULT 0, "
        "PRIMARY KEY (volume_id, peer_id))",
    ],
    4: [
        "ALTER TABLE volumes ADD COLUMN sync_state TEXT",
        "ALTER TABLE volumes ADD COLUMN copies TEXT",
    ],
    5: [
        "ALTER TABLE volumes ADD COLUMN applied_seq INTEGER NOT NULL DEFAULT 0",
    ],
    6: [
        "ALTER TABLE volumes ADD COLUMN applied_epoch INTEGER NOT NULL DEFAULT 0",
    ],
}

PROVISION_BATCH = 10_000  # rows per statement while provisioning a plan (progress granularity)
MAX_IOPS = 10_000_000
MAX_THROUGHPUT = 1_000_000  # MiB/s


def _new_repl_id(db):
    import secrets

    while True:
        candidate = secrets.randbits(62) + 1
        if not db.execute("SELECT 1 FROM volumes WHERE repl_id=?", (candidate,)).fetchone():
            return candidate


def _ago(seconds):
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")


class _RollBack(Exception):
    """Leaves a transaction without committing (dry runs)."""


def check_type(type_):
    if type_ not in voltypes.VOLUME_TYPES:
        raise BadInput(f"invalid volume type {type_!r}: known types are {', '.join(voltypes.VOLUME_TYPES)}")
    return type_


def check_not_a_replica_copy(row):
    """Resize and modify act on a volume of this node: a replica copy held here grows with its primary."""
    if row["role"] == "replica":
        raise Refused(f"volume {row['name']} is a replica copy here: resize or modify it on its primary "
                      "(its copies grow with it)")


def check_qos(iops, throughput):
    """Provisioned IOPS and throughput (MiB/s): positive integers or None (the type's default)."""
    for label, value, top in (("iops", iops, MAX_IOPS), ("throughput", throughput, MAX_THROUGHPUT)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= top:
            raise BadInput(f"invalid {label} {value!r}: must be a whole number from 1 to {top}")


class Catalog:
    def __init__(self, path, create=True, readonly=False):
        """Open (and with ``create``, initialise) the catalog.

        ``readonly`` opens without writing anything (listing commands), and
        still works on a read-only filesystem where WAL's shared-memory file
        cannot be created.  A catalog of an older format is upgraded in place
        by the first open that can write.
        """
        self.path = path
        self._lock = threading.Lock()
        try:
            if readonly:
                self._db = self._connect_readonly(path)
                self._db.row_factory = sqlite3.Row
                if self._version() < FORMAT_VERSION:
                    # Upgrade once (a normal writable open), then read as asked.
                    self._db.close()
                    Catalog(path, create=False).close()
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
            if not readonly:
                self._migrate()
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
            fresh = db.execute("SELECT 1 FROM sqlite_master WHERE name='meta'").fetchone() is None
            if fresh:
                import re

                bare = re.sub(r"--[^\n]*", "", SCHEMA)  # comments may contain semicolons
                for statement in bare.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute("INSERT INTO meta (key, value) VALUES ('format_version', ?)", (str(FORMAT_VERSION),))
            db.execute(
                "INSERT OR IGNORE INTO pools (name, chunk_size) VALUES (?, ?)", (DEFAULT_POOL, DEFAULT_CHUNK_SIZE)
            )

    def _version(self):
        try:
            row = self._db.execute("SELECT value FROM meta WHERE key='format_version'").fetchone()
        except sqlite3.OperationalError:
            return None
        return int(row[0]) if row else None

    def _migrate(self):
        """Bring an older catalog to FORMAT_VERSION, one version per transaction."""
        while True:
            version = self._version()
            if version is None or version >= FORMAT_VERSION or version not in MIGRATIONS:
                return
            with self.transaction() as db:
                if int(db.execute("SELECT value FROM meta WHERE key='format_version'").fetchone()[0]) != version:
                    continue  # another process upgraded it meanwhile
                for statement in MIGRATIONS[version]:
                    db.execute(statement)
                db.execute("UPDATE meta SET value=? WHERE key='format_version'", (str(version + 1),))

    def _check_version(self):
        version = self._version()
        if version != FORMAT_VERSION:
            found = version if version is not None else "none"
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
        """The pool row plus ``volumes`` (count); ``logical_limit`` None means no limit is set."""
        rows = self._query("SELECT * FROM pools WHERE name=?", (name,))
        if not rows:
            raise NotFound(f"unknown pool {name!r}")
        out = dict(rows[0])
        out["volumes"] = self._query("SELECT COUNT(*) FROM volumes WHERE pool_id=?", (out["id"],))[0][0]
        return out

    def set_chunk_size(self, chunk_size, name=DEFAULT_POOL):
        """Only while the pool has no volumes: chunk size is fixed per pool."""
        with self.transaction() as db:
            pool = db.execute("SELECT id FROM pools WHERE name=?", (name,)).fetchone()
            used = db.execute("SELECT COUNT(*) FROM volumes WHERE pool_id=?", (pool[0],)).fetchone()[0]
            if used:
                raise Refused(f"pool {name}: chunk size is fixed once volumes exist")
            db.execute("UPDATE pools SET chunk_size=? WHERE id=?", (chunk_size, pool[0]))

    @staticmethod
    def effective_limit(pool):
        """The limit as shown: with none set, what is provisioned (so add/set arithmetic is what you see)."""
        return pool["logical_limit"] if pool["logical_limit"] is not None else pool["provisioned"]

    def add_capacity(self, delta, name=DEFAULT_POOL):
        """Raise the logical limit by ``delta`` bytes; returns (old, new) limits."""
        if delta <= 0:
            raise BadInput(f"invalid capacity {delta}: must be positive")
        with self.transaction() as db:
            pool = dict(db.execute("SELECT * FROM pools WHERE name=?", (name,)).fetchone())
            old = self.effective_limit(pool)
            new = old + delta
            if new > MAX_LOGICAL_LIMIT:
                raise BadInput(
                    f"invalid capacity: {format_size(old)} + {format_size(delta)} exceeds the largest limit "
                    f"{MAX_LOGICAL_LIMIT} bytes"
                )
            db.execute("UPDATE pools SET logical_limit=? WHERE id=?", (new, pool["id"]))
        return old, new

    def set_capacity(self, limit, name=DEFAULT_POOL):
        """Set the logical limit (None: no limit); refused below what is provisioned.  Returns (old, new)."""
        if limit is not None and not 0 <= limit <= MAX_LOGICAL_LIMIT:
            raise BadInput(f"invalid capacity {limit}: must be 0-{MAX_LOGICAL_LIMIT} bytes")
        with self.transaction() as db:
            pool = dict(db.execute("SELECT * FROM pools WHERE name=?", (name,)).fetchone())
            if limit is not None and limit < pool["provisioned"]:
                raise Refused(
                    f"pool {name}: cannot set the logical limit to {format_size(limit)}: "
                    f"{format_size(pool['provisioned'])} ({pool['provisioned']} bytes) is already provisioned; "
                    "delete volumes first or set a limit at least that large"
                )
            db.execute("UPDATE pools SET logical_limit=? WHERE id=?", (limit, pool["id"]))
        return self.effective_limit(pool), limit

    @staticmethod
    def _reserve(db, pool, extra, what):
        """Refuse ``extra`` more provisioned bytes beyond the limit, naming what is missing."""
        limit = pool["logical_limit"]
        if limit is None or pool["provisioned"] + extra <= limit:
            return
        missing = pool["provisioned"] + extra - limit
        raise Refused(
            f"pool {pool['name']}: {what} needs {format_size(missing)} ({missing} bytes) more logical capacity: "
            f"limit {format_size(limit)}, provisioned {format_size(pool['provisioned'])}; "
            f"raise it with `blockd capacity add {format_size(missing)}`"
        )

    # ---- volumes -----------------------------------------------------------
    def create_volume(self, name, size, type_="raw", iops=None, throughput=None, credits=None, replicas=(),
                      min_copies=None):
        """One row.  ``credits``: the initial burst balance (None: a full bucket).

        ``replicas`` names configured peers that each hold a copy; ``min_copies``
        (default 2 with replicas, else 1) is how many copies, this one included,
        a write needs before it is acknowledged.
        """
        check_name(name)
        check_volume_size(size)
        check_type(type_)
        check_qos(iops, throughput)
        voltypes.check(type_, size, iops, throughput)
        replicas = list(replicas)
        if len(set(replicas)) != len(replicas):
            raise BadInput(f"invalid --replica list {replicas}: a peer is named twice")
        if min_copies is None:
            min_copies = 2 if replicas else 1
        if isinstance(min_copies, bool) or not isinstance(min_copies, int) or not 1 <= min_copies <= 1 + len(replicas):
            raise BadInput(
                f"invalid --min-copies {min_copies}: 1 to {1 + len(replicas)} (this copy plus {len(replicas)} replica(s))"
            )
        now = time.time()
        with self.transaction() as db:
            if db.execute("SELECT 1 FROM volumes WHERE name=?", (name,)).fetchone():
                raise Refused(f"volume {name} already exists")
            peer_ids = []
            nodes = {}  # address or key -> the peer named with it: two names for one node are one copy
            for peer in replicas:
                row = db.execute("SELECT id, address, public_key FROM peers WHERE name=?", (peer,)).fetchone()
                if row is None:
                    raise NotFound(f"unknown peer {peer!r}: add it with `blockd peer add {peer} tcp://HOST:PORT --public-key KEY`")
                for node in (row["address"], row["public_key"]):
                    if node is not None and nodes.setdefault(node, peer) != peer:
                        raise BadInput(f"invalid --replica list {replicas}: peers {nodes[node]} and {peer} are "
                                       "the same node (same address or key): one copy, not two")
                peer_ids.append(row[0])
            pool = db.execute("SELECT * FROM pools WHERE name=?", (DEFAULT_POOL,)).fetchone()
            self._reserve(db, pool, size, f"creating {name} ({format_size(size)})")
            repl_id = _new_repl_id(db) if replicas else None
            cur = db.execute(
                "INSERT INTO volumes (name, pool_id, size, type, created_at, iops, throughput, credits, credits_at, "
                "repl_id, min_copies) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (name, pool["id"], size, type_, now, iops, throughput, credits, now if credits is not None else None,
                 repl_id, min_copies),
            )
            for peer_id in peer_ids:
                db.execute("INSERT INTO volume_replicas (volume_id, peer_id) VALUES (?, ?)", (cur.lastrowid, peer_id))
            db.execute("UPDATE pools SET provisioned = provisioned + ? WHERE id=?", (size, pool["id"]))
        return self.volume(name)

    def create_replica(self, name, size, type_, repl_id, epoch, min_copies=1, iops=None, throughput=None):
        """The replica side of a replicated volume (role 'replica': not exported until promoted), with its
        primary's type, IOPS and throughput (a promoted copy serves with them)."""
        check_name(name)
        check_volume_size(size)
        check_type(type_)
        check_qos(iops, throughput)
        with self.transaction() as db:
            existing = db.execute("SELECT repl_id FROM volumes WHERE name=?", (name,)).fetchone()
            if existing:
                raise Refused(f"volume {name} already exists on this node (replication id {existing[0]})")
            pool = db.execute("SELECT * FROM pools WHERE name=?", (DEFAULT_POOL,)).fetchone()
            self._reserve(db, pool, size, f"holding a replica of {name} ({format_size(size)})")
            db.execute(
                "INSERT INTO volumes (name, pool_id, size, type, iops, throughput, created_at, repl_id, role, epoch, "
                "min_copies) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'replica', ?, ?)",
                (name, pool["id"], size, type_, iops, throughput, time.time(), repl_id, epoch, min_copies),
            )
            db.execute("UPDATE pools SET provisioned = provisioned + ? WHERE id=?", (size, pool["id"]))
        return self.volume(name)

    def set_replica_limits(self, volume_id, type_, iops, throughput):
        """A replica copy's type, IOPS and throughput, as its primary's CREATE says (modified there)."""
        with self.transaction() as db:
            db.execute("UPDATE volumes SET type=?, iops=?, throughput=? WHERE id=? AND role='replica'",
                       (type_, iops, throughput, volume_id))

    def volume_by_repl_id(self, repl_id):
        rows = self._query(
            "SELECT v.*, p.chunk_size FROM volumes v JOIN pools p ON p.id = v.pool_id WHERE v.repl_id=?", (repl_id,)
        )
        return dict(rows[0]) if rows else None

    def set_epoch_role(self, volume_id, epoch, role):
        with self.transaction() as db:
            db.execute("UPDATE volumes SET epoch=?, role=?, sync_state=CASE WHEN sync_state='promoted' THEN NULL "
                       "ELSE sync_state END WHERE id=?", (epoch, role, volume_id))

    def adopt_epoch(self, volume_id, epoch):
        """A newer epoch reached this copy (a promotion elsewhere announced it, or its primary's message
        carries it): it is a replica at that epoch.  A primary here is thereby fenced, with no known sync
        state; a replica keeps what its primary last said (a refused promotion must not make a good copy
        unpromotable).  False if the copy already holds that epoch or a newer one."""
        with self.transaction() as db:
            cur = db.execute("UPDATE volumes SET epoch=?, role='replica', sync_state=CASE WHEN role='primary' OR "
                             "sync_state='promoted' THEN NULL ELSE sync_state END WHERE id=? AND epoch<?",
                             (epoch, volume_id, epoch))
            return cur.rowcount > 0

    def set_applied(self, volume_id, position):
        """A replica's last applied client write, (epoch, seq), made durable by a flush (promotion
        compares them: epoch first, since each primary's seqs come from its own clock)."""
        epoch, seq = position
        with self.transaction() as db:
            db.execute("UPDATE volumes SET applied_epoch=?, applied_seq=? WHERE id=? AND "
                       "(applied_epoch < ? OR (applied_epoch = ? AND applied_seq < ?))",
                       (epoch, seq, volume_id, epoch, epoch, seq))

    def clear_promoted(self, volume_id):
        with self.transaction() as db:
            db.execute("UPDATE volumes SET sync_state=NULL WHERE id=? AND sync_state='promoted'", (volume_id,))

    def mark_replica_behind(self, repl_id):
        """A replica refused a client write (corrupt, no space, an error): it lacks it, whatever its primary
        last said, until the primary's next CREATE says otherwise (promotion reads this)."""
        with self.transaction() as db:
            db.execute("UPDATE volumes SET sync_state='out_of_sync' WHERE repl_id=? AND role='replica'", (repl_id,))

    def mark_replicas_unconfirmed(self):
        """At a sink's start: every replica copy its primary last said was in sync becomes `unconfirmed`
        until a primary says so again (this node was down: its primary may have gone on without it)."""
        with self.transaction() as db:
            db.execute("UPDATE volumes SET sync_state='unconfirmed' WHERE role='replica' AND sync_state='in_sync'")

    def mark_replica_lost(self, volume_id):
        """A replica copy whose data is gone (DataDir.replica_copy_lost): empty, nothing applied, until its
        primary's full resync ends and says in sync."""
        with self.transaction() as db:
            db.execute("UPDATE volumes SET sync_state='empty', applied_epoch=0, applied_seq=0 "
                       "WHERE id=? AND role='replica'", (volume_id,))

    def set_replica_view(self, volume_id, sync_state, min_copies, copies_json):
        """What a replica's primary last told it: its sync state, the quorum, every copy."""
        with self.transaction() as db:
            db.execute("UPDATE volumes SET sync_state=?, min_copies=?, copies=? WHERE id=?",
                       (sync_state, min_copies, copies_json, volume_id))

    def confirm_primary(self, volume_id):
        """A primary writable before any peer answers (promote --force on the primary itself)."""
        with self.transaction() as db:
            db.execute("UPDATE volumes SET sync_state='promoted' WHERE id=? AND role='primary'", (volume_id,))

    def promote(self, name, peer_names, epoch=None):
        """Replica -> primary with ``epoch`` (default: the next one; promotion passes the one it announced,
        which this copy already adopted); ``peer_names`` (other copies, as this node names them) become its
        replicas.  Returns the new row."""
        with self.transaction() as db:
            row = db.execute("SELECT * FROM volumes WHERE name=?", (name,)).fetchone()
            if row is None:
                raise NotFound(f"unknown volume {name!r}")
            if row["role"] != "replica":
                raise Refused(f"volume {name} is already the primary here (epoch {row['epoch']})")
            # 'promoted': writable before any peer answers (this node just chose the new epoch).
            new_epoch = row["epoch"] + 1 if epoch is None else epoch
            if new_epoch < row["epoch"]:
                raise Refused(f"volume {name} is at epoch {row['epoch']}, past {new_epoch}")
            db.execute("UPDATE volumes SET role='primary', epoch=?, sync_state='promoted' WHERE id=?",
                       (new_epoch, row["id"]))
            db.execute("DELETE FROM volume_replicas WHERE volume_id=?", (row["id"],))
            for peer in peer_names:
                pid = db.execute("SELECT id FROM peers WHERE name=?", (peer,)).fetchone()
                if pid is not None:
                    db.execute("INSERT INTO volume_replicas (volume_id, peer_id, seeded) VALUES (?, ?, 1)",
                               (row["id"], pid[0]))
        return self.volume(name)

    def peer_by_key(self, public_key):
        rows = self._query("SELECT * FROM peers WHERE public_key=?", (public_key,))
        return dict(rows[0]) if rows else None

    def set_min_copies(self, name, min_copies):
        with self.transaction() as db:
            row = db.execute("SELECT id, repl_id, role, epoch FROM volumes WHERE name=?", (name,)).fetchone()
            if row is None:
                raise NotFound(f"unknown volume {name!r}")
            if row[2] == "replica":
                raise Refused(f"volume {name} is a replica here (epoch {row[3]}): --min-copies is set on its primary, "
                              "or after `blockd volume promote`")
            if row[1] is None:
                raise Refused(f"volume {name} is not replicated: it has one copy, and every write needs it")
            copies = 1 + db.execute("SELECT COUNT(*) FROM volume_replicas WHERE volume_id=?", (row[0],)).fetchone()[0]
            if isinstance(min_copies, bool) or not isinstance(min_copies, int) or not 1 <= min_copies <= copies:
                raise BadInput(f"invalid --min-copies {min_copies}: volume {name} has {copies} cop{'y' if copies == 1 else 'ies'}")
            db.execute("UPDATE volumes SET min_copies=? WHERE id=?", (min_copies, row[0]))

    def volume_replicas(self, volume_id):
        """The peers holding copies of a volume: [{name, address, public_key, peer_id, seeded}]."""
        rows = self._query(
            "SELECT p.id AS peer_id, p.name, p.address, p.public_key, r.seeded FROM volume_replicas r "
            "JOIN peers p ON p.id = r.peer_id WHERE r.volume_id=? ORDER BY p.name",
            (volume_id,),
        )
        return [dict(r) for r in rows]

    def set_seeded(self, volume_id, peer_id):
        with self.transaction() as db:
            db.execute("UPDATE volume_replicas SET seeded=1 WHERE volume_id=? AND peer_id=?", (volume_id, peer_id))

    # ---- peers -------------------------------------------------------------
    def add_peer(self, name, address, public_key):
        check_name(name, "peer")
        with self.transaction() as db:
            if db.execute("SELECT 1 FROM peers WHERE name=?", (name,)).fetchone():
                raise Refused(f"peer {name} already exists")
            # One node, one peer: under two names it would count as two copies of a volume it holds once.
            same = db.execute("SELECT name, address, public_key FROM peers WHERE address=? OR "
                              "(public_key IS NOT NULL AND public_key=?)", (address, public_key)).fetchone()
            if same is not None:
                what = "address" if same["address"] == address else "public key"
                raise Refused(f"peer {same['name']} already has {what} "
                              f"{address if what == 'address' else public_key}: one node is one peer")
            db.execute(
                "INSERT INTO peers (name, address, public_key, created_at) VALUES (?, ?, ?, ?)",
                (name, address, public_key, time.time()),
            )
        return self.peer(name)

    def peer(self, name):
        rows = self._query("SELECT * FROM peers WHERE name=?", (name,))
        if not rows:
            raise NotFound(f"unknown peer {name!r}")
        return dict(rows[0])

    def peers(self):
        return [dict(r) for r in self._query("SELECT * FROM peers ORDER BY name")]

    def remove_peer(self, name):
        with self.transaction() as db:
            row = db.execute("SELECT id FROM peers WHERE name=?", (name,)).fetchone()
            if row is None:
                raise NotFound(f"unknown peer {name!r}")
            used = db.execute(
                "SELECT v.name FROM volume_replicas r JOIN volumes v ON v.id = r.volume_id WHERE r.peer_id=? LIMIT 3",
                (row[0],),
            ).fetchall()
            if used:
                raise Refused(f"peer {name} holds copies of {', '.join(u[0] for u in used)}: delete those volumes first")
            db.execute("DELETE FROM peers WHERE id=?", (row[0],))

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

    def resize_volume(self, name, size, check_only=False):
        """Grow only: a block device that shrinks under a filesystem loses data.  ``check_only``: refuse
        what would be refused, change nothing."""
        check_volume_size(size)
        with self.transaction() as db:
            row = db.execute("SELECT * FROM volumes WHERE name=?", (name,)).fetchone()
            if not row:
                raise NotFound(f"unknown volume {name!r}")
            if row["role"] != "replica":  # a replica copy grows with its primary, which checked the size
                voltypes.check(row["type"], size, row["iops"], row["throughput"])
            if size < row["size"]:
                raise Refused(
                    f"volume {name}: shrinking from {format_size(row['size'])} to {format_size(size)} is refused "
                    "(grow only: a filesystem on it would lose data)"
                )
            pool = db.execute("SELECT * FROM pools WHERE id=?", (row["pool_id"],)).fetchone()
            self._reserve(db, pool, size - row["size"], f"growing {name} to {format_size(size)}")
            if check_only:
                return row["size"], size
            db.execute("UPDATE volumes SET size=? WHERE id=?", (size, row["id"]))
            db.execute("UPDATE pools SET provisioned = provisioned + ? WHERE id=?", (size - row["size"], pool["id"]))
        return row["size"], size

    def volume_names(self, limit):
        """Exportable volumes (replicas are not exported until promoted)."""
        return [
            r[0] for r in self._query("SELECT name FROM volumes WHERE role != 'replica' ORDER BY name LIMIT ?", (limit,))
        ]

    def count_volumes(self):
        return self._query("SELECT COUNT(*) FROM volumes")[0][0]

    def count_replicas(self):
        """Replica copies held here for other nodes' primaries."""
        return self._query("SELECT COUNT(*) FROM volumes WHERE role = 'replica'")[0][0]

    def set_credits(self, name, credits, at=None):
        """Record a burst balance (as of wall time ``at``); the server persists its live one the same way."""
        with self.transaction() as db:
            cur = db.execute(
                "UPDATE volumes SET credits=?, credits_at=? WHERE name=?",
                (float(credits), at if at is not None else time.time(), name),
            )
            if cur.rowcount == 0:
                raise NotFound(f"unknown volume {name!r}")

    def set_modify_cooldown(self, seconds, name=DEFAULT_POOL):
        if not 0 <= seconds <= 10 * 365 * 86400:
            raise BadInput(f"invalid cooldown {seconds}: 0 to 10 years")
        with self.transaction() as db:
            db.execute("UPDATE pools SET modify_cooldown=? WHERE name=?", (float(seconds), name))

    def modify_volume(self, name, type_=None, size=None, iops=None, throughput=None, now=None, reset=(),
                      check_only=False):
        """Elastic Volumes: change type, size, IOPS or throughput of a volume in place.

        Refused while a previous modification is modifying or optimizing, or
        within the pool's cooldown of its start.  Size only grows.  ``reset``
        names fields ("iops", "throughput") that go back to the type's
        default (a type change to one where they cannot be provisioned).
        Returns the updated row.  The new limits apply from
        ``mod_optimizing_at``; the burst balance is kept.  ``check_only``:
        refuse what would be refused, change nothing (returns the row as is).
        """
        import json

        now = time.time() if now is None else now
        with self.transaction() as db:
            row = db.execute("SELECT * FROM volumes WHERE name=?", (name,)).fetchone()
            if not row:
                raise NotFound(f"unknown volume {name!r}")
            pool = db.execute("SELECT * FROM pools WHERE id=?", (row["pool_id"],)).fetchone()
            state = voltypes.modification_state(row, now)
            if state in ("modifying", "optimizing"):
                raise Refused(f"volume {name}: the previous modification is still {state}; wait until it completes")
            if row["mod_started_at"] is not None and now < row["mod_started_at"] + pool["modify_cooldown"]:
                left = row["mod_started_at"] + pool["modify_cooldown"] - now
                raise Refused(
                    f"volume {name}: modified {_ago(now - row['mod_started_at'])} ago; the next modification is "
                    f"allowed in {_ago(left)} (pool cooldown {_ago(pool['modify_cooldown'])}; "
                    "`blockd pool set --modify-cooldown` for rehearsals)"
                )
            new_type = type_ if type_ is not None else row["type"]
            new_size = size if size is not None else row["size"]
            new_iops = iops if iops is not None else (None if "iops" in reset else row["iops"])
            new_tput = throughput if throughput is not None else (None if "throughput" in reset else row["throughput"])
            check_type(new_type)
            check_volume_size(new_size)
            check_qos(new_iops, new_tput)
            if new_size < row["size"]:
                raise Refused(
                    f"volume {name}: shrinking from {format_size(row['size'])} to {format_size(new_size)} is refused "
                    "(grow only)"
                )
            voltypes.check(new_type, new_size, new_iops, new_tput)
            if (new_type, new_size, new_iops, new_tput) == (row["type"], row["size"], row["iops"], row["throughput"]):
                raise BadInput(f"volume {name}: nothing to modify (type, size, iops and throughput are unchanged)")
            self._reserve(db, pool, new_size - row["size"], f"growing {name} to {format_size(new_size)}")
            if check_only:
                return dict(row)
            optimizing_at = now + voltypes.MODIFYING_SECONDS
            completed_at = optimizing_at + voltypes.optimizing_seconds(new_size)
            before = json.dumps(
                {"type": row["type"], "size": row["size"], "iops": row["iops"], "throughput": row["throughput"]}
            )
            db.execute(
                "UPDATE volumes SET type=?, size=?, iops=?, throughput=?, mod_started_at=?, mod_optimizing_at=?, "
                "mod_completed_at=?, mod_from=? WHERE id=?",
                (new_type, new_size, new_iops, new_tput, now, optimizing_at, completed_at, before, row["id"]),
            )
            db.execute(
                "UPDATE pools SET provisioned = provisioned + ? WHERE id=?", (new_size - row["size"], pool["id"])
            )
        return self.volume(name)

    def delete_volume(self, name):
        """Remove the row (its capacity returns to the pool); returns the volume id."""
        with self.transaction() as db:
            row = db.execute("SELECT id, size, pool_id FROM volumes WHERE name=?", (name,)).fetchone()
            if not row:
                raise NotFound(f"unknown volume {name!r}")
            db.execute("DELETE FROM volumes WHERE id=?", (row["id"],))
            db.execute("UPDATE pools SET provisioned = provisioned - ? WHERE id=?", (row["size"], row["pool_id"]))
            return row["id"]

    # ---- event plans -------------------------------------------------------
    def provision(self, batches, logical_limit=None, dry_run=False, progress=None):
        """Create the volumes of a plan in one transaction: all or nothing, idempotent.

        ``batches`` yields lists of (name, size, type, iops, throughput, group)
        rows, already validated.  ``logical_limit`` is a target: the pool's
        limit is raised to it if lower, never lowered (a pool with no limit
        gets the target, or more if what exists plus the plan needs more).  Volumes that exist
        with the same attributes are kept; one that exists with different
        ones refuses the whole plan.  ``progress(phase, count, total)`` is
        called per batch ("checking", then "creating").  Returns a dict of what was (or,
        with ``dry_run``, would be) done; a dry run rolls everything back.
        """
        report = {}
        try:
            with self.transaction() as db:
                self._provision(db, batches, logical_limit, progress, report)
                if dry_run:
                    raise _RollBack()
        except _RollBack:
            pass
        return report

    def _provision(self, db, batches, target, progress, report):
        db.execute(
            "CREATE TEMP TABLE IF NOT EXISTS plan (name TEXT PRIMARY KEY, size INTEGER, type TEXT, "
            "iops INTEGER, throughput INTEGER, grp INTEGER)"
        )
        db.execute("DELETE FROM temp.plan")
        staged = 0
        for batch in batches:
            names = {row[0] for row in batch}
            if len(names) != len(batch):
                seen = set()
                for row in batch:
                    if row[0] in seen:
                        raise BadInput(f"invalid plan: volume {row[0]} is named twice")
                    seen.add(row[0])
            try:
                db.executemany("INSERT INTO temp.plan VALUES (?, ?, ?, ?, ?, ?)", batch)
            except sqlite3.IntegrityError:
                # Named by an earlier batch (rows of this one before it went in too).
                for row in batch:
                    hit = db.execute("SELECT rowid FROM temp.plan WHERE name=?", (row[0],)).fetchone()
                    if hit and hit[0] <= staged:
                        raise BadInput(f"invalid plan: volume {row[0]} is named twice") from None
                raise
            staged += len(batch)
            if progress:
                progress("checking", len(batch), None)
        conflicts = db.execute(
            "SELECT p.name, p.size AS plan_size, v.size, p.type AS plan_type, v.type, p.iops AS plan_iops, v.iops, "
            "p.throughput AS plan_throughput, v.throughput FROM temp.plan p JOIN volumes v ON v.name = p.name "
            "WHERE v.size != p.size OR v.type != p.type OR v.iops IS NOT p.iops OR v.throughput IS NOT p.throughput "
            "LIMIT 1"
        ).fetchone()
        if conflicts:
            c = conflicts
            diffs = []
            for key, shown in (("size", format_size), ("type", str), ("iops", str), ("throughput", str)):
                if c[key] != c["plan_" + key]:
                    diffs.append(f"{key} {shown(c[key]) if c[key] is not None else 'default'} in the catalog, "
                                 f"{shown(c['plan_' + key]) if c['plan_' + key] is not None else 'default'} in the plan")
            total = db.execute(
                "SELECT COUNT(*) FROM temp.plan p JOIN volumes v ON v.name = p.name WHERE v.size != p.size "
                "OR v.type != p.type OR v.iops IS NOT p.iops OR v.throughput IS NOT p.throughput"
            ).fetchone()[0]
            more = f" (and {total - 1} more)" if total > 1 else ""
            raise Refused(f"plan conflicts with existing volume {c['name']}: {'; '.join(diffs)}{more}; nothing changed")
        groups = {}
        for grp, planned, existing, new_bytes in db.execute(
            "SELECT p.grp, COUNT(*), COUNT(v.id), COALESCE(SUM(CASE WHEN v.id IS NULL THEN p.size END), 0) "
            "FROM temp.plan p LEFT JOIN volumes v ON v.name = p.name GROUP BY p.grp"
        ):
            groups[grp] = {"planned": planned, "existing": existing, "created": planned - existing, "bytes": new_bytes}
        new_bytes = sum(g["bytes"] for g in groups.values())
        to_create = sum(g["created"] for g in groups.values())
        pool = dict(db.execute("SELECT * FROM pools WHERE name=?", (DEFAULT_POOL,)).fetchone())
        old_limit = self.effective_limit(pool)
        limit = pool["logical_limit"]
        if target is not None and target > MAX_LOGICAL_LIMIT:
            raise BadInput(f"invalid plan: logical_limit {target} exceeds the largest limit {MAX_LOGICAL_LIMIT}")
        if target is not None and (limit is None or limit < target):
            # No limit yet (unlimited): the plan sets one that holds everything,
            # what exists and what it creates.  An operator's explicit limit is
            # only ever raised to the target; volumes beyond it are refused.
            limit = target if limit is not None else max(target, pool["provisioned"] + new_bytes)
            if limit > MAX_LOGICAL_LIMIT:
                raise BadInput(f"invalid plan: the pool would exceed the largest limit {MAX_LOGICAL_LIMIT} bytes")
            db.execute("UPDATE pools SET logical_limit=? WHERE id=?", (limit, pool["id"]))
            pool["logical_limit"] = limit
        self._reserve(db, pool, new_bytes, f"the plan ({to_create} new volumes, {format_size(new_bytes)})")
        now = time.time()
        first, last = db.execute("SELECT MIN(rowid), MAX(rowid) FROM temp.plan").fetchone()
        if to_create and first is not None:
            step = PROVISION_BATCH
            for lo in range(first, last + 1, step):
                cur = db.execute(
                    "INSERT INTO volumes (name, pool_id, size, type, created_at, iops, throughput) "
                    "SELECT p.name, ?, p.size, p.type, ?, p.iops, p.throughput FROM temp.plan p "
                    "WHERE p.rowid >= ? AND p.rowid < ? AND NOT EXISTS (SELECT 1 FROM volumes v WHERE v.name = p.name) "
                    "ORDER BY p.rowid",
                    (pool["id"], now, lo, lo + step),
                )
                if progress:
                    progress("creating", cur.rowcount, to_create)
            db.execute("UPDATE pools SET provisioned = provisioned + ? WHERE id=?", (new_bytes, pool["id"]))
        db.execute("DELETE FROM temp.plan")
        provisioned = pool["provisioned"] + new_bytes
        new_limit = limit if limit is not None else provisioned
        report.update(
            volumes_planned=staged,
            volumes_created=to_create,
            volumes_existing=staged - to_create,
            logical_bytes_created=new_bytes,
            logical_limit_before=old_limit,
            logical_limit=new_limit,
            logical_limit_set=limit is not None,
            logical_capacity_added=max(0, new_limit - old_limit) if limit is not None else 0,
            logical_provisioned=provisioned,
            groups=groups,
        )

    def close(self):
        with self._lock:
            self._db.close()
