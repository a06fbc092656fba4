"""The engine: the set of open volumes one server process shares across connections.

Owns opening a volume by name (looked up in the catalog on every attach, so a
volume created while the server runs is attachable at once), reference counts
(all NBD connections to one export share one ``Volume``, so a flush on one
covers writes from all: multi-conn), the per-volume lock that keeps an
attached volume from being deleted, and closing (flush) when the last
connection goes.  It never speaks NBD and never parses configuration.
"""

import os
import threading
import time

from . import replproto as rp
from . import voltypes
from .errors import BadInput, BlockdError, Busy, NotFound, Refused
from .catalog import check_not_a_replica_copy
from .qos import Admission
from .fileio import OsFiles
from .sizes import check_name, format_size
from .store import ChunkStore
from .volume import Volume

EXPORT_LIST_LIMIT = 1000  # nbdkit refuses lists over 10,000; clients attach any name regardless
# After a promotion, every chunk of a volume up to this size is compared with each other copy; beyond it,
# the chunks either side holds (ours now, the peer's at first contact).  BLOCKD_FULL_COMPARE_LIMIT overrides.
FULL_COMPARE_LIMIT = 256 << 30


class _Open:
    __slots__ = ("volume", "refs", "holds", "lock_fd", "remove_files", "replica")

    def __init__(self, volume, lock_fd, replica=False):
        self.volume = volume
        self.refs = 0  # every holder: NBD connections and this server's own (``holds``)
        self.holds = 0  # the server's own opens (a background catch-up): not connections, never block a delete
        self.lock_fd = lock_fd
        self.remove_files = True  # when retired: deleted (files go) or fenced (files stay, now a replica)
        self.replica = replica  # a replica copy, opened by the replication sink: never an NBD connection

    @property
    def clients(self):
        """Holders that are not this server's own (NBD connections, verify, scrub)."""
        return self.refs - self.holds


class Engine:
    def __init__(self, datadir, files=None, events=None, clock=time.monotonic, qos_trace=0):
        self.datadir = datadir
        self.replication = None  # set by the server: replication.Manager (something that replicates writes)
        self.sink = None  # set by the server: the replication sink holding this node's replicas open
        self.clock = clock
        self.qos_trace = qos_trace  # tests: keep the last N admissions per volume
        self.files = files or OsFiles()
        self.events = events
        self.catalog = datadir.catalog()
        self._lock = threading.Lock()
        self._closed = threading.Condition(self._lock)
        self._open = {}  # volume id -> _Open
        self._closing = set()  # volume ids whose last connection is closing them
        # (volume id, id(Volume)) -> _Open: deleted (--force) or fenced while connections still hold it (a
        # volume fenced, promoted here, opened and fenced again has two)
        self._retired = {}

    def open(self, name, readonly=False, replica=False, internal=False):
        """Attach: the shared Volume for ``name`` (refcounted).

        A replica copy is not an export: only the replication sink opens it
        (``replica=True``), and it is never throttled (its primary is).
        """
        check_name(name)
        row = self.catalog.find_volume(name)
        if row is None:
            raise NotFound(f"unknown export {name!r}: no such volume")
        self._check_role(row, replica)
        with self._lock:
            # The last connection may still be closing it (flushing): wait,
            # or we would race its volume lock and see "held by another process".
            while row["id"] in self._closing:
                self._closed.wait()
            entry = self._open.get(row["id"])
            if entry is None:
                entry = self._open_volume(row)
                self._open[row["id"]] = entry
            elif entry.replica != replica:
                # Its role changed while this waited (a fence, and the sink opened the copy as a replica; or
                # a promotion): never hand a replica copy to a client, nor a primary to the sink.
                self._check_role({"role": "replica" if entry.replica else "primary", "name": row["name"]}, replica)
            elif row["size"] > entry.volume.size:
                entry.volume.size = row["size"]  # grown while attached: new connections see it
            entry.refs += 1
            if internal:
                entry.holds += 1
            shared = entry.refs > 1
        repl = entry.volume.replication
        if shared and repl is not None and not internal:
            # As a first open would: a peer left behind whose CREATE was refused (no room to grow) is asked
            # again (also when this server's own open, a catch-up, has held the volume since).
            repl.retry_behind()
        return entry.volume

    @staticmethod
    def _check_role(row, replica):
        if (row["role"] == "replica") != replica:
            if replica:
                raise Refused(f"volume {row['name']} is a primary on this node, not a replica")
            raise NotFound(f"unknown export {row['name']!r}: this node holds a replica of it "
                           "(promote it to serve it)")

    def _open_volume(self, row):
        lock_fd = self.datadir.volume_lock(row["id"])
        if lock_fd is None:
            raise Busy(f"volume {row['name']} is held by another process")
        try:
            # Re-read under the lock: it may have been deleted meanwhile.
            again = self.catalog.volume_by_id(row["id"])
            if again is None:
                raise NotFound(f"unknown export {row['name']!r}: volume was deleted")
            # Fenced (or promoted) since the check in open(): a superseded primary must never be opened
            # writable (the fence found nothing open to retire), nor a new primary as a replica.
            self._check_role(again, row["role"] == "replica")
            store = ChunkStore(self.files, self.datadir.volume_path(row["id"]), row["chunk_size"])
            try:
                store.open()
            except BaseException:
                store.close()
                raise
            volume = Volume(row["name"], row["id"], again["size"], store, events=self.events)
            if again["role"] != "replica":
                volume.qos = self._admission(again)
            if again["repl_id"] is not None and again["role"] == "primary":
                if self.replication is None:
                    store.close()
                    raise Refused(
                        f"volume {row['name']} is replicated: this server has no replication configured "
                        "(a key pair in --key-dir, or --insecure-replication)"
                    )
                try:
                    self.replication.attach(volume, again)
                except BaseException:
                    store.close()  # no flush: recovered chunks stay in the intent log for the next open
                    raise
            return _Open(volume, lock_fd, replica=again["role"] == "replica")
        except BaseException:
            os.close(lock_fd)
            raise

    def release(self, volume, internal=False):
        """Detach one connection (``internal``: one of the server's own opens); the last one flushes
        and closes."""
        with self._lock:
            entry = self._open.get(volume.volume_id)
            if entry is None or entry.volume is not volume:
                self._release_retired(volume, internal)
                return
            entry.refs -= 1
            if internal:
                entry.holds -= 1
            if entry.refs > 0:
                return
            del self._open[volume.volume_id]
            self._closing.add(volume.volume_id)
        try:
            try:
                self._persist_credits(entry.volume)
            except Exception:
                pass  # the balance is best effort; the data is not
            repl = entry.volume.replication if self.replication is not None else None
            if repl is not None:
                repl.close()  # its resyncs stop (they read through this Volume): no more start
            try:
                # The final flush goes to the peers too, and settles (their answers in, or their misses on
                # record) before the volume counts as closed for replication.
                entry.volume.close()
            finally:
                if repl is not None:
                    self.replication.detach(entry.volume)
        finally:
            os.close(entry.lock_fd)
            with self._lock:
                self._closing.discard(volume.volume_id)
                self._closed.notify_all()

    # ---- QoS ---------------------------------------------------------------------
    def _admission(self, row, current=None):
        """The volume's Admission (None if nothing throttles it), credits restored from the catalog.

        Credits accrue while the volume is closed (at its baseline rate, up
        to the bucket), as they would while idle: a restart never refills
        more than the time it took.  A modification still "modifying" gets
        its new limits scheduled for when "optimizing" begins.
        """
        wall = time.time()
        mono = self.clock()
        now_profile = voltypes.profile(*voltypes.effective(row, wall))
        target = voltypes.profile(row["type"], row["size"], row["iops"], row["throughput"])
        pending = voltypes.modification_state(row, wall) == "modifying"
        if now_profile.unlimited and target.unlimited:
            return None
        restored = voltypes.restored_credits(row, wall)
        credits = restored[0] if restored else None
        adm = current or Admission(now_profile, clock=self.clock, credits=credits, trace=self.qos_trace)
        if pending:
            adm.schedule(target, mono + (row["mod_optimizing_at"] - wall))
        return adm

    def _persist_credits(self, volume):
        level = volume.qos.credit_level() if volume.qos is not None else None
        if level is not None:
            self.catalog.set_credits(volume.name, level[0], time.time())

    def persist_qos(self):
        """Write every open volume's burst balance to the catalog (a crash loses at most one period)."""
        for volume in self.open_volumes():
            try:
                self._persist_credits(volume)
            except Exception:
                continue  # deleted meanwhile, or the catalog is busy: next period

    def qos(self, name):
        """Limits, burst balance and counters of a volume (live if attached, else from the catalog)."""
        row = self.catalog.volume(name)
        with self._lock:
            entry = self._open.get(row["id"])
        wall = time.time()
        out = {
            "limits": voltypes.limits(*voltypes.effective(row, wall)),
            "modification": voltypes.modification(row, wall),
            "attached": entry is not None and not entry.replica and entry.clients > 0,
        }
        adm = entry.volume.qos if entry is not None else None
        if adm is None:
            adm = self._admission(row)  # what it would be: credits as restored now
            if adm is not None:
                out.update({k: v for k, v in adm.snapshot().items() if k in ("burst_balance", "credits")})
            else:
                out.update(burst_balance=100.0, credits=None)
        else:
            out.update(adm.snapshot())
        return out

    def set_credits(self, name, tokens):
        row = self.catalog.volume(name)
        with self._lock:
            entry = self._open.get(row["id"])
        if entry is not None and entry.volume.qos is not None and entry.volume.qos.set_credits(tokens):
            self._persist_credits(entry.volume)
        else:
            self.catalog.set_credits(name, tokens, time.time())

    def modify(self, name, **changes):
        """Elastic Volumes through the live engine: catalog first, then the open volume's size and limits.
        A replicated primary's replicas grow first, as for resize; a replica copy is modified by its
        primary, not here."""
        row = self.catalog.volume(name)
        size = changes.get("size")
        self._before_growing(row, size, lambda: self.catalog.modify_volume(name, check_only=True, **changes))
        with self._lock:
            row = self.catalog.modify_volume(name, **changes)
            entry = self._open.get(row["id"])
            if entry is not None:
                volume = entry.volume
                if volume.qos is None:
                    volume.qos = self._admission(row)
                else:
                    self._admission(row, current=volume.qos)
        grows = entry is not None and row["size"] > entry.volume.size
        self._publish_size(entry, row["size"])
        if entry is not None and not grows and entry.volume.replication is not None:
            entry.volume.replication.tell_peers()  # the new type and limits, kept by the copies for a promotion
        elif entry is None and row["repl_id"] is not None and self.replication is not None:
            self.replication.request_visit(row["id"])  # closed: its copies hear them from the catch-up's open
        return row

    def _before_growing(self, row, size, check):
        """Refuse resizing a replica copy here; grow a replicated primary's replicas first (after
        ``check()`` refused what the catalog would), so a failover never shrinks what grows here."""
        name = row["name"]
        check_not_a_replica_copy(row)
        if row["repl_id"] is not None and size is not None and size > row["size"]:
            if self.replication is None:
                raise Refused(f"volume {name} is replicated: this server has no replication configured "
                              "(a key pair in --key-dir, or --insecure-replication), so its copies cannot grow")
            check()
            self.replication.resize_copies(row, size)

    def _publish_size(self, entry, size):
        """An open volume's new size: its replicas are told first (a CREATE queued on each link, which
        writes to that peer then follow), then new requests may reach past the old end."""
        if entry is None:
            return
        vr = entry.volume.replication
        if vr is not None and size > entry.volume.size:
            vr.tell_peers()
        with self._lock:
            if size > entry.volume.size:
                entry.volume.size = size

    # ---- replication (reached through the control socket) -------------------------------
    def replication_status(self, name):
        row = self.catalog.volume(name)
        if row["role"] == "replica":
            import json

            applied = self._applied(row)
            return {"role": "replica", "repl_id": row["repl_id"], "epoch": row["epoch"],
                    "min_copies": row["min_copies"], "sync_state": self.datadir.replica_sync_state(row),
                    "copies": len(json.loads(row["copies"] or "[]")), "fenced": False, "peers": {},
                    "applied_epoch": applied[0], "applied_seq": applied[1]}
        with self._lock:
            entry = self._open.get(row["id"])
        vr = entry.volume.replication if entry is not None else None
        if vr is not None:
            out = vr.status()
        else:
            peers = self.catalog.volume_replicas(row["id"]) if row["repl_id"] is not None else []
            out = {"repl_id": row["repl_id"], "epoch": row["epoch"], "min_copies": row["min_copies"], "fenced": False,
                   "peers": {p["name"]: (self.replication.closed_peer_status(row["id"], p) if self.replication is not None
                                         else self.datadir.closed_peer_status(row["id"], p, "volume not open"))
                             for p in peers}}
        out["role"] = row["role"]
        return out

    def set_min_copies(self, name, n):
        row = self.catalog.volume(name)
        self.catalog.set_min_copies(name, n)
        with self._lock:
            entry = self._open.get(row["id"])
        if entry is not None and entry.volume.replication is not None:
            entry.volume.replication.set_min_copies(n)

    def fence(self, volume_id, epoch):
        """This node's primary copy was superseded (a peer holds a newer epoch): it becomes a replica.

        Its open Volume is retired (every request fails with EIO; nothing is
        flushed) and its lock is let go at once, so the sink can open the
        replica for the new primary's resync.  False if there was nothing to fence.
        """
        if not self.catalog.adopt_epoch(volume_id, epoch):
            return False  # already at that epoch or a newer one (promoted here since): nothing to fence
        self._drop_bitmaps(volume_id)  # its peers' resync bitmaps mean nothing now; late answers record nothing
        with self._lock:
            entry = self._open.pop(volume_id, None)
            if entry is None:
                return True
            entry.volume.retire(f"fenced: a newer primary holds epoch {epoch}")
            entry.remove_files = False
            self._retired[(volume_id, id(entry.volume))] = entry
            os.close(entry.lock_fd)
            entry.lock_fd = None
        return True

    def _drop_bitmaps(self, volume_id):
        if self.replication is not None:
            self.replication.drop_bitmaps(volume_id)

    def promote(self, name, force=False, own_key=None, survivors=None):
        """Make this node's replica the primary with the next epoch.

        Refused when the copy cannot be known to hold every acknowledged
        write (its primary last said it was out of sync, or writes needed
        fewer copies than exist and a survivor is further along or too few
        answered), or when another copy is already a primary at this epoch
        or a newer one, unless ``force``.  The new epoch is announced to
        every other copy first (``survivors(copies, repl_id, epoch=E)``):
        those that take it refuse the old primary's writes from then on, so
        it cannot gather ``min_copies`` copies behind this one's back; unless
        ``force``, enough copies must take it for that (all but
        min_copies - 1, this one included).  Every other copy is marked for
        a full comparison resync (chunks whose checksums match are skipped).
        Returns a report.
        """
        import json

        row = self.catalog.volume(name)
        if row["role"] != "replica":
            if row["repl_id"] is not None and force:
                return self._force_confirm(row)
            raise Refused(f"volume {name} is already the primary here (epoch {row['epoch']})"
                          + ("; --force makes it writable without a peer confirming its epoch "
                             "(when its replicas are lost)" if row["repl_id"] is not None else ""))
        copies = json.loads(row["copies"] or "[]")
        own = own_key
        if self.replication is not None and self.replication.keys:
            own = self.replication.keys[0].decode()
        limit_text = os.environ.get("BLOCKD_FULL_COMPARE_LIMIT")
        try:
            compare_limit = FULL_COMPARE_LIMIT if limit_text is None else int(limit_text)
        except ValueError:
            raise BadInput(f"invalid BLOCKD_FULL_COMPARE_LIMIT {limit_text!r}: a number of bytes") from None
        reasons = []
        partial = bool(copies) and row["min_copies"] < len(copies)  # writes did not need every copy
        if self.datadir.replica_copy_lost(row):
            reasons.append("its data is gone here (its volume directory is missing though it had applied "
                           "writes): only a full resync from its primary makes it a copy again")
        elif row["sync_state"] == rp.EMPTY:
            reasons.append("it is empty here (recreated, or its data was lost) until its primary's full resync ends")
        elif row["sync_state"] == rp.UNCONFIRMED and not partial:
            # Every copy had to have each write (min_copies = copies): only a lowered quorum could have
            # left this one behind, and nothing else here can tell.  (With fewer, the other copies'
            # answers decide, below.)
            last = self._applied(row)
            reasons.append("this node restarted since its primary last said this copy was in sync, and no primary "
                           "has said so since: writes acknowledged meanwhile (after `volume set --min-copies 1`) "
                           f"may be missing here; the last write it applied: epoch {last[0]} seq {last[1]}")
        elif row["sync_state"] not in (rp.IN_SYNC, rp.UNCONFIRMED):
            reasons.append(f"its primary last reported it {row['sync_state'] or 'not yet in sync'}")
        others = [c for c in copies if c.get("key") != own]
        known = {p["address"]: p["name"] for p in self.catalog.peers()}

        def named(addr):  # as this node's peers are named, with the address
            return f"{known[addr]} ({addr})" if addr in known else addr

        answers = survivors(others, row["repl_id"]) if survivors is not None and others else {}
        my_primary = {c.get("address") for c in copies if c.get("name") is None}  # as the primary last said
        for addr, st in answers.items():
            if st and st.get("role") == "primary" and (st.get("epoch", 0) > row["epoch"] or (
                    st.get("epoch", 0) == row["epoch"] and addr not in my_primary)):
                reasons.append(f"the copy at {named(addr)} is already the primary at epoch {st['epoch']} (promoted there)")
        mine = self._applied(row)
        if partial:
            # Another survivor may hold acknowledged writes this one lacks.  Ask them (their sinks);
            # promote only the most up-to-date one.
            reasons += self._ahead(answers, mine, named)
            # A copy that answered `empty` (recreated, or its data lost) says nothing of what it held.
            unknown = [c["address"] for c in others if answers.get(c.get("address")) is None
                       or answers[c["address"]].get("sync_state") == rp.EMPTY]
            # An acknowledged write is on at least min_copies copies; the ones that answered are covered
            # (this copy is in sync and at least as far along), so it can be missing here only if
            # min_copies copies did not answer (the old primary among them).
            if len(unknown) >= row["min_copies"]:
                reasons.append(
                    f"writes needed only {row['min_copies']} of {len(copies)} copies and "
                    f"{', '.join(map(named, unknown))} did not answer (or are empty), so this copy cannot be known "
                    "to be the most up to date"
                )
        if reasons and not force:
            raise Refused(f"refusing to promote {name}: " + "; ".join(reasons) + "; --force promotes it anyway "
                          "(acknowledged writes may be lost)")
        epoch = max([row["epoch"]] + [st.get("epoch", 0) for st in answers.values() if st]) + 1
        # This promotion's token: a copy that hears another promotion announce the same epoch first does
        # not count for this one, and this node's sink refuses another's announcement of it from now on.
        token = os.urandom(8).hex()
        if self.sink is not None and not self.sink.claim(row["repl_id"], epoch, token):
            raise Refused(f"refusing to promote {name}: another promotion announced epoch {epoch} (or a newer one) "
                          "to this copy meanwhile; check `blockd volume show` on the other copies")
        # This copy takes the epoch as a replica first: from now on its own sink refuses the old
        # primary too (it counts among the holders below), and what the chunk listing below sees is all
        # that copy will ever hold of the old primary's writes.
        if not self.catalog.adopt_epoch(row["id"], epoch):
            raise Refused(f"refusing to promote {name}: another promotion announced epoch {epoch} (or a newer one) "
                          "to this copy meanwhile; check `blockd volume show` on the other copies")
        with self._lock:
            volume = self.sink.drop(row["repl_id"], epoch) if self.sink is not None else None
        if volume is not None:
            self.release(volume)
        taken = {}
        if others and survivors is not None:
            # Announce it before taking it: a copy that holds it refuses the old primary's writes.
            taken = survivors(others, row["repl_id"], epoch=epoch, claim=token)
            # A copy that heard another promotion's announcement of this epoch first holds it for that one.
            taken = {a: (None if st and st.get("claimed_by_another") else st) for a, st in taken.items()}
            late = self._ahead(taken, mine, named) if partial else []
            if late:
                # Acknowledged by the old primary between the first question and the announcement.
                if not force:
                    raise Refused(f"refusing to promote {name}: " + "; ".join(late) + f"; those copies now hold "
                                  f"epoch {epoch} (the old primary is fenced where it meets them); --force "
                                  "promotes this one anyway (acknowledged writes may be lost)")
                reasons += late
            holders = 1 + sum(1 for st in taken.values() if st and st.get("epoch") == epoch)
            needed = len(copies) - row["min_copies"] + 1
            if holders < needed:
                missing = [named(c["address"]) for c in others
                           if not (taken.get(c.get("address")) or {}).get("epoch") == epoch]
                why = (f"only {holders} of the {len(copies)} copies hold epoch {epoch} ({', '.join(missing)} did not "
                       f"take it): the old primary could still reach {row['min_copies']} copies and acknowledge "
                       "writes this one never sees")
                if not force:
                    raise Refused(f"refusing to promote {name}: {why}; the copies that took the epoch refuse the old "
                                  "primary from now on; --force promotes it anyway")
                reasons.append(why)
        peer_names = []
        for copy in copies:
            if copy.get("key") and copy["key"] == own:
                continue
            peer = self.catalog.peer_by_key(copy["key"]) if copy.get("key") else None
            if peer is not None:
                peer_names.append(peer["name"])
        # Every other copy gets compared chunk by chunk on first contact: its bitmap is filled before the
        # catalog makes this copy the primary (a crash in between leaves a replica, never a primary
        # whose peers would open as in sync).
        size, chunk = row["size"], row["chunk_size"]
        # A copy that missed a resize (down then) must not shrink the volume: take the largest size any
        # copy says it has (its chunks past our end get compared below like the rest).
        said = [st.get("size") for st in list(answers.values()) + list(taken.values()) if st]
        largest = max([size] + [n for n in said if isinstance(n, int) and not isinstance(n, bool)])
        if largest > size:
            try:
                self.catalog.resize_volume(name, largest)
                size = largest
            except BlockdError as exc:
                reasons.append(f"another copy is {format_size(largest)} and this one could not grow to it ({exc})")
        if size <= compare_limit:
            chunks = range(0, (size + chunk - 1) // chunk)
        else:
            # Ours, and (asked at first contact, before the resync compares) every chunk the peer holds:
            # a chunk only the old primary wrote, or only this copy trimmed, exists on one side only.
            chunks = ChunkStore(self.files, self.datadir.volume_path(row["id"]), chunk).chunk_indexes()
            for peer in peer_names:
                fd = os.open(self.datadir.chunk_list_path(row["id"], peer), os.O_WRONLY | os.O_CREAT, 0o600)
                os.close(fd)
        self._drop_bitmaps(row["id"])  # any left from an earlier life as the primary here
        for peer in peer_names:
            self._add_to_bitmap(row["id"], peer, chunks)
        if peer_names:
            self.files.fsync_dir(self.datadir.resync_dir)
        new = self.catalog.promote(name, peer_names, epoch)
        if self.replication is not None and peer_names:
            self.replication.request_catch_up(row["id"])  # the other copies resync without waiting for a client
        return {"name": name, "epoch": new["epoch"], "replicas": peer_names, "forced": bool(reasons),
                "warnings": reasons, "min_copies": new["min_copies"]}

    def _applied(self, row):
        """This replica copy's last applied client write, (epoch, seq)."""
        if self.sink is not None:
            return self.sink.last_applied(row["repl_id"], row)
        return self.datadir.replica_applied(row)

    @staticmethod
    def _ahead(answers, mine, named=str):
        """Why another copy may hold acknowledged writes this one lacks: a replica whose last applied
        client write, (epoch, seq), is later than ours."""
        pos = lambda st: (st.get("applied_epoch", 0), st.get("applied_seq", 0))  # noqa: E731
        ahead = [(addr, st) for addr, st in answers.items() if st and st.get("role") == "replica" and pos(st) > mine]
        if not ahead:
            return []
        addr, st = max(ahead, key=lambda a: pos(a[1]))
        which = ("promote that one" if st.get("sync_state") in (rp.IN_SYNC, rp.UNCONFIRMED)
                 else f"though {st.get('sync_state') or 'not known to be in sync'} there: no copy is known "
                      "to hold every acknowledged write")
        return [f"the copy at {named(addr)} applied later writes (epoch {pos(st)[0]} seq {pos(st)[1]} > epoch {mine[0]} "
                f"seq {mine[1]}): {which}"]

    def _add_to_bitmap(self, volume_id, peer, chunks):
        """Durably add chunks to a peer's resync bitmap, through the replication manager's shared one
        when this process replicates (one object per file)."""
        if self.replication is not None:
            bitmap = self.replication.bitmap(volume_id, peer)
            with bitmap.lock:
                bitmap.log.add(sorted(chunks))
            return
        from .intent import IntentLog

        log = IntentLog(self.files, self.datadir.resync_path(volume_id, peer))
        log.load()
        try:
            log.add(sorted(chunks))
        finally:
            log.close()

    def _force_confirm(self, row):
        """`promote --force` on the primary: its replicas are gone, so none can confirm its epoch after
        a restart; serve it writable anyway (now, and at the next start until a peer answers)."""
        vr = self.replication.volume(row["id"]) if self.replication is not None else None
        peers = [p["name"] for p in self.catalog.volume_replicas(row["id"])]
        report = {"name": row["name"], "epoch": row["epoch"], "replicas": peers, "forced": False,
                  "confirmed_only": True, "min_copies": row["min_copies"], "warnings": []}
        if (vr is not None and vr.confirmed) or (self.replication is not None and
                                                 self.replication.confirmed_epochs.get(row["id"]) == row["epoch"]):
            return report  # a peer confirmed it in this process (open now, or an earlier open): nothing to force
        # Marked before the open copy changes: a restart in between stays writable as promised.
        self.catalog.confirm_primary(row["id"])
        if vr is not None and not vr.force_confirm():
            self.catalog.clear_promoted(row["id"])  # a peer confirmed it meanwhile
            return report
        report["forced"] = True
        report["warnings"].append(f"no peer confirmed epoch {row['epoch']}: if a replica was promoted meanwhile, "
                                  "this copy is fenced when they meet and the writes it takes until then are lost")
        return report

    def verify(self, name):
        """Per-block checksums of this copy against every replica's, and the copies' sizes:
        ({peer: [differing offsets]}, this copy's size, {peer: its size or None})."""
        row = self.catalog.volume(name)
        if row["repl_id"] is None or row["role"] != "primary":
            raise Refused(f"volume {name} is not a replicated primary on this node: nothing to compare")
        volume = self.open(name)
        try:
            diffs, sizes = volume.replication.verify(with_sizes=True)
            return diffs, volume.size, sizes
        finally:
            self.release(volume)

    def _release_retired(self, volume, internal=False):
        """Called with the engine lock held: the last connection of a deleted volume cleans up."""
        entry = self._retired.get((volume.volume_id, id(volume)))
        if entry is None or entry.volume is not volume:
            return
        entry.refs -= 1
        if internal:
            entry.holds -= 1
        if entry.refs > 0:
            return
        del self._retired[(volume.volume_id, id(volume))]
        try:
            if self.replication is not None and entry.volume.replication is not None:
                # Deleted (fenced ones were detached by the fence): its resyncs stop, it leaves the manager.
                self.replication.detach(entry.volume, wait=False)
            entry.volume.close()  # failed store: closes descriptors, flushes nothing
        finally:
            if entry.lock_fd is not None:
                os.close(entry.lock_fd)
            if entry.remove_files:
                # A write racing the delete may have recreated the directory.
                self.datadir.remove_volume_files(volume.volume_id)

    # ---- control operations (reached through the control socket) ----------
    def clients(self, volume_id):
        """How many holders of an open volume are not this server's own (NBD connections, verify, scrub)."""
        with self._lock:
            entry = self._open.get(volume_id)
            return entry.clients if entry is not None else 0

    def connections(self, name):
        """How many NBD connections have ``name`` open (0: not attached)."""
        row = self.catalog.volume(name)
        with self._lock:
            entry = self._open.get(row["id"])
            return entry.clients if entry is not None and not entry.replica else 0

    def attached(self):
        """{name: connections} for every attached volume (the server's own opens are not connections)."""
        with self._lock:
            return {e.volume.name: e.clients for e in self._open.values() if not e.replica and e.clients > 0}

    def resize(self, name, size):
        """Grow in the catalog and in memory: new connections see the new size at once.

        A replicated primary's replicas grow first (enough of them, or it is refused: a failover must
        not shrink what was grown); a replica copy is grown by its primary, not here.
        """
        row = self.catalog.volume(name)
        self._before_growing(row, size, lambda: self.catalog.resize_volume(name, size, check_only=True))
        return self._grow(name, size)

    def grow_replica(self, name, size):
        """The sink: this node's replica copy grows because its primary's does."""
        return self._grow(name, size)

    def _grow(self, name, size):
        with self._lock:
            old, new = self.catalog.resize_volume(name, size)
            row = self.catalog.volume(name)
            entry = self._open.get(row["id"])
        self._publish_size(entry, new)
        return old, new

    def delete(self, name, force=False, report=None):
        """Delete a volume and free its chunks; refused while attached unless ``force``.

        With ``force``, its connections stay open but every request on them
        fails with EIO from now on; the files go at once (descriptors still
        open keep only unlinked inodes) and again when the last one closes.
        Returns how many connections were cut; ``report`` (a dict) gets
        ``copies_pending_delete``: peers that did not confirm deleting their copy
        (it is deleted when they answer again).
        """
        check_name(name)
        with self._lock:
            row = self.catalog.volume(name)
            while row["id"] in self._closing:  # its last connection is flushing: let it finish
                self._closed.wait()
            entry = self._open.get(row["id"])
            clients = 0 if entry is None or entry.replica else entry.clients
            if entry is not None and not force and (clients or entry.replica):
                held = entry.refs if entry.replica else clients
                raise Busy(
                    f"volume {name} is attached ({held} connection{'s' if held != 1 else ''}); "
                    "detach it first or use --force"
                )
            cut = 0
            if entry is not None:
                # Also when only this server holds it (a background catch-up): that hold ends with EIO.
                entry.volume.retire("volume was deleted")
                if entry.volume.replication is not None:
                    entry.volume.replication.close(wait=False)  # its resyncs stop; a catch-up holding it ends
                del self._open[row["id"]]
                self._retired[(row["id"], id(entry.volume))] = entry
                cut = clients  # a replica copy: the sink's hold, no client
            peers = self.catalog.volume_replicas(row["id"]) if row["repl_id"] is not None else []
            self.catalog.delete_volume(name)
        # Outside the lock (a big volume takes a while): with the row gone, nobody can open it again.
        self._drop_bitmaps(row["id"])
        self.datadir.remove_volume_files(row["id"])
        pending = []
        if peers and row["role"] == "primary":
            if self.replication is not None:
                pending = self.replication.delete_on_peers(row, peers)  # a peer away: a tombstone, sent again
            else:
                pending = [p["name"] for p in peers]
                self.datadir.remember_peer_deletes(row, pending)
        if report is not None:
            report["copies_pending_delete"] = pending
        return cut

    def scrub(self, name, progress=None, repair=False):
        """Online scrub: flush (so every checksum is current), then verify every allocated block.

        Returns (corrupt offsets, repaired offsets); ``repair`` rewrites
        corrupt blocks from an in-sync replica.
        """
        replica = self.catalog.volume(name)["role"] == "replica"
        if replica and repair:
            raise Refused(f"volume {name} is a replica copy here: --repair needs a copy to read from, which only "
                          f"its primary has; to rebuild this copy, `blockd volume delete {name} --force` here and its "
                          "primary resyncs it whole at its next open")
        volume = self.open(name, replica=replica)  # a replica copy: checked in place (shared with the sink)
        try:
            volume.flush()
            bad = volume.scrub(progress=progress)
            repaired = []
            if repair and bad:
                if volume.replication is None:
                    raise Refused(f"volume {name} has no replica to repair from")
                for off in bad:
                    repaired += volume.repair_blocks([off])
            return bad, repaired
        finally:
            self.release(volume)

    def open_volumes(self):
        with self._lock:
            return [e.volume for e in self._open.values()]

    def export_names(self, limit=EXPORT_LIST_LIMIT):
        try:
            return self.catalog.volume_names(limit)
        except Exception:  # a listing must never fail the handshake
            return []

    def flush_all(self, closing_timeout=60.0):
        """Flush every open volume, and wait for those whose last connection is closing (their close
        flushes them): leaving in the middle of that flush would leave work for crash recovery.
        Returns the names that failed (or were still closing after ``closing_timeout`` seconds)."""
        failed = []
        with self._lock:
            # Not the ones only this server holds (a catch-up): written by nobody since their last close,
            # and a flush there could wait for a quorum its resyncing peer cannot give yet.
            volumes = [e.volume for e in self._open.values() if e.clients > 0]
        for volume in volumes:
            try:
                volume.flush()
            except Exception:
                failed.append(volume.name)
        deadline = time.monotonic() + closing_timeout
        with self._lock:
            while self._closing and time.monotonic() < deadline:
                self._closed.wait(max(0.0, deadline - time.monotonic()))
            closing = set(self._closing)
        if closing:
            failed += [f"volume id {i} (still closing)" for i in sorted(closing)]
        return failed

    def close(self):
        with self._lock:
            entries = list(self._open.values())
            self._open.clear()
        failed = []
        for entry in entries:  # every volume gets its flush even if one fails
            try:
                try:
                    self._persist_credits(entry.volume)
                except Exception:
                    pass
                if entry.volume.replication is not None:
                    entry.volume.replication.close()  # its resyncs stop before its store closes
                entry.volume.close()
            except Exception:
                failed.append(entry.volume.name)
            finally:
                os.close(entry.lock_fd)
        self.catalog.close()
        return failed
