"""Synchronous replication over ZeroMQ: links to peers, write quorum, resync, and the sink.

Primary side, per peer: one ``PeerLink`` thread owns a DEALER socket (zmq
sockets are not thread-safe); request threads hand it messages through a
queue and a wake-up pipe, and it matches ACK/NACK replies to what it sent.
A message not answered within the ack deadline, or a reply the link cannot
use, fails every message in flight on that link: the socket is closed with
LINGER 0 and a new one is connected, probed with heartbeats.

Per replicated volume, a ``VolumeReplication`` keeps each peer's state
(replproto.ReplicaState), a durable resync bitmap per peer (the chunks it
missed; separate from the volume's write-intent log, which flush clears),
and answers ``wait(ticket)``: a write is acknowledged when ``min_copies``
copies, this one included, have it; below that it waits (never acknowledged
with fewer copies than promised) and fails with EIO after the write
timeout.  When a peer answers again its bitmap's chunks are resynced
(chunks whose checksums already match are skipped), throttled, and it is in
sync again.

Replica side, ``Sink``: a ROUTER socket (CurveZMQ with a ZAP authenticator
that admits only configured peers' keys, unless insecure) applying messages
to local replica volumes in arrival order, verifying checksums on receipt.
Malformed messages are refused, counted and logged; the sink keeps running.
"""

import collections
import os
import sys
import threading
import time

import numpy as np
import zmq

from . import checksum, pythreads, replproto as rp
from .errors import BadInput, BlockdError, NotFound, ReadOnly, Refused, VolumeFailed
from .fileio import fsync_dir
from .geometry import BLOCK_SIZE
from .intent import IntentLog
from .sizes import format_size
from .store import INTENT_FILE
from .volume import block_hashes

DEFAULT_ACK_TIMEOUT = 2.0
DEFAULT_WRITE_TIMEOUT = 30.0
DEFAULT_HEARTBEAT = 0.5
DEFAULT_RESYNC_MIBPS = 256.0
CHUNKS_PAGE = 1 << 20  # chunk indexes per CHUNKS answer (8 MiB): a page is quick once the peer listed them
RECONNECT_DELAY = 0.2
REFUSAL_LOG_PER_SECOND = 10  # the sink logs refusals up to this many lines a second, then counts them
# ZMQ I/O threads per context: CurveZMQ encrypts and decrypts on them, one connection each (every request
# thread has its own DEALER, so connections spread).  One per two CPUs, up to 4: on 2 CPUs one, as before
# (a second only competed with the request threads for the same two cores).
IO_THREADS = max(1, min(4, (os.cpu_count() or 2) // 2))


def _context():
    """The process's zmq context for links and questions to sinks (made with IO_THREADS on first use)."""
    return zmq.Context.instance(io_threads=IO_THREADS)


def log(line):
    sys.stderr.write(f"blockd: replication: {line}\n")
    sys.stderr.flush()


class Settings:
    def __init__(self, ack_timeout=DEFAULT_ACK_TIMEOUT, write_timeout=DEFAULT_WRITE_TIMEOUT,
                 heartbeat=DEFAULT_HEARTBEAT, resync_mibps=DEFAULT_RESYNC_MIBPS, insecure=False, listen=None):
        self.listen = listen  # this node's sink address (told to peers: where to reach us if promoted)
        self.ack_timeout = ack_timeout
        self.write_timeout = write_timeout
        self.heartbeat = heartbeat
        self.resync_mibps = resync_mibps
        self.insecure = insecure


# ---- keys -------------------------------------------------------------------------------
def _call(callback, ok, reply):
    """Run an answer's callback on the link thread: one that raises is logged, never kills the link
    (the other answers, and the counters they keep, still get theirs)."""
    try:
        callback(ok, reply)
    except Exception as exc:
        log(f"answer callback failed: {type(exc).__name__}: {exc}")


def _nack_body(reply):
    """A NACK's JSON ({"error", "code", ...}), or {} for anything else."""
    if isinstance(reply, rp.Message) and reply.type == rp.NACK:
        try:
            return reply.json()
        except rp.ProtocolError:
            pass
    return {}


def _nack_code(reply):
    return _nack_body(reply).get("code")


def _reason(reply):
    """Why a request failed, for a log line: a NACK's error, or the link's reason."""
    if isinstance(reply, str):
        return reply
    return _nack_body(reply).get("error") or "refused"


def curve_client(sock, keys, server_public):
    public, secret = keys
    sock.curve_publickey = public
    sock.curve_secretkey = secret
    sock.curve_serverkey = server_public.encode() if isinstance(server_public, str) else server_public


# ---- the link to one peer ----------------------------------------------------------------
class PeerLink:
    """One peer: a DEALER socket owned by one thread; callbacks run on that thread."""

    def __init__(self, ctx, name, address, public_key, keys, settings, on_up=None, on_down=None):
        self.ctx = ctx
        self.name = name
        self.address = address
        self.public_key = public_key
        self.keys = keys
        self.settings = settings
        self.on_up = on_up  # called (on the link thread) when the peer answers again after a failure
        self.on_down = on_down  # called (on the link thread) when a peer that answered stops answering
        self._queue = collections.deque()
        self._queue_lock = threading.Lock()
        self._polling = False  # the link thread is (about to be) in poll: a new message must wake it
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._pending = collections.OrderedDict()  # (volume, seq) -> (deadline, callback)
        self._sock = None
        self._seq = 0
        self.up = False
        self.connecting = True  # until the first probe fails: queue instead of failing at once
        self.failures = 0
        self.sent = 0
        self.acks = 0
        self.ack_seconds = 0.0
        self.bytes_sent = 0
        self._last_io = 0.0
        self._probe = None
        self.instance = None  # what the peer's sink last said it is (new at each start): a change is a restart
        self._said_unreachable = False  # logged once until the peer answers
        self._stop = False
        self._stats_lock = threading.Lock()  # the link thread and request threads both count
        self._local = threading.local()  # .sock: this request thread's own DEALER (thread states are kept)
        self._direct = {}  # OS thread id -> that DEALER, to close those of threads that have exited
        self._reset = None  # set by a request thread whose message went unanswered: fail the link
        self._direct_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"blockd-link-{name}", daemon=True)

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stop = True
        self._wakeup()

    # -- called from any thread --
    def send(self, msg, callback):
        """Queue ``msg``; ``callback(ok, reply_or_reason)`` runs on the link thread."""
        with self._queue_lock:
            self._queue.append((msg, callback, time.monotonic()))
            if not self._polling:
                return  # the link thread is busy and drains the queue before it polls again
            self._polling = False
        self._wakeup()

    def _wakeup(self):
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass

    def next_seq(self):
        self._seq += 1
        return self._seq

    # -- a request thread's own socket (writes go out and come back without the link thread) --
    def direct_socket(self):
        """The calling thread's own DEALER to the peer, made on first use (a zmq socket belongs to
        one thread).  Sockets of threads that have exited are closed when a new one is made."""
        sock = getattr(self._local, "sock", None)
        if sock is not None:
            return sock
        tid = threading.get_native_id()
        sock = self._dealer()
        with self._direct_lock:
            for gone in pythreads.exited(list(self._direct), tid):
                self._direct.pop(gone).close(linger=0)  # its thread has exited: nobody else uses it
            self._direct[tid] = sock
        self._local.sock = sock
        return sock

    def count_sent(self, nbytes):
        with self._stats_lock:
            self.sent += 1
            self.bytes_sent += nbytes

    def count_ack(self, seconds):
        with self._stats_lock:
            self.acks += 1
            self.ack_seconds += seconds

    def reset(self, reason):
        """A request thread got no answer in time on its own socket: the link thread fails the link as
        if its own message had timed out (the peer is probed, and answers again through on_up)."""
        with self._queue_lock:
            self._reset = reason
        self._wakeup()

    def drop_direct(self, sock):
        """The calling thread gives up its socket (no answer in time, or a bad one): a new one next time,
        so a late answer can never be taken for another request's."""
        self._local.sock = None
        with self._direct_lock:
            tid = threading.get_native_id()
            if self._direct.get(tid) is sock:
                del self._direct[tid]
        sock.close(linger=0)

    def pending(self):
        return len(self._pending) + len(self._queue)

    # -- the link thread --
    def _dealer(self):
        """A new DEALER connected to the peer (CurveZMQ unless insecure), for one thread's use."""
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        if not self.settings.insecure:
            curve_client(sock, self.keys, self.public_key)
        sock.connect(self.address)
        return sock

    def _connect(self):
        self._sock = self._dealer()
        self._probe = None
        self._last_io = time.monotonic()

    def _fail_all(self, reason):
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        was_up = self.up
        self.up = False
        self.connecting = False
        self.failures += 1
        pending = list(self._pending.values())
        self._pending.clear()
        with self._queue_lock:  # taken whole: a message queued meanwhile is failed too, never dropped
            queued = list(self._queue)
            self._queue.clear()
        for _, callback, _ in pending:
            _call(callback, False, reason)
        for _, callback, _ in queued:
            _call(callback, False, reason)
        if was_up:
            log(f"peer {self.name} ({self.address}): {reason}")
            if self.on_down:
                self.on_down(self)  # idle volumes learn it too: heartbeats detect a dead peer

    def _run(self):
        """The link thread.  Nothing may end it but stop(): every volume on this peer waits for its
        callbacks.  An unexpected error (a bug) fails what is pending, with one log line (their
        callbacks record the misses), and the link reconnects."""
        while not self._stop:
            try:
                self._loop()
            except Exception as exc:
                log(f"peer {self.name}: link error: {type(exc).__name__}: {exc}; reconnecting")
                try:
                    self._fail_all(f"link error: {exc}")
                except Exception as again:
                    log(f"peer {self.name}: failing its requests: {type(again).__name__}: {again}")
                    self._sock = None
                time.sleep(RECONNECT_DELAY)

    def _loop(self):
        poller = zmq.Poller()
        if self._sock is not None:
            poller.register(self._sock, zmq.POLLIN)
            poller.register(self._wake_r, zmq.POLLIN)
        while not self._stop:
            with self._queue_lock:
                reset, self._reset = self._reset, None
            if reset is not None and self._sock is not None and self.up:
                self._fail_all(reset)
            if self._sock is None:
                self._connect()
                poller = zmq.Poller()
                poller.register(self._sock, zmq.POLLIN)
                poller.register(self._wake_r, zmq.POLLIN)
            now = time.monotonic()
            # Queued messages go out while the peer answers; while first connecting they
            # wait (up to the ack deadline); once it has failed they fail at once.
            while self._queue:
                msg, callback, queued_at = self._queue[0]
                if not self.up:
                    if self.connecting and now - queued_at < self.settings.ack_timeout:
                        break
                    self._queue.popleft()
                    _call(callback, False, "peer not connected")
                    continue
                self._queue.popleft()
                self._pending[(msg.volume, msg.seq)] = (now + self.settings.ack_timeout, callback, now)
                try:
                    self._sock.send_multipart(rp.encode(msg), copy=False)
                except zmq.ZMQError as exc:
                    self._fail_all(f"send failed: {exc}")
                    break
                self.count_sent(len(msg.data))
            if self._sock is None:
                continue
            # Probe (heartbeat) when idle or not yet up.
            if self._probe is None and (not self.up or now - self._last_io >= self.settings.heartbeat):
                seq = self.next_seq()
                hb = rp.Message(rp.HEARTBEAT, volume=0, seq=seq)
                self._probe = (0, seq)
                self._pending[self._probe] = (now + self.settings.ack_timeout, self._probe_done, now)
                try:
                    self._sock.send_multipart(rp.encode(hb), copy=False)
                except zmq.ZMQError as exc:
                    self._fail_all(f"heartbeat failed: {exc}")
                    continue
                self._last_io = now
            # Deadlines
            if self._pending:
                # Entries go in with now + ack_timeout: the oldest has the earliest deadline.
                deadline = next(iter(self._pending.values()))[0]
                if now >= deadline:
                    if self.up:
                        self._fail_all(f"no answer within {self.settings.ack_timeout:g} s")
                    else:
                        # Not up yet: the probe timed out; reconnect quietly and probe again (said once).
                        if not self._said_unreachable:
                            self._said_unreachable = True
                            log(f"peer {self.name} ({self.address}): no answer (is its server running there, with "
                                "this node's public key among its peers, and both or neither with "
                                "--insecure-replication?); still trying")
                        self._fail_all("peer unreachable")
                        time.sleep(min(RECONNECT_DELAY, self.settings.ack_timeout))
                    continue
                timeout_ms = max(1, int((deadline - now) * 1000))
            else:
                timeout_ms = max(1, int(self.settings.heartbeat * 1000))
            with self._queue_lock:
                if self._queue:
                    if self.up:
                        continue  # queued meanwhile: send it before polling
                    timeout_ms = min(timeout_ms, 20)  # re-check queued messages' deadlines
                self._polling = True
            events = dict(poller.poll(timeout_ms))
            self._polling = False
            if self._wake_r in events:
                try:
                    while os.read(self._wake_r, 4096):
                        pass
                except BlockingIOError:
                    pass
            if self._sock is not None and self._sock in events:
                self._drain()

    def _drain(self):
        while True:
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return
            except zmq.ZMQError as exc:
                self._fail_all(f"receive failed: {exc}")
                return
            self._last_io = time.monotonic()
            try:
                msg = rp.decode(frames)
            except rp.ProtocolError as exc:
                self._fail_all(f"malformed reply: {exc}")
                return
            entry = self._pending.pop((msg.volume, msg.seq), None)
            if entry is None:
                continue  # a late answer to something already failed
            _, callback, sent_at = entry
            self.count_ack(self._last_io - sent_at)
            _call(callback, msg.type == rp.ACK, msg)

    def _probe_done(self, ok, reply):
        self._probe = None
        instance = bytes(reply.data) if ok and reply.data else None
        if instance is not None:
            restarted = self.instance is not None and instance != self.instance
            self.instance = instance
            if restarted and self.up:
                # The sink restarted faster than any deadline here ran out (zmq reconnected and delivered
                # the heartbeat to the new one): it may have lost what it had not flushed, and it waits for
                # a primary to say it is in sync.  Failed as if it had missed a deadline: its volumes
                # record the misses, and reconnect with a CREATE (not from inside _drain: the loop does it).
                with self._queue_lock:
                    self._reset = "peer restarted (a new sink answers)"
                return
        if ok and not self.up:
            self.up = True
            self._said_unreachable = False
            log(f"peer {self.name} ({self.address}) answers")
            if self.on_up:
                self.on_up(self)


# ---- tickets: one replicated request waiting for its quorum --------------------------------------
class _Direct:
    """One message a request thread sent on its own socket, until its answer or deadline."""

    __slots__ = ("sock", "seq", "callback", "deadline", "sent_at", "link", "size", "peer")

    def __init__(self, sock, seq, callback, sent_at, deadline, link, size, peer):
        self.peer = peer  # its PeerState
        self.sock = sock
        self.seq = seq
        self.callback = callback
        self.sent_at = sent_at
        self.deadline = deadline
        self.link = link
        self.size = size


class Ticket:
    __slots__ = ("chunks", "acked", "failed", "done", "_signal", "direct", "error", "seq", "abandoned",
                 "applied")

    def __init__(self, chunks):
        self.chunks = chunks
        self.seq = None
        self.abandoned = None  # why this copy could not apply it: every peer's copy of it is resynced
        self.applied = set()  # peers that acknowledged it, counted toward the quorum or not
        self.direct = None  # [_Direct]: answers this request thread collects itself
        self.acked = set()  # peers that acknowledged
        self.failed = {}  # peer -> its sync generation when it failed this request
        self.done = False
        self.error = None  # set when it must fail whatever answered (a peer's miss could not be recorded)
        # A binary semaphore, released when an answer to it arrives or anything changes the quorum:
        # a bare lock costs a fraction of an Event (a Condition and a notify_all per answer).
        self._signal = threading.Lock()
        self._signal.acquire()

    def wake(self):
        try:
            self._signal.release()
        except RuntimeError:
            pass  # already signalled, not yet seen

    def sleep(self, timeout):
        """Until woken (or a wake-up not yet seen) or ``timeout``; the caller re-checks what it waits for."""
        self._signal.acquire(timeout=timeout)


class PeerBitmap:
    """One peer's resync bitmap for one volume: the durable set of chunks it missed, and those a full
    disk kept out of it (``unrecorded``: resynced all the same, retried at the next record).

    One per file per process (``Manager.bitmap``), shared by every open of the volume: an IntentLog
    appends at its own idea of the file's end, so a second object on the same file (a late answer to
    a closed open's request) would write over the first one's records.  Once closed (the volume was
    deleted or fenced, or promotion rewrote the file) it takes nothing more."""

    def __init__(self, files, path):
        self.log = IntentLog(files, path)
        self.lock = threading.Lock()
        self.unrecorded = set()
        self.closed = False
        self.log.load()

    @property
    def chunks(self):
        return self.log.chunks

    def pending(self):
        """How many chunks it has to resync: on record, and kept out of the record."""
        with self.lock:
            return len(self.log.chunks) + len(self.unrecorded)

    def close(self):
        with self.lock:
            self.closed = True
            self.log.close()


class PeerState:
    __slots__ = ("link", "peer_id", "state", "bitmap", "generation", "resync_thread", "resync_total",
                 "resync_done", "resynced_bytes", "skipped_chunks", "seeded", "unflushed",
                 "created", "session_created", "link_pending", "outstanding", "creating")

    def __init__(self, link, peer_id, state, bitmap, seeded):
        self.link = link
        self.peer_id = peer_id
        self.state = rp.ReplicaState(state)
        self.bitmap = bitmap
        self.generation = 0  # bumped each time it becomes in sync
        self.resync_thread = None
        self.resync_total = 0
        self.resync_done = 0
        self.resynced_bytes = 0
        self.skipped_chunks = 0
        self.seeded = seeded
        self.unflushed = set()  # chunks it acknowledged since its last acknowledged flush
        # It answered this open's CREATE: writes may then bypass the link (nothing must overtake CREATE).
        self.created = False
        self.session_created = False  # it answered CREATE since the link last went down
        self.link_pending = 0  # writes queued on the link and not yet answered: later ones follow them there
        self.outstanding = set()  # seqs sent to it (link or direct) until answered or their miss recorded
        self.creating = False  # a session CREATE is on its way (another open does not send one more)

    def record(self, chunks):
        """Durably add chunks to its resync bitmap (request, link and resync threads share it), with
        any that an earlier attempt could not record."""
        b = self.bitmap
        with b.lock:
            if b.closed:
                return  # the volume is gone or no longer the primary here: nothing to resync from here
            b.log.add(sorted(set(chunks) | b.unrecorded))
            b.unrecorded.clear()

    def remember(self, chunks):
        """Chunks it missed that could not be recorded durably: resynced by this process all the same,
        and tried again at the next record()."""
        b = self.bitmap
        with b.lock:
            b.unrecorded.update(c for c in chunks if c not in b.log.chunks)

    def forget(self, chunks):
        b = self.bitmap
        with b.lock:
            b.unrecorded.difference_update(chunks)
            if not b.closed:
                b.log.remove(sorted(chunks))

    def pending_chunks(self):
        b = self.bitmap
        with b.lock:
            return sorted(b.log.chunks | b.unrecorded)

    def pending_count(self):
        return self.bitmap.pending()


class VolumeReplication:
    """The primary side of one replicated volume."""

    def __init__(self, manager, volume, row, peers):
        self.manager = manager
        self.volume = volume
        self.repl_id = row["repl_id"]
        self.epoch = row["epoch"]
        self.min_copies = row["min_copies"]
        self.settings = manager.settings
        self._cond = threading.Condition()
        # Rises across opens and restarts (survivors compare applied seqs): the clock, but never below this
        # process's last open of the volume, nor (once its CREATE is answered) what a replica applied.
        self._seq = max(time.time_ns() // 1000, manager.last_seqs.get(volume.volume_id, 0))
        self._unrepaired_logged = 0.0  # when a failed read-repair was last logged
        self._waiting = set()  # tickets a request thread is waiting on
        self._settling = 0  # threads in settle(): only then does a settled request notify
        self.peers = {}  # name -> PeerState
        self.fenced = False
        self.closed = False  # the volume closed: no resync may read through it any more
        # Writable only once a peer confirms our epoch is current (a restarted primary may
        # have been superseded while it was down); with no peers there is nobody to ask.
        # Confirmed once in this process stays confirmed at that epoch: a reconnecting client (or the
        # last one closing and a new one opening) must not find the volume read-only while a lost
        # replica is away.  A newer primary still fences it at the first answer from that copy.
        self.confirmed = (not peers or row["sync_state"] == "promoted"
                          or manager.confirmed_epochs.get(volume.volume_id) == self.epoch)
        self._promoted = row["sync_state"] == "promoted"
        for p in peers:
            # Shared with earlier opens of this volume in this process (their late answers included).
            ps = PeerState(manager.link(p), p["peer_id"], rp.IN_SYNC, manager.bitmap(volume.volume_id, p["name"]),
                           bool(p["seeded"]))
            if volume.store.recovered:
                # Chunks dirty when this node crashed may differ between the copies.
                ps.record(volume.store.recovered)
            # A peer with missed chunks on record starts out of sync; others are assumed in sync
            # until their first request says otherwise (the CREATE handshake checks).
            if ps.pending_count() or os.path.exists(manager.datadir.chunk_list_path(volume.volume_id, p["name"])):
                ps.state = rp.ReplicaState(rp.OUT_OF_SYNC)  # (a chunk list to merge: a resync is due)
            self.peers[p["name"]] = ps

    # -- handshake ---------------------------------------------------------------------
    def _info(self):
        row = self.manager.catalog.volume_by_repl_id(self.repl_id)
        copies = [{"name": n, "key": ps.link.public_key, "address": ps.link.address} for n, ps in self.peers.items()]
        me = self.manager.keys[0].decode() if self.manager.keys else None
        copies.append({"name": None, "key": me, "address": self.manager.settings.listen})
        # Type, IOPS and throughput too: a promoted copy serves with the limits its primary had.
        return {"name": row["name"], "size": row["size"], "type": row["type"], "iops": row["iops"],
                "throughput": row["throughput"], "chunk_size": row["chunk_size"], "min_copies": self.min_copies,
                "copies": copies}

    def create_on_peers(self):
        """Queue CREATE to every peer (first on each link, so before any write); answers handled as they come."""
        info = self._info()
        for name, ps in self.peers.items():
            self._create_one(name, ps, info, session=True)

    def _create_one(self, name, ps, info, session=False):
        """CREATE on the link.  ``session``: this open's first, or the first since the peer was out of sync:
        every request to it with a lower seq was answered or counted as missed (its chunks are in the
        bitmap), so the sink refuses any that arrives late (from an old connection) instead of applying
        it over what the resync sends."""

        def answered(ok, reply):
            if session:
                ps.creating = False
            if not ok:
                body = _nack_body(reply)
                if body.get("code") == "stale_epoch":
                    self.manager.fence(self, body.get("epoch"), f"peer {name}")
                    return
                reason = _reason(reply) if reply is not None else None
                ps.session_created = False
                self._missed(name, ps, set(), reason or "no answer to CREATE", reset=False)
                return
            try:
                state = reply.json()
            except rp.ProtocolError:
                state = {}
            lost = bool(state.get("created")) and ps.seeded
            if lost:
                # Before it counts as answered (session_created): a catch-up waiting for it must not see it
                # in sync, with nothing to resync, in between.
                log(f"{self.volume.name}: peer {name} lost its copy: full resync")
                self._missed(name, ps, self._all_chunks(), "copy lost", reset=False)
            with self._cond:
                if state.get("applied_epoch") == self.epoch:
                    # This primary's seqs must rise above what that copy applied at this epoch, whatever
                    # the clock did across a restart (promotion compares them).  Before writes may go.
                    self._seq = max(self._seq, int(state.get("applied_seq") or 0) + 1)
                self.confirmed = True  # a copy at our epoch or older answered: we are the current primary
                self.manager.confirmed_epochs[self.volume.volume_id] = self.epoch
                ps.created = True
                ps.session_created = True
                self._wake_all()
            if self._promoted:
                self._promoted = False
                try:
                    self.manager.catalog.clear_promoted(self.volume.volume_id)
                except Exception:
                    pass
            if not lost and not ps.seeded:
                try:
                    self.manager.catalog.set_seeded(self.volume.volume_id, ps.peer_id)
                except Exception as exc:
                    log(f"{self.volume.name}: recording {name} as seeded: {exc}")
                ps.seeded = True
            if ps.state.state == rp.OUT_OF_SYNC and ps.link.up:
                self.start_resync(name)

        with self._cond:
            # The state it says and its seq taken together, and queued in seq order: the sink keeps the
            # state of the latest (a refused write there counts as later than an older CREATE).
            seq = self._next_seq()
            # Every request to it below this seq was answered (or missed, and then it is not in sync).
            through = (min(ps.outstanding) if ps.outstanding else seq) - 1
            info = dict(info, state=ps.state.state, seeded=ps.seeded, applied_through=through)
            msg = rp.json_message(rp.CREATE, info, volume=self.repl_id, epoch=self.epoch, seq=seq,
                                  flags=rp.SESSION if session else 0)
            if session:
                ps.creating = True
            self._send_on_link(ps, msg, answered)  # counted: no direct write overtakes it (resize, epoch)

    def tell_peers(self):
        """Send every peer our current view (its state, the quorum): what promotion decides on there."""
        info = self._info()
        for name, ps in self.peers.items():
            if ps.state.receives_writes or ps.state.state == rp.OUT_OF_SYNC:
                self._create_one(name, ps, info)

    def _all_chunks(self):
        return set(self.volume.store.chunk_indexes()) | set(self.volume.store.dirty)

    def _next_seq(self):
        with self._cond:
            self._seq += 1
            return self._seq

    # -- sending -----------------------------------------------------------------------
    def wait_writable(self):
        """Until a peer confirmed this copy's epoch (ReadOnly after --write-timeout); at once after."""
        if self.confirmed:  # only ever becomes True: no lock needed to see it
            return
        with self._cond:
            self._wait_confirmed()

    def _wait_confirmed(self):
        if self.confirmed:
            return
        deadline = time.monotonic() + self.settings.write_timeout
        while not self.confirmed and not self.fenced and time.monotonic() < deadline:
            self._cond.wait(0.2)
        if not self.confirmed and not self.fenced:
            raise ReadOnly(f"{self.volume.name}: read-only until a peer confirms this copy's epoch "
                           f"{self.epoch} is current (no peer answered)")

    def _send(self, type_, offset, length, chunks, flags=0, sums=b"", data=b""):
        """Send to every peer that receives writes; return the ticket to wait on."""
        ticket = Ticket(chunks)
        with self._cond:
            if type_ != rp.FLUSH:
                self._wait_confirmed()
            if self.fenced:
                raise VolumeFailed(f"{self.volume.name}: fenced: a newer primary holds epoch > {self.epoch}")
            if self.volume.store.failed and type_ != rp.FLUSH:
                # Refused here before any peer applies what this copy will refuse.
                raise VolumeFailed(f"{self.volume.name}: volume failed: {self.volume.store.failed}; writes refused")
            self._seq += 1
            seq = ticket.seq = self._seq
            targets = []
            for name, ps in self.peers.items():
                if ps.state.receives_writes:
                    targets.append((name, ps))
                else:
                    ticket.failed[name] = ps.generation
                    missing = set(chunks) | ps.unflushed if ps.state.state == rp.OUT_OF_SYNC else None
                    if missing:
                        # It misses this request: record the chunks for its resync, durably, before the
                        # request can be acknowledged (a sync only when a chunk is new to the set), with
                        # any it acknowledged but never flushed.  Under the condition, so a resync
                        # cannot declare it in sync in between.
                        try:
                            ps.record(missing)
                        except OSError as exc:
                            raise VolumeFailed(self._unrecorded(name, ps, missing, exc)) from exc
                        ps.unflushed = set()
            # Outstanding until answered, or its miss recorded: settle() waits for these.  A FLUSH
            # sent on a request thread's own socket is not: that flush collects its answers, and it
            # may be waiting for the flush lock another flush holds while it settles.
            if type_ != rp.FLUSH:
                for _name, ps in targets:
                    ps.outstanding.add(seq)
        frames = None
        sent = 0
        try:
            msg = rp.Message(type_, volume=self.repl_id, epoch=self.epoch, seq=seq, offset=offset,
                             length=length, flags=flags, sums=sums, data=data)
            for name, ps in targets:
                link = ps.link
                # Direct only when no earlier write to this peer is still queued on the link: the link and
                # the request threads' sockets are separate connections, with no order between them.
                direct = ps.created and link.up and not ps.link_pending
                at_risk = None
                if type_ == rp.FLUSH:
                    with self._cond:
                        if not direct:
                            ps.outstanding.add(seq)  # settled by the link thread: other flushes wait for it
                        at_risk, ps.unflushed = ps.unflushed, set()  # what this flush makes durable there
                callback = self._callback(ticket, name, ps, at_risk)
                if direct:
                    # On this thread's own socket: no hand-off to the link thread and back.  Overlapping
                    # writes stay ordered because the caller holds the range lock until collect().
                    if frames is None:
                        frames = rp.encode(msg)
                    try:
                        sock = link.direct_socket()
                        sock.send_multipart(frames, copy=False)
                    except zmq.ZMQError:
                        self._send_on_link(ps, msg, callback)
                        sent += 1
                        continue
                    link.count_sent(len(data))
                    now = time.monotonic()
                    if ticket.direct is None:
                        ticket.direct = []
                    ticket.direct.append(_Direct(sock, seq, callback, now, now + self.settings.ack_timeout, link,
                                                 len(data), ps))
                else:
                    self._send_on_link(ps, msg, callback)
                sent += 1
        except BaseException:
            with self._cond:
                for _name, ps in targets[sent:]:  # never sent: nothing will settle them
                    ps.outstanding.discard(seq)
                self._notify_settled()
            # The peers it did reach may apply it, and the caller never learns of this ticket.
            self.abandon(ticket, "the request failed on this node while it was being sent")
            for d in list(ticket.direct or ()):
                self._give_up(d, ticket.direct, "the request failed on this node")
            raise
        return ticket

    def _send_on_link(self, ps, msg, callback):
        with self._cond:
            ps.link_pending += 1
            ps.outstanding.add(msg.seq)

        def answered(ok, reply):
            try:
                callback(ok, reply)  # a miss is recorded in the bitmap before the request counts as settled
            finally:
                with self._cond:
                    ps.link_pending -= 1
                    ps.outstanding.discard(msg.seq)
                    self._notify_settled()

        ps.link.send(msg, answered)

    def abandon(self, ticket, reason):
        """This copy failed to apply a request its peers were sent (a local write error): whatever they
        applied must be overwritten from this copy, so every peer misses it: those that acknowledged it
        now, those that answer later when they do (an acknowledgement then counts as a miss)."""
        with self._cond:
            ticket.abandoned = reason
            applied, ticket.applied = ticket.applied, set()
            ticket.acked = set()
        for name in applied:
            self._resync_from_here(name, self.peers[name], ticket, reason)

    def _resync_from_here(self, name, ps, ticket, reason):
        """The peer applied what this copy could not: it misses the request (recorded), and its resync
        overwrites those chunks from here, over the link it has (no reset: links are shared by every
        volume on that peer)."""
        self._missed(name, ps, ticket.chunks, reason, ticket=ticket, reset=False)
        if ps.link.up:
            self.start_resync(name)

    def collect(self, ticket):
        """Take the answers to what this thread sent on its own sockets, or give up on them at their
        deadline (the peer then misses the request, as on the link).  Bounded by the ack timeout."""
        pending = ticket.direct
        while pending:
            # Poll first (with no wait once a deadline passed): an answer that came while this thread
            # was busy elsewhere (a long local flush) is taken, not counted as missing.
            timeout_ms = max(0, int((min(d.deadline for d in pending) - time.monotonic()) * 1000) + 1)
            try:
                if len(pending) == 1:
                    ready = [pending[0].sock] if pending[0].sock.poll(timeout_ms) else []
                else:
                    poller = zmq.Poller()
                    for d in pending:
                        poller.register(d.sock, zmq.POLLIN)
                    ready = [sock for sock, _ in poller.poll(timeout_ms)]
            except zmq.ZMQError as exc:
                for d in list(pending):
                    self._give_up(d, pending, f"receive failed: {exc}")
                break
            for sock in ready:
                d = next(d for d in pending if d.sock is sock)
                self._take(d, pending)
            now = time.monotonic()
            for d in [d for d in pending if now >= d.deadline]:
                self._give_up(d, pending, f"no answer within {self.settings.ack_timeout:g} s")

    def _give_up(self, d, pending, reason):
        """No usable answer on a request thread's socket: the peer missed it (recorded first), the socket
        is closed (a late answer can never match another request), and the link is reset, as if its own
        message had failed, so the peer is probed and resynced when it answers."""
        pending.remove(d)
        d.link.drop_direct(d.sock)
        try:
            _call(d.callback, False, reason)
        finally:
            self._settled(d.peer, d.seq)
            d.link.reset(reason)

    def _settled(self, ps, seq):
        """Its answer (or the record of its miss) is in: a flush waiting in settle() may go on.  No lock
        on the common path: set.discard is atomic, and settle() reads copies under the condition."""
        ps.outstanding.discard(seq)
        if self._settling:  # read after the discard: a settle() that missed it is notified here
            with self._cond:
                self._cond.notify_all()

    def _notify_settled(self):
        """Called with the condition held."""
        if self._settling:
            self._cond.notify_all()

    def _take(self, d, pending):
        while True:
            try:
                frames = d.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError as exc:
                self._give_up(d, pending, f"receive failed: {exc}")
                return
            try:
                reply = rp.decode(frames)
            except rp.ProtocolError as exc:
                self._give_up(d, pending, f"malformed reply: {exc}")
                return
            if reply.seq != d.seq or reply.volume != self.repl_id:
                continue  # an answer to an earlier request on this socket, already given up
            pending.remove(d)
            d.link.count_ack(time.monotonic() - d.sent_at)
            try:
                _call(d.callback, reply.type == rp.ACK, reply)
            finally:
                self._settled(d.peer, d.seq)
            return

    def _callback(self, ticket, name, ps, at_risk=None):
        def answered(ok, reply):
            if ok:
                with self._cond:
                    abandoned = ticket.abandoned
                    if not abandoned:
                        ticket.applied.add(name)
                        # Acknowledged but not yet flushed there: at risk if that machine loses power, so
                        # a later miss records these chunks, whether or not this answer counted.
                        ps.unflushed.update(ticket.chunks)
                        if ps.state.counts:
                            ticket.acked.add(name)
                        else:
                            ticket.failed[name] = ps.generation
                if not abandoned:
                    ticket.wake()  # only the request waiting on it: no stampede of every waiter
                    return
                self._resync_from_here(name, ps, ticket, abandoned)  # applied there, not here
                return
            chunks = set(ticket.chunks) | at_risk if at_risk else ticket.chunks
            body = _nack_body(reply)
            code = body.get("code")
            if code == "stale_epoch":
                self.manager.fence(self, body.get("epoch"), f"peer {name}")
                with self._cond:
                    ticket.failed[name] = ps.generation
                    self._wake_all()
                return
            if code == "stale_seq":
                # Sent before the peer's current session began and delivered after it (an old
                # connection): a miss like any other, but the link is fine: no reset (it is shared by
                # every volume on that peer), resynced over it.
                self._missed(name, ps, chunks, "refused as older than its session", ticket=ticket, reset=False)
                if ps.link.up:
                    self.start_resync(name)
                return
            self._missed(name, ps, chunks, reply if isinstance(reply, str) else f"refused ({code})", ticket=ticket)

        return answered

    def _missed(self, name, ps, chunks, reason, ticket=None, reset=True):
        """The peer did not get something: record its chunks durably, mark it out of sync.

        What it acknowledged but never flushed goes into the bitmap too: if
        the peer's machine lost power, those writes are gone there.
        """
        with self._cond:
            chunks = set(chunks) | ps.unflushed
            ps.unflushed = set()
        unrecorded = None
        try:
            if chunks:
                ps.record(chunks)
        except OSError as exc:
            unrecorded = self._unrecorded(name, ps, chunks, exc)
        tell = False
        with self._cond:
            if ticket is not None:
                ticket.failed[name] = ps.generation
                if unrecorded:
                    ticket.error = unrecorded
            if ps.state.state != rp.FENCED:
                if ps.state.state != rp.OUT_OF_SYNC:
                    log(f"{self.volume.name}: peer {name} out of sync: {reason}")
                    # A client request it missed (not a stopped resync: telling would restart it, and a
                    # resync that keeps failing would loop), on a live link, from an open not closed.
                    tell = not reset and ticket is not None and ps.session_created and not self.closed
                ps.state.on("missed")
            self._wake_all()
        if tell and ps.link.up:
            # It fell out of sync while its link stays up (no reset, so no session CREATE will say so):
            # tell it, first on the link, so that a promotion there knows it may lack writes.
            try:
                self._create_one(name, ps, self._info())
            except Exception as exc:  # deleted meanwhile; the next session CREATE says it anyway
                log(f"{self.volume.name}: telling {name} it is out of sync: {exc}")
        if reset and ps.link.up and ps.state.state == rp.OUT_OF_SYNC:
            # It answers but missed a write (refused it, answered late): nothing else would start its
            # resync, so reset the link: probed, CREATE again, then resynced from the bitmap.  (Not
            # for CREATE's own failures: a copy that keeps refusing CREATE would loop.)
            ps.link.reset(f"{self.volume.name}: peer {name} missed a request: {reason}")

    def _unrecorded(self, name, ps, chunks, exc):
        """The peer's resync bitmap could not be written (disk full, I/O error).  Acknowledging on would
        let a restart resync too little, so the volume fails: its writes and flushes are refused from now
        on (the local write-intent log then keeps every chunk written since the last flush, and a restart
        adds those to every peer's bitmap).  This process still resyncs the chunks: they stay in memory."""
        reason = f"resync bitmap for peer {name}: {exc.strerror}"
        ps.remember(chunks)
        if not self.volume.store.failed:
            log(f"{self.volume.name}: {reason}: writes refused from now on")
        self.volume.store.fail(reason)
        return f"{self.volume.name}: volume failed: {reason}"

    def send_write(self, offset, data, fua=False, sums=None):
        """Send a write of whole blocks; ``sums`` are their checksums when the caller has them."""
        length = len(data)
        if sums is None:
            sums = np.empty(length // BLOCK_SIZE, dtype=np.uint64)
            checksum.hash_blocks(data, sums)
        payload = bytes(memoryview(data).cast("B"))  # the one copy: nbdkit's buffer dies with the callback
        return self._send(rp.WRITE, offset, length, self._chunks(offset, length), flags=rp.FUA if fua else 0,
                          sums=sums.tobytes(), data=payload)

    def send_range(self, kind, offset, length, fua=False):
        type_ = rp.TRIM if kind == "trim" else rp.ZERO
        return self._send(type_, offset, length, self._chunks(offset, length), flags=rp.FUA if fua else 0)

    def send_flush(self):
        return self._send(rp.FLUSH, 0, 0, set())

    def _chunks(self, offset, length):
        cs = self.volume.chunk_size
        if length == 0:
            return set()
        return set(range(offset // cs, (offset + length - 1) // cs + 1))

    # -- waiting for the quorum -------------------------------------------------------------
    def _copies(self, ticket):
        n = 1 + len(ticket.acked)
        for name, gen in ticket.failed.items():
            ps = self.peers[name]
            if ps.state.counts and ps.generation > gen:
                n += 1  # resynced since it missed this request: it holds it now
        return n

    def wait(self, ticket):
        if ticket.direct:
            self.collect(ticket)
        deadline = time.monotonic() + self.settings.write_timeout
        try:
            while True:
                with self._cond:
                    if self.fenced:
                        raise VolumeFailed(f"{self.volume.name}: fenced: a newer primary holds epoch > {self.epoch}")
                    if ticket.error:
                        raise VolumeFailed(ticket.error)
                    if self._copies(ticket) >= self.min_copies:
                        ticket.done = True
                        return
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise VolumeFailed(
                            f"{self.volume.name}: only {self._copies(ticket)} of the {self.min_copies} copies it "
                            f"needs acknowledged within {self.settings.write_timeout:g} s"
                        )
                    # A wake-up after the check above stays pending: sleep() returns at once.
                    self._waiting.add(ticket)
                ticket.sleep(min(left, 0.5))
        finally:
            with self._cond:
                self._waiting.discard(ticket)

    def settle(self, seq):
        """Wait until every request up to ``seq`` queued on a link is settled: answered, or its miss
        recorded in the peer's resync bitmap.  (Requests sent on request threads' own sockets are
        settled before their request returns: ``collect``.)  A flush calls this before the local
        write-intent log forgets its chunks: until then a write acknowledged without some peer's
        answer is on record nowhere else.  False if that takes longer than any deadline allows."""
        deadline = time.monotonic() + 3 * self.settings.ack_timeout + 1.0
        with self._cond:
            self._settling += 1
            try:
                while any(s <= seq for ps in self.peers.values() for s in list(ps.outstanding)):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    self._cond.wait(min(left, 0.5))
            finally:
                self._settling -= 1
        return True

    def last_seq(self):
        with self._cond:
            return self._seq

    def _wake_all(self):
        """Called with the condition held: something changed every request's quorum."""
        self._cond.notify_all()
        for t in self._waiting:
            t.wake()

    def force_confirm(self):
        """The operator's choice (`volume promote --force` on the primary): writable without a peer's
        confirmation.  A copy that answers with a newer epoch still fences it.  False if a peer had
        confirmed it already (nothing to force)."""
        with self._cond:
            if self.confirmed:
                return False
            self.confirmed = True
            self._promoted = True  # the first peer to answer CREATE clears the catalog's 'promoted'
            self.manager.confirmed_epochs[self.volume.volume_id] = self.epoch
            self._wake_all()
        return True

    def set_min_copies(self, n):
        with self._cond:
            self.min_copies = n
            self._wake_all()
        self.tell_peers()

    # -- resync ---------------------------------------------------------------------------
    def peer_down(self, link):
        for name, ps in self.peers.items():
            if ps.link is not link:
                continue
            ps.session_created = False  # a new link session: its CREATE must be answered again
            if ps.state.state in (rp.IN_SYNC, rp.RESYNCING) or ps.unflushed:
                self._missed(name, ps, set(), "peer unreachable", reset=False)

    def peer_up(self, link):
        for name, ps in self.peers.items():
            if ps.link is link and ps.state.state == rp.OUT_OF_SYNC:
                self._reconnect(name, ps)

    def retry_behind(self):
        """Another open of the volume: a peer that answers but is out of sync with no resync running (its
        CREATE was refused: no room to grow) gets a new CREATE, as a first open's would send it."""
        with self._cond:
            behind = [(n, ps) for n, ps in self.peers.items() if ps.state.state == rp.OUT_OF_SYNC and ps.link.up
                      and ps.resync_thread is None and not ps.creating and not self.closed]
        for name, ps in behind:
            self._reconnect(name, ps)

    def _reconnect(self, name, ps):
        try:
            info = self._info()
        except Exception:
            return  # deleted meanwhile
        self._create_one(name, ps, info, session=True)

    def start_resync(self, name):
        ps = self.peers[name]
        with self._cond:
            if ps.resync_thread is not None or ps.state.state != rp.OUT_OF_SYNC or self.closed:
                return
            ps.state.on("reconnected")
            ps.resync_thread = threading.Thread(target=self._resync, args=(name, ps), daemon=True,
                                                name=f"blockd-resync-{self.volume.name}-{name}")
            # Started under the condition: close() never sees a thread it cannot join yet.
            ps.resync_thread.start()

    def _request(self, ps, msg, timeout=None):
        done = threading.Event()
        out = {}

        def answered(ok, reply):
            out["ok"] = ok
            out["reply"] = reply
            done.set()

        ps.link.send(msg, answered)
        if not done.wait(timeout or self.settings.ack_timeout * 3):
            return False, "timeout"
        return out["ok"], out["reply"]

    def _merge_peer_chunks(self, name, ps):
        """After a promotion of a volume too big to compare whole, the chunks the peer holds join its
        bitmap before the first resync compares anything (promotion put ours there).  Raises
        _ResyncAborted if the peer cannot answer now (tried again at the next resync)."""
        marker = self.manager.datadir.chunk_list_path(self.volume.volume_id, name)
        if not os.path.exists(marker):
            return
        total = (self.volume.size + self.volume.chunk_size - 1) // self.volume.chunk_size
        start, found = 0, 0
        while True:
            msg = rp.Message(rp.CHUNKS, volume=self.repl_id, epoch=self.epoch, seq=self._next_seq(), offset=start,
                             length=CHUNKS_PAGE)
            ok, reply = self._request(ps, msg)
            if not ok:
                log(f"{self.volume.name}: listing {name}'s chunks: {_reason(reply)}")
                raise _ResyncAborted()
            page = np.frombuffer(reply.sums, dtype="<u8")
            if len(page) and (int(page[0]) < start or len(page) > CHUNKS_PAGE):
                log(f"{self.volume.name}: {name} answered chunks from {int(page[0])} to a request from {start}")
                raise _ResyncAborted()
            ps.record([c for c in page.tolist() if c < total])  # durable before the marker goes
            found += len(page)
            if len(page) < CHUNKS_PAGE or int(page[-1]) >= total:
                break
            start = int(page[-1]) + 1
        os.unlink(marker)
        log(f"{self.volume.name}: {name} holds {found} chunk(s): compared with ours")

    def _resync(self, name, ps):
        volume = self.volume
        try:
            self._merge_peer_chunks(name, ps)
        except (_ResyncAborted, OSError) as exc:
            if isinstance(exc, OSError):
                log(f"{volume.name}: merging {name}'s chunk list: {exc}")
            self._missed(name, ps, set(), "its chunk list could not be merged", reset=False)
            with self._cond:
                self._wake_all()
                if ps.resync_thread is threading.current_thread():
                    ps.resync_thread = None
            return
        chunks = ps.pending_chunks()
        ps.resync_total = len(chunks)
        ps.resync_done = 0
        started = time.monotonic()
        sent_before = ps.resynced_bytes
        try:
            log(f"{volume.name}: resyncing {len(chunks)} chunk(s) to {name}")
            while True:
                for c in ps.pending_chunks():
                    if self.closed:
                        raise _ResyncAborted()  # the volume closed: the next open resumes from the bitmap
                    try:
                        ok = self._resync_chunk(name, ps, c)
                    except (BlockdError, OSError) as exc:
                        # e.g. a local checksum error: this copy cannot vouch for the chunk.  It stays
                        # in the bitmap and the peer out of sync (scrub --repair, then a new resync).
                        log(f"{volume.name}: resync to {name} stopped at chunk {c}: {exc}")
                        raise _ResyncAborted() from None
                    if not ok:
                        raise _ResyncAborted()
                    ps.resync_done += 1
                    # Throttle the data sent: never faster than resync_mibps on average.  A chunk found
                    # equal cost a SUMS round trip, not a chunk of data, and does not count.
                    sent_bytes = ps.resynced_bytes - sent_before
                    ahead = sent_bytes / (self.settings.resync_mibps * 1024 * 1024) - (time.monotonic() - started)
                    if ahead > 0:
                        time.sleep(ahead)
                with self._cond:
                    if ps.pending_count():
                        # Missed something after the last look: another pass.  Resyncing again (if it
                        # answered this session's CREATE), so new writes reach it meanwhile instead of
                        # piling up in its bitmap.
                        if ps.state.state == rp.OUT_OF_SYNC and ps.link.up and ps.session_created:
                            ps.state.on("reconnected")
                        continue
                    if ps.state.state == rp.OUT_OF_SYNC and ps.link.up and ps.session_created:
                        # It missed something during this pass (recorded, then resynced by it), and
                        # answered this link session's CREATE: nothing is left, so it holds
                        # everything (writes were recorded, not sent, while it was out of sync).
                        ps.state.on("reconnected")
                    if ps.state.state == rp.RESYNCING:
                        ps.state.on("resynced")
                        ps.generation += 1
                        self._wake_all()
                        log(f"{volume.name}: peer {name} in sync ({ps.resync_done} chunk(s), "
                            f"{ps.skipped_chunks} already equal)")
                    if ps.resync_thread is threading.current_thread():
                        ps.resync_thread = None  # under the condition: start_resync() sees it gone
                    break
            if ps.state.counts:
                self._create_one(name, ps, self._info())  # it may now be promoted safely
        except _ResyncAborted:
            # Through _missed: what it acknowledged but never flushed goes into its bitmap too.
            self._missed(name, ps, set(), "resync stopped", reset=False)
            with self._cond:
                self._wake_all()
        finally:
            with self._cond:
                if ps.resync_thread is threading.current_thread():  # not a newer one started meanwhile
                    ps.resync_thread = None

    def _resync_chunk(self, name, ps, c):
        volume = self.volume
        cs = volume.chunk_size
        offset = c * cs
        length = min(cs, volume.size - offset)
        if length <= 0:
            ps.forget([c])
            return True
        held = volume.lock_range(offset, offset + length)
        try:
            local_sums = volume.block_sums(offset, length)
            ok, reply = self._request(ps, rp.Message(rp.SUMS, volume=self.repl_id, epoch=self.epoch,
                                                     seq=self._next_seq(), offset=offset, length=length))
            if not ok:
                return False
            if bytes(reply.sums) == local_sums.tobytes():
                ps.skipped_chunks += 1
                with self._cond:
                    # Equal, but maybe only in its page cache (its last flush missed): the next flush makes
                    # it durable there, or, missed, records it again (a RESYNC is sent with FUA instead).
                    ps.unflushed.add(c)
            else:
                data = np.empty(length, dtype=np.uint8)
                volume.read_locked(data, offset)
                for _attempt in range(2):
                    ok, reply = self._request(
                        ps,
                        rp.Message(rp.RESYNC, volume=self.repl_id, epoch=self.epoch, seq=self._next_seq(),
                                   offset=offset, length=length, flags=rp.FUA, sums=local_sums.tobytes(),
                                   data=data.tobytes()),
                        timeout=max(self.settings.ack_timeout * 3, 10.0),
                    )
                    # Its seq was taken before a new session's CREATE and sent after it: again, newer.
                    if ok or _nack_code(reply) != "stale_seq":
                        break
                if not ok:
                    return False
                ps.resynced_bytes += length
            # Under the range lock: a write missing this peer right after would otherwise record the
            # chunk (already listed: a no-op) and then lose it to this forget.
            ps.forget([c])
        finally:
            volume.unlock_range(held)
        return True

    def close(self, wait=True):
        """The volume is closing: stop its resyncs (they read through this Volume object, whose
        checksums go stale once another opens the volume) and, with ``wait``, wait for them."""
        with self._cond:
            self.closed = True
            last = self.manager.last_seqs
            last[self.volume.volume_id] = max(last.get(self.volume.volume_id, 0), self._seq)
            threads = [ps.resync_thread for ps in self.peers.values() if ps.resync_thread is not None]
            self._wake_all()
        if wait:
            for t in threads:
                t.join()

    # -- read-repair -------------------------------------------------------------------------
    def fetch_block(self, offset, accept):
        """A block from an in-sync replica (the caller holds the block's range lock, exclusive) whose data
        hashes to one of ``accept``; None if none has it.

        When this copy's data and checksum are both rotten, nothing here can vouch for a block: then an
        in-sync replica's block is taken if it matches the replica's own checksum, but only once every
        request sent to the peers before the READ was answered or its miss recorded (``settle``): the
        writes to this block were all sent before the range lock was taken here, so the replica has
        applied them, and its block is the latest.  Never a zero block that way (a copy lost unnoticed
        reads as zeros)."""
        settled = self.settle(self.last_seq())
        for name, ps in self.peers.items():
            if not ps.state.counts:
                continue
            generation = ps.generation
            ok, reply = self._request(ps, rp.Message(rp.READ, volume=self.repl_id, epoch=self.epoch,
                                                     seq=self._next_seq(), offset=offset, length=BLOCK_SIZE))
            if not ok or len(reply.data) != BLOCK_SIZE or not ps.state.counts or ps.generation != generation:
                continue  # (no longer in sync by the time it answered: a lost copy's CREATE answered first)
            data = np.frombuffer(bytes(reply.data), dtype=np.uint8).copy()
            got = np.empty(1, dtype=np.uint64)
            checksum.hash_blocks(data, got)
            if int(got[0]) in accept:
                log(f"{self.volume.name}: read-repair of block at {offset} from {name}")
                return data
            theirs = np.frombuffer(bytes(reply.sums), dtype=np.uint64) if len(reply.sums) == 8 else None
            if (settled and theirs is not None and int(theirs[0]) == int(got[0])
                    and int(got[0]) != checksum.ZERO_BLOCK_HASH):
                log(f"{self.volume.name}: read-repair of block at {offset} from {name} (this copy's data and "
                    "checksum both differ from it; its own checksum vouches for it, every write sent to it answered)")
                return data
        return None

    def log_unrepaired(self, offset):
        """One line per block a read-repair could not fix (a line per second at most)."""
        now = time.monotonic()
        if now - self._unrepaired_logged >= 1.0:
            self._unrepaired_logged = now
            log(f"{self.volume.name}: read-repair of block at {offset}: no in-sync replica has a copy matching "
                "this one's checksum or data; the read fails (EIO)")

    # -- inspection ----------------------------------------------------------------------------
    def status(self):
        with self._cond:
            return {
                "repl_id": self.repl_id,
                "epoch": self.epoch,
                "min_copies": self.min_copies,
                "fenced": self.fenced,
                "confirmed": self.confirmed,
                "peers": {
                    name: {
                        "state": ps.state.state,
                        "connected": ps.link.up,
                        "address": ps.link.address,
                        "resync_remaining_chunks": ps.pending_count(),
                        "resync_remaining_bytes": ps.pending_count() * self.volume.chunk_size,
                        "resync_done_chunks": ps.resync_done,
                        "resync_total_chunks": ps.resync_total,
                        "resynced_bytes": ps.resynced_bytes,
                        "skipped_chunks": ps.skipped_chunks,
                    }
                    for name, ps in self.peers.items()
                },
            }

    def _wait_resyncs(self):
        """Before verify compares: a peer that answers and has chunks to resync gets them first (the
        CREATE answered, the resync run), so a resync about to run is not reported as differences.
        Waits as long as a resync runs; a peer still out of sync with none running after the grace
        period (a few ack deadlines: time to reconnect and answer) is compared as it is."""
        grace = time.monotonic() + 3 * self.settings.ack_timeout + 1.0
        while True:
            with self._cond:
                running = any(ps.resync_thread is not None for ps in self.peers.values())
                waiting = any(ps.state.state == rp.OUT_OF_SYNC for ps in self.peers.values())
            if running or (waiting and time.monotonic() < grace):
                time.sleep(0.05)
                continue
            return

    def wait_caught_up(self, stopping, patience, clients=lambda: 0, limit=600.0):
        """For a catch-up (the volume open with no client): until every peer whose link is up answered
        this open's CREATE and is in sync with nothing left to resync.  Returns why it stopped waiting:
        ``done``; ``no_peer`` (none is up); ``stuck`` (nothing moved for ``patience`` seconds);
        ``turn`` (``limit`` seconds went by: others get theirs); ``client`` (a client opened it: its open
        goes on with the resync); ``closed`` (deleted, fenced, closed); ``stopping``."""
        last, since = None, time.monotonic()
        end = since + limit
        while not stopping.is_set():
            with self._cond:
                if self.fenced or self.closed or self.volume.gone:
                    return "closed"
                up = [ps for ps in self.peers.values() if ps.link.up]
                if up and all(ps.state.state == rp.IN_SYNC and ps.session_created and not ps.pending_count()
                              for ps in up):
                    return "done"
                now = time.monotonic()
                seen = tuple((ps.state.state, ps.session_created, ps.resync_done, ps.resynced_bytes, ps.link.up)
                             for ps in self.peers.values())
                if seen != last:
                    last, since = seen, now
                elif now - since > patience:
                    return "stuck" if up else "no_peer"
                if now > end:
                    return "turn"
                self._cond.wait(0.1)
            if clients() > 0:
                return "client"
        return "stopping"

    def peer_sizes(self):
        """{peer: the size its copy has (None if it does not say)}: what verify compares first."""
        out = {}
        for name, ps in self.peers.items():
            ok, reply = self._request(ps, rp.json_message(rp.STATE, {}, volume=self.repl_id, seq=self._next_seq()))
            try:
                size = reply.json().get("size") if ok else None
            except rp.ProtocolError:
                size = None
            out[name] = size if isinstance(size, int) else None
        return out

    def verify(self, with_sizes=False):
        """Compare every block's checksum with every peer's; returns {peer: [differing offsets]}, and
        with ``with_sizes`` also {peer: its copy's size} (a smaller copy is compared up to its end)."""
        volume = self.volume
        self._wait_resyncs()
        ticket = self.send_flush()
        self.wait(ticket)
        sizes = self.peer_sizes() if with_sizes else {}
        for name, size in sizes.items():
            if size is None:
                raise Refused(f"{volume.name}: peer {name} did not answer verify (its size)")
        out = {}
        cs = volume.chunk_size
        for name, ps in self.peers.items():
            diffs = []
            end = min(volume.size, sizes.get(name) or volume.size)
            for offset in range(0, end, cs):
                length = min(cs, end - offset)
                held = volume.lock_range(offset, offset + length, exclusive=False)
                try:
                    local = volume.block_sums(offset, length)
                    ok, reply = self._request(ps, rp.Message(rp.SUMS, volume=self.repl_id, epoch=self.epoch,
                                                             seq=self._next_seq(), offset=offset, length=length))
                finally:
                    volume.unlock_range(held)
                if not ok:
                    raise Refused(f"{volume.name}: peer {name} did not answer verify: {reply}")
                remote = np.frombuffer(bytes(reply.sums), dtype=np.uint64)
                if remote.shape != local.shape:
                    diffs.append(offset)
                    continue
                for i in np.nonzero(remote != local)[0]:
                    diffs.append(offset + int(i) * BLOCK_SIZE)
            out[name] = diffs
        return (out, sizes) if with_sizes else out


class _ResyncAborted(Exception):
    pass


# ---- the node-level manager -----------------------------------------------------------------------
class Manager:
    """Links to peers and the replication of every open replicated volume on this node."""

    def __init__(self, engine, keys, settings):
        self.engine = engine
        self.catalog = engine.catalog
        self.datadir = engine.datadir
        self.files = engine.files
        self.keys = keys
        self.settings = settings
        self._links = {}
        self._volumes = {}  # volume id -> VolumeReplication
        self._bitmaps = {}  # (volume id, peer name) -> PeerBitmap, for the life of this process
        self.confirmed_epochs = {}  # volume id -> the epoch a peer confirmed current in this process
        self.last_seqs = {}  # volume id -> the last seq its closed opens used (the next open starts above)
        # (volume id, peer) -> (its state, the link's sink instance) when the volume last closed here
        self._closed_states = {}
        self._catch_up_queue = set()  # (volume id or None: every volume, peer name or None: every peer)
        self._catch_up_wake = threading.Event()
        self._retry_at = {}  # volume id -> (monotonic time of its next catch-up, the pause after that one)
        self._tombstones_due = None  # when undelivered DELETEs are sent again (their peers' links are up)
        self._must_visit = set()  # volume ids whose copies must hear a CREATE (modified while closed)
        self._lock = threading.Lock()

    def link(self, peer):
        with self._lock:
            link = self._links.get(peer["name"])
            if link is None:
                if not self.settings.insecure and not peer["public_key"]:
                    raise Refused(f"peer {peer['name']} has no public key (add one, or serve with --insecure-replication)")
                link = PeerLink(_context(), peer["name"], peer["address"], peer["public_key"], self.keys,
                                self.settings, on_up=self._peer_up, on_down=self._peer_down).start()
                self._links[peer["name"]] = link
            return link

    def bitmap(self, volume_id, peer_name):
        """The resync bitmap of ``peer_name`` for a volume: loaded once, then shared by every open."""
        key = (volume_id, peer_name)
        with self._lock:
            b = self._bitmaps.get(key)
            if b is None:
                b = self._bitmaps[key] = PeerBitmap(self.files, self.datadir.resync_path(volume_id, peer_name))
            return b

    def drop_bitmaps(self, volume_id):
        """The volume was deleted, fenced or promoted here: its bitmaps are closed (late answers to its
        old opens record nothing) and the next open loads the files afresh."""
        with self._lock:
            gone = [self._bitmaps.pop(k) for k in list(self._bitmaps) if k[0] == volume_id]
            for k in [k for k in self._closed_states if k[0] == volume_id]:
                del self._closed_states[k]
            self._retry_at.pop(volume_id, None)
        for b in gone:
            b.close()

    def _peer_down(self, link):
        with self._lock:
            volumes = list(self._volumes.values())
        for vr in volumes:
            vr.peer_down(link)

    def _peer_up(self, link):
        with self._lock:
            volumes = list(self._volumes.values())
        for vr in volumes:
            vr.peer_up(link)
        self.request_catch_up(peer=link.name)  # the volumes closed here that it may have fallen behind on

    def attach(self, volume, row):
        """Called by the engine when it opens a replicated primary volume."""
        peers = self.catalog.volume_replicas(row["id"])
        vr = VolumeReplication(self, volume, row, peers)
        with self._lock:
            self._volumes[volume.volume_id] = vr
        volume.replication = vr
        try:
            vr.create_on_peers()
        except BaseException:
            with self._lock:
                self._volumes.pop(volume.volume_id, None)
            volume.replication = None
            vr.close(wait=False)
            raise
        return vr

    def detach(self, volume, wait=True):
        """The volume closed (after its final flush settled) or was deleted: it leaves the manager.  A
        peer left behind with its link up is caught up in the background (see catch_up)."""
        vr = volume.replication
        if vr is None or vr.volume is not volume:
            return
        with self._lock:
            mine = self._volumes.get(volume.volume_id) is vr
            if mine:
                del self._volumes[volume.volume_id]  # not a newer open's (after a fence and a promotion)
        vr.close(wait)
        if not mine or vr.fenced:
            return
        behind = False
        seen = {}
        with vr._cond:
            for name, ps in vr.peers.items():
                seen[(volume.volume_id, name)] = (ps.state.state, ps.link.instance)
                behind = behind or (ps.link.up and (ps.state.state != rp.IN_SYNC or bool(ps.pending_count())))
        with self._lock:
            self._closed_states.update(seen)
        if behind:
            self.request_catch_up(volume.volume_id)

    def closed_peer_status(self, volume_id, peer):
        """A peer's status while its volume is not open here: its durable resync bitmap, and in sync if
        it was when the volume last closed here and the same sink (no restart since) answers now."""
        out = self.datadir.closed_peer_status(volume_id, peer, "volume not open")
        with self._lock:
            seen = self._closed_states.get((volume_id, peer["name"]))
            link = self._links.get(peer["name"])
        if (seen is not None and seen[0] == rp.IN_SYNC and not out.get("resync_remaining_chunks")
                and link is not None and link.up and link.instance is not None and link.instance == seen[1]):
            out["state"] = rp.IN_SYNC
        return out

    # -- catching up the replicas of closed volumes -----------------------------------------------
    def request_visit(self, volume_id):
        """A closed volume's copies must hear its new type and limits (modified while closed): the
        catch-up opens it once a peer answers, even if every copy is in sync."""
        with self._lock:
            self._must_visit.add(volume_id)
        self.request_catch_up(volume_id)

    def request_catch_up(self, volume_id=None, peer=None):
        """Ask the catch-up thread to look at a volume (None: every one) for a peer (None: every one)."""
        with self._lock:
            self._catch_up_queue.add((volume_id, peer))
        self._catch_up_wake.set()

    def catch_up(self, stopping, patience=None):
        """Thread: a replica of a volume that is closed here catches up without waiting for a client.

        A peer that missed writes (its resync bitmap is not empty), restarted (it says ``unconfirmed``
        until a primary says how in sync it is), lost its copy, holds a smaller copy (a resize it
        missed), or whose volume crashed here open (its intent log is not empty) is caught up by
        opening the volume as the server's own holder (no client; it never blocks a delete): that
        open's CREATE tells each peer how in sync it is and its missed chunks resync, exactly as for a
        client's open, held until every peer that answers is in sync (or a client opens it: its open
        goes on).  Looked at at start, when a peer answers again (only peers whose link is up are
        asked), when a volume closes with a peer behind, and after a promotion here; a visit that
        could not finish while its peers answered is tried again later, backing off.  A copy found
        promoted elsewhere fences this one (as check_epochs does)."""
        patience = patience if patience is not None else max(10.0, 4 * self.settings.ack_timeout)
        self.request_catch_up()
        while not stopping.is_set():
            self._catch_up_wake.wait(1.0)
            now = time.monotonic()
            with self._lock:
                self._catch_up_wake.clear()
                queued, self._catch_up_queue = self._catch_up_queue, set()
                if self._tombstones_due is not None and self._tombstones_due <= now:
                    self._tombstones_due = None
                    tombstones_due = True
                else:
                    tombstones_due = False
                waiting = {v for v, (when, _pause) in self._retry_at.items() if when > now}
                queued |= {(v, None) for v, (when, _pause) in self._retry_at.items() if when <= now}
            everything = {p for v, p in queued if v is None}  # a peer answers again, or the start
            if (tombstones_due or everything) and not stopping.is_set():
                try:  # (due ones to every peer: also when volumes are queued, or their retry would be lost)
                    self._deliver_tombstones(None if tombstones_due or None in everything else everything)
                except Exception as exc:
                    log(f"deleting copies of deleted volumes: {type(exc).__name__}: {exc}")
            if not queued or stopping.is_set():
                continue
            try:
                rows = [r for r in self.catalog.volumes() if r["role"] == "primary" and r["repl_id"] is not None]
            except Exception as exc:
                if stopping.is_set():
                    return
                log(f"catching up replicas: {exc}")
                with self._lock:
                    self._catch_up_queue |= queued
                continue
            with self._lock:  # deleted, fenced or promoted away since: nothing to retry
                for vid in set(self._retry_at) - {r["id"] for r in rows}:
                    del self._retry_at[vid]
            for row in rows:
                if stopping.is_set():
                    return
                if row["id"] in waiting:
                    continue  # its last catch-up could not finish though its peers answered: it waits its turn
                wanted = everything | {p for v, p in queued if v == row["id"]}
                if not wanted:
                    continue
                try:
                    self._catch_up_volume(row, None if None in wanted else wanted, stopping, patience)
                except Exception as exc:  # one volume's failure must not end the others' catch-up
                    if stopping.is_set():
                        return
                    log(f"{row['name']}: catching up its replicas: {type(exc).__name__}: {exc}")
                    self._retry_later(row["id"])

    def _retry_later(self, volume_id):
        with self._lock:
            pause = min(self._retry_at.get(volume_id, (0, 2.5))[1] * 2, 300.0)
            self._retry_at[volume_id] = (time.monotonic() + pause, pause)

    def _catch_up_volume(self, row, peer_names, stopping, patience):
        vid = row["id"]
        if self.volume(vid) is not None:
            with self._lock:
                self._retry_at.pop(vid, None)  # open: its own replication catches its peers up
            return
        replicas = self.catalog.volume_replicas(vid)
        links = {}
        for p in replicas:
            try:
                links[p["name"]] = self.link(p)  # its heartbeats say when the peer answers again (or restarted)
            except BlockdError:
                pass
        # Only peers that answer now: one that does not is looked at again when its link comes up.
        wanted = [p for p in replicas if (peer_names is None or p["name"] in peer_names)
                  and p["name"] in links and links[p["name"]].up]
        dirty = {p["name"] for p in wanted if self._peer_dirty(vid, p["name"])}
        asked = [p for p in wanted if p["seeded"] or p["name"] in dirty]
        if not asked:
            with self._lock:
                self._retry_at.pop(vid, None)  # nobody to catch up now: a peer answering again brings it back
            return
        answers = self.query_copies([_copy(p) for p in asked], row["repl_id"], refusals=True)
        crashed = bool(IntentLog(self.files, os.path.join(self.datadir.volume_path(vid), INTENT_FILE)).load())
        with self._lock:
            must = vid in self._must_visit
        visit = False
        for p in asked:
            a = answers.get(p["address"])
            if a is None:
                continue  # silent: when its link answers again it is looked at again
            if "refused" in a:
                if a["refused"] == "unknown_volume" and p["seeded"]:
                    visit = True  # its copy is gone
                    self._forget_closed_state(vid, p["name"])
                continue
            if isinstance(a.get("epoch"), int) and a["epoch"] > row["epoch"]:
                self.supersede(row, a["epoch"], f"peer {p['name']}")
                return
            smaller = isinstance(a.get("size"), int) and a["size"] < row["size"]  # it missed a resize
            if a.get("sync_state") != rp.IN_SYNC or smaller:
                self._forget_closed_state(vid, p["name"])
            visit = (visit or must or crashed or smaller or p["name"] in dirty
                     or a.get("sync_state") != rp.IN_SYNC)
        if not visit:
            with self._lock:
                self._retry_at.pop(vid, None)
            return
        why = self._visit(row, stopping, patience)
        if why in ("done", "client", "closed"):
            with self._lock:
                self._must_visit.discard(vid)  # its CREATE went out (or the volume is gone)
        if why == "stuck":
            self._retry_later(vid)
        elif why == "turn":  # progressing, but others get their turn: back soon, no backing off
            with self._lock:
                self._retry_at[vid] = (time.monotonic() + 1.0, 2.5)
        elif why != "stopping":
            with self._lock:
                self._retry_at.pop(vid, None)

    def _forget_closed_state(self, volume_id, peer_name):
        with self._lock:
            self._closed_states.pop((volume_id, peer_name), None)

    def _peer_dirty(self, volume_id, peer_name):
        """Chunks on record for the peer to resync (or a chunk list to merge)."""
        if os.path.exists(self.datadir.chunk_list_path(volume_id, peer_name)):
            return True
        with self._lock:
            b = self._bitmaps.get((volume_id, peer_name))
        if b is not None:
            return b.pending() > 0
        return bool(IntentLog(self.files, self.datadir.resync_path(volume_id, peer_name)).load())

    def _visit(self, row, stopping, patience):
        """Open the volume as this server's own holder until its peers are caught up; then close it.
        Returns why it ended (VolumeReplication.wait_caught_up)."""
        try:
            volume = self.engine.open(row["name"], internal=True)
        except NotFound:
            return "closed"  # deleted, or fenced: nothing to catch up from here
        except Exception as exc:
            log(f"{row['name']}: catching up its replicas: {exc}")
            return "stuck"
        try:
            vr = volume.replication
            if vr is None:
                return "closed"
            log(f"{row['name']}: catching up its replicas while no client has it open")
            why = vr.wait_caught_up(stopping, patience, lambda: self.engine.clients(row["id"]))
            if why == "done":
                log(f"{row['name']}: replicas caught up")
            elif why in ("stuck", "no_peer"):
                log(f"{row['name']}: replicas not caught up yet ({'no progress' if why == 'stuck' else 'no peer answers'}); "
                    "tried again later")
            return why
        finally:
            self.engine.release(volume, internal=True)

    def fence(self, vr, epoch, by):
        """A peer holds a newer epoch: this copy was superseded.  Never writable again here: it becomes
        a replica (the new primary resyncs it).  ``vr`` may be a closed open's (a late answer): the
        volume's current open is fenced too if its epoch is as old, and left alone if newer."""
        epoch = epoch if isinstance(epoch, int) else vr.epoch + 1
        volume_id = vr.volume.volume_id
        with self._lock:
            current = self._volumes.get(volume_id)
            stale = [v for v in dict.fromkeys((vr, current)) if v is not None and v.epoch < epoch]
            if current in stale:
                del self._volumes[volume_id]
        if not stale:
            return
        for v in stale:
            with v._cond:
                v.fenced = True
                v._wake_all()
            v.close(wait=False)  # maybe on the link thread, which a resync may be waiting on
        with self._lock:
            if self.confirmed_epochs.get(volume_id, epoch) < epoch:
                del self.confirmed_epochs[volume_id]  # not a newer confirmation (an open promoted since)
        log(f"{vr.volume.name}: {by} holds epoch {epoch} > {vr.epoch}: fenced, now a replica")
        try:
            self.engine.fence(volume_id, epoch)
        except Exception as exc:
            log(f"{vr.volume.name}: fencing: {exc}")

    def check_epochs(self, stopping=None, give_up_after=300.0):
        """At start: ask the copies of every replicated volume this node is primary for which epoch they
        hold.  A newer one means a copy was promoted while this node was down: this copy is fenced now
        (`volume show` says replica and its new primary resyncs it), not only when a client opens it
        here (an open racing this finds the row a replica and is refused, or is retired by the fence).
        Copies that do not answer are asked again, backing off, for ``give_up_after`` seconds; within a
        pass a copy that did not answer is not asked again.  Nothing is confirmed this way (an open's
        CREATE does that).  Runs on its own thread until ``stopping`` is set."""
        stopping = stopping or threading.Event()
        deadline = time.monotonic() + give_up_after
        pause = 0.5
        asked = set()  # (volume id, address) that answered (or refused)
        while not stopping.is_set():
            silent = set()  # addresses that did not answer in this pass
            try:
                rows = [r for r in self.catalog.volumes() if r["role"] == "primary" and r["repl_id"] is not None]
            except Exception as exc:
                log(f"checking epochs: {exc}")
                rows = []
                silent.add(None)  # try again later
            for row in rows:
                if stopping.is_set() or time.monotonic() > deadline:
                    return
                try:
                    self._check_epoch(row, asked, silent)
                except Exception as exc:  # one volume's failure must not end the others' check
                    if stopping.is_set():
                        return  # the server is stopping (its catalog closed under a question)
                    log(f"{row['name']}: checking its copies' epochs: {type(exc).__name__}: {exc}")
                    silent.add(None)
            if not silent or time.monotonic() > deadline:
                return
            stopping.wait(pause)
            pause = min(pause * 2, 10.0)

    def _check_epoch(self, row, asked, silent):
        # Only copies that exist (seeded: a CREATE was answered); a refusal is an answer too.
        copies = [c for c in self._replica_copies(row["id"]) if c["seeded"] and (row["id"], c["address"]) not in asked]
        pending = [c for c in copies if c["address"] not in silent]
        if not pending:
            return
        answers = self.query_copies(pending, row["repl_id"], refusals=True)
        for address, a in answers.items():
            if a is None:
                silent.add(address)
            else:
                asked.add((row["id"], address))
        newer = [(a["epoch"], address) for address, a in answers.items()
                 if a is not None and isinstance(a.get("epoch"), int) and a["epoch"] > row["epoch"]]
        if not newer:
            return
        epoch, by = max(newer)
        self.supersede(row, epoch, "peer " + next(c["name"] for c in pending if c["address"] == by))

    def _replica_copies(self, volume_id):
        """The copies a primary's replicas hold, as ask_copies and query_copies take them."""
        return [_copy(p) for p in self.catalog.volume_replicas(volume_id)]

    def supersede(self, row, epoch, by):
        """A copy holds ``epoch``, newer than this primary's ``row``: fence it here, open or not."""
        vr = self.volume(row["id"])
        if vr is None and self.engine.fence(row["id"], epoch):
            log(f"{row['name']}: {by} holds epoch {epoch} > {row['epoch']}: fenced, now a replica")
        vr = self.volume(row["id"])  # (again: an open may have attached one meanwhile)
        if vr is not None and vr.epoch < epoch:
            self.fence(vr, epoch, by)

    def resize_copies(self, row, size):
        """Grow every copy of the primary volume ``row`` to ``size`` before this one grows: enough must
        take it (min_copies - 1 replicas) or the resize is refused, so a failover never shrinks what was
        grown (a filesystem grown onto the new end).  Copies that do not answer learn the size from the
        next CREATE (their reconnect, the next open); one that took it while too few did stays larger,
        harmlessly, until the next resize.  Returns the names of the copies that took it."""
        copies = self._replica_copies(row["id"])
        msg = rp.Message(rp.RESIZE, volume=row["repl_id"], epoch=row["epoch"], seq=time.time_ns() // 1000,
                         offset=size)
        replies = ask_copies(copies, self.keys, msg, self.settings.insecure, self.settings.ack_timeout)
        took, why = [], []
        for c in copies:
            reply = replies.get(c["address"])
            if reply is None:
                why.append(f"{c['name']} did not answer")
            elif reply.type == rp.ACK:
                took.append(c["name"])
            else:
                body = _nack_body(reply)
                if body.get("code") == "stale_epoch":
                    epoch = body.get("epoch") if isinstance(body.get("epoch"), int) else row["epoch"] + 1
                    self.supersede(row, epoch, f"peer {c['name']}")
                    raise Refused(f"volume {row['name']}: peer {c['name']} holds epoch {epoch}: this copy was "
                                  "superseded (fenced, now a replica); resize it on its primary")
                if body.get("code") == "unknown_volume" and not c["seeded"]:
                    # Never created there (the volume was not opened since it was made): the first open's
                    # CREATE makes it with the size the catalog has then.  (An open now re-sends it.)
                    took.append(c["name"])
                    continue
                why.append(f"{c['name']} refused: {body.get('error') or body.get('code')}")
        missed = [c["name"] for c in copies if c["name"] not in took]
        for name in missed:
            self._forget_closed_state(row["id"], name)
        if missed:
            self.request_catch_up(row["id"])  # grown by a visit's CREATE once it answers (or has room)
        if len(took) < row["min_copies"] - 1:
            raise Refused(f"volume {row['name']}: not resized: {len(took)} of {len(copies)} replica(s) took "
                          f"{format_size(size)} ({'; '.join(why)}) and writes need {row['min_copies']} copies "
                          "(blockd volume set --min-copies to go on with fewer)")
        return took

    def volume(self, volume_id):
        with self._lock:
            return self._volumes.get(volume_id)

    def delete_on_peers(self, row, peers):
        """Tell each peer to delete its copy; waits briefly for the answers, never fails the delete.  A peer
        that does not confirm it gets a tombstone (DataDir.remember_peer_deletes): the DELETE is sent
        again when it answers (catch_up).  Returns the names of those peers."""
        try:  # before asking: a crash while waiting for the answers leaves them on record
            self.datadir.remember_peer_deletes(row, [p["name"] for p in peers])
        except OSError as exc:
            log(f"{row['name']}: recording the copies to delete: {exc}")
        waits = []
        for p in peers:
            done = threading.Event()
            result = {}
            waits.append((p["name"], done, result))
            try:
                link = self.link(p)
            except BlockdError:
                done.set()
                continue
            self._send_delete(link, row["repl_id"], row["epoch"], result, done)
        pending = []
        for name, done, result in waits:
            done.wait(self.settings.ack_timeout * 2)
            if result.get("gone"):
                _remove_quietly(self.datadir.tombstone_path(row["repl_id"], name))
            else:
                pending.append(name)
        return pending

    def _send_delete(self, link, repl_id, epoch, result, done):
        def answered(ok, reply):
            code = None if ok else _nack_code(reply)
            # Deleted, or nothing to delete there (no such copy; a newer primary's, or one promoted there,
            # which is not ours to delete).
            result["gone"] = ok or code in ("unknown_volume", "stale_epoch", "not_replica")
            result["code"] = code
            done.set()

        msg = rp.Message(rp.DELETE, volume=repl_id, epoch=epoch, seq=time.time_ns() // 1000)
        link.send(msg, answered)

    def _deliver_tombstones(self, peer_names):
        """Copies of volumes deleted here that a peer (one of ``peer_names``, None: any) did not delete
        then: sent the DELETE again now that its link answers; the tombstone goes once it is done."""
        try:
            peers = {p["name"]: p for p in self.catalog.peers()}
        except Exception:
            return
        for path, repl_id, name, info in self.datadir.tombstones():
            if peer_names is not None and name not in peer_names:
                continue
            peer = peers.get(name)
            if peer is None:
                _remove_quietly(path)  # the peer was removed from this node's configuration
                continue
            try:
                link = self.link(peer)
            except BlockdError:
                continue
            if not link.up:
                continue

            result, done = {}, threading.Event()
            self._send_delete(link, repl_id, info["epoch"], result, done)
            done.wait(self.settings.ack_timeout * 2)
            if not result.get("gone"):
                with self._lock:  # no answer, or an error there, on a link that answers: tried again later
                    self._tombstones_due = time.monotonic() + 30.0
                continue
            _remove_quietly(path)
            log(f"{info.get('name')}: its copy on {name} deleted (the volume was deleted here while {name} did "
                "not answer)" if result.get("code") is None else
                f"{info.get('name')}: nothing to delete on {name} ({result.get('code')})")
            # A volume made again under that name, whose CREATE that peer refused meanwhile (the name was
            # taken there), is asked again now.
            with self._lock:
                volumes = list(self._volumes.values())
            for vr in volumes:
                vr.retry_behind()
            self.request_catch_up(peer=name)

    def query_copies(self, copies, repl_id, epoch=0, refusals=False, claim=None):
        return query_copies(copies, self.keys, repl_id, self.settings.insecure, self.settings.ack_timeout, epoch,
                            refusals, claim)

    def links(self):
        with self._lock:
            return dict(self._links)


# ---- the sink (replica side) ---------------------------------------------------------------------
class Sink:
    """ROUTER socket applying replication messages to this node's replica volumes."""

    def __init__(self, engine, address, keys, settings, allowed_keys):
        self.engine = engine
        self.catalog = engine.catalog
        self.address = address
        self.keys = keys
        self.settings = settings
        self.allowed = set(allowed_keys)
        self.ctx = None  # created in start(), after nbdkit forks
        self.refused = collections.Counter()  # reason -> count
        self.instance = os.urandom(16)  # this start of the sink (heartbeat answers carry it)
        self.applied = collections.Counter()  # type name -> count
        self.applied_seq = {}  # repl_id -> (epoch, seq) of the last client write (WRITE, TRIM, ZERO) applied here
        self._persisted_seq = {}  # repl_id -> the applied seq last made durable in the catalog (at a FLUSH)
        self._floor = {}  # repl_id -> (epoch, seq) of the primary's last session CREATE: older writes refused
        self._applied_fds = {}  # repl_id -> fd of the volume's applied file (DataDir.applied_path)
        self._chunk_lists = {}  # repl_id -> (monotonic time, sorted chunk indexes): CHUNKS pages from one listing
        self._claims = {}  # repl_id -> (epoch, token) of the promotion that announced that epoch here first
        self._log_window, self._log_lines, self._log_skipped = 0.0, 0, 0  # refusal lines (sink thread only)
        self._claims_lock = threading.Lock()  # the sink thread and a promotion here (control thread)
        self._state_seq = {}  # repl_id -> (epoch, seq) of what last set its sync state (a CREATE, a refused write)
        self._empty_since = {}  # repl_id -> (epoch, seq) of the last CREATE answered `created` while empty
        self._volumes = {}  # repl_id -> (Volume opened for the sink, the epoch last checked in the catalog)
        self._cache_lock = threading.Lock()  # the sink thread fills the cache; promotion (drop) empties it
        self._uncached = {}  # repl_id promoted here -> its new epoch: not cached while messages are at or below it
        self._release_after = []  # volumes opened for one message only
        self._auth = None
        self._sock = None
        self._thread = None

    def _mark_lost_copies(self):
        """Replica copies whose data went while this node was down (a wiped volume directory, a replaced
        disk) are marked empty before any primary asks: the next CREATE answers `created` (its primary
        resyncs it fully) and promotion refuses it.  Unmarked, it said in_sync and held zeros.  Not when
        the whole volumes directory is missing (an unmounted disk?): then nothing is marked for good, but
        each such copy still shows empty and promotion refuses it (DataDir.replica_copy_lost)."""
        if not os.path.isdir(self.engine.datadir.volumes_path):
            log(f"sink: {self.engine.datadir.volumes_path} is missing: replica copies not checked")
            return
        for row in self.catalog.volumes():
            if self.engine.datadir.replica_copy_lost(row):
                self.catalog.mark_replica_lost(row["id"])
                log(f"sink: replica {row['name']}: its data is gone (no volume directory though it had applied "
                    f"writes): marked empty until its primary resyncs it fully")

    def start(self):
        self._mark_lost_copies()
        # This node was down (or its server restarted): while it was, a primary whose quorum was lowered
        # (volume set --min-copies 1) may have acknowledged writes it never got.  Until a primary says
        # again that a copy is in sync, promotion refuses it (it cannot be known to hold them).
        self.catalog.mark_replicas_unconfirmed()
        self.ctx = zmq.Context(io_threads=IO_THREADS)  # its own (I/O threads too): stop() can end it alone
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        if not self.settings.insecure:
            from zmq.auth.thread import ThreadAuthenticator

            self._auth = ThreadAuthenticator(self.ctx, log=_NullLog())
            self._auth.start()
            self._auth.configure_curve_callback(domain="blockd", credentials_provider=self)
            sock.curve_server = True
            sock.curve_publickey, sock.curve_secretkey = self.keys
            sock.zap_domain = b"blockd"
        sock.bind(self.address)
        self._sock = sock
        self._thread = threading.Thread(target=self._run, name="blockd-sink", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        """Stop serving and unbind (a server stops by exiting; tests stop sinks)."""
        if self._auth is not None:
            self._auth.stop()
        ctx, self.ctx = self.ctx, None
        if ctx is not None:
            ctx.term()  # the sink thread's receive fails with ETERM; it closes its socket, then term returns
        self._thread.join(10)

    # ZAP credentials provider (zmq.auth callback protocol)
    def callback(self, domain, key):
        text = key.decode() if isinstance(key, bytes) else key
        if text not in self.allowed:
            # A peer added since start: look again (a rare path: only unknown keys get here).
            try:
                self.allowed = {p["public_key"] for p in self.catalog.peers() if p["public_key"]}
            except Exception:
                pass
        if text in self.allowed:
            return True
        self.refused["unknown_key"] += 1
        log(f"sink: refused a connection with unknown CURVE key {text[:8]}...")
        return False

    def _run(self):
        while True:
            try:
                # Frames, not bytes: a WRITE's data is hashed and written from zmq's buffer, never copied.
                frames = self._sock.recv_multipart(copy=False)
            except zmq.ZMQError as exc:
                if exc.errno == zmq.ETERM:
                    self._sock.close(linger=0)
                    return
                continue
            if len(frames) < 2:
                self.refused["malformed"] += 1
                continue
            ident, body = frames[0].bytes, frames[1:]
            try:
                msg = rp.decode([f.buffer for f in body])
            except rp.ProtocolError as exc:
                self.refused["malformed"] += 1
                self._log_refusal(f"sink: refused a malformed message: {exc}")
                self._reply(ident, rp.json_message(rp.NACK, {"error": str(exc), "code": "malformed"}))
                continue
            try:
                reply = self._handle(msg)
            except rp.ProtocolError as exc:
                self.refused["malformed"] += 1
                reply = self._nack(msg, str(exc), "malformed")
            except _Refuse as exc:
                self.refused[exc.code] += 1
                self._log_refusal(f"sink: refused {rp.NAMES[msg.type]} for volume {msg.volume}: {exc}")
                reply = self._nack(msg, str(exc), exc.code, **exc.extra)
            except BlockdError as exc:
                self.refused["error"] += 1
                self._forget(msg.volume)  # look it up again next time (deleted, failed...)
                reply = self._nack(msg, str(exc), "error")
            except Exception as exc:  # a bug: answer, log, keep serving
                self.refused["error"] += 1
                self._log_refusal(f"sink: {rp.NAMES.get(msg.type)}: {type(exc).__name__}: {exc}")
                reply = self._nack(msg, f"internal error: {exc}", "error")
            if reply.type == rp.NACK and msg.type in (rp.WRITE, rp.TRIM, rp.ZERO, rp.RESYNC, rp.RESIZE):
                self._behind(msg, reply)  # (a refused RESIZE: smaller than its primary, it misses what is past)
            while self._release_after:
                try:
                    self.engine.release(self._release_after.pop())
                except Exception as exc:
                    log(f"sink: releasing a volume: {exc}")
            self._reply(ident, reply)

    def _log_refusal(self, text):
        """Refusals are logged, up to REFUSAL_LOG_PER_SECOND lines a second (a flood of garbage must not
        flood the log; every one is counted in the metrics), then one line saying how many were not."""
        now = time.monotonic()
        if now - self._log_window >= 1.0:
            if self._log_skipped:
                log(f"sink: {self._log_skipped} more refusal(s) not logged (see blockd_sink_refused_total)")
            self._log_window, self._log_lines, self._log_skipped = now, 0, 0
        if self._log_lines < REFUSAL_LOG_PER_SECOND:
            self._log_lines += 1
            log(text)
        else:
            self._log_skipped += 1

    def _behind(self, msg, reply):
        """This copy refused a write it was sent: it lacks it (not for a sender that is stale or a volume
        that is not a replica here: those change nothing here)."""
        code = _nack_code(reply)
        if code in ("stale_epoch", "unknown_volume", "not_replica", "malformed", "unknown_epoch"):
            return
        try:
            self.catalog.mark_replica_behind(msg.volume)
            if msg.type != rp.RESIZE:  # (sent outside the volume's seqs: only its primary's CREATEs order it)
                self._state_seq[msg.volume] = max(self._state_seq.get(msg.volume, (0, 0)), (msg.epoch, msg.seq))
        except Exception as exc:
            log(f"sink: recording that volume {msg.volume} lacks a refused write: {exc}")

    def _reply(self, ident, msg):
        try:
            self._sock.send_multipart([ident, *rp.encode(msg)], copy=False)
        except zmq.ZMQError:
            pass

    def _nack(self, msg, error, code, **extra):
        return rp.json_message(rp.NACK, {"error": error, "code": code, **extra}, volume=msg.volume, seq=msg.seq,
                               epoch=msg.epoch)

    def _ack(self, msg, sums=b"", data=b""):
        return rp.Message(rp.ACK, volume=msg.volume, epoch=msg.epoch, seq=msg.seq, offset=msg.offset,
                          length=len(data), sums=sums, data=data)

    def _forget(self, repl_id):
        """Drop a cached replica and the engine reference it held (the next message looks it up again)."""
        self._close_applied(repl_id)
        self._chunk_lists.pop(repl_id, None)
        with self._cache_lock:
            cached = self._volumes.pop(repl_id, None)
        if cached is not None:
            self.engine.release(cached[0])

    def _volume(self, msg):
        # The catalog is read only when a volume is first seen or a message carries another epoch.
        # Every path that changes a replica's row drops the cached entry first: CREATE (epoch, role,
        # size), DELETE, errors, and promotion here (drop(), which also stops caching the volume).
        cached = self._volumes.get(msg.volume)
        if cached is not None and cached[1] == msg.epoch:
            return cached[0]
        row = self.catalog.volume_by_repl_id(msg.volume)
        if row is None:
            raise _Refuse(f"no replica with replication id {msg.volume} here", "unknown_volume")
        if msg.epoch < row["epoch"]:
            raise _Stale(row)
        if msg.epoch > row["epoch"] and msg.type not in (rp.RESIZE, rp.DELETE):
            # A new primary's first message on a link is its CREATE (a promotion's is a STATE): a write at an
            # epoch never announced here is refused, and changes nothing (no epoch taken, no fence).
            raise _Refuse(f"epoch {msg.epoch} is newer than this copy's {row['epoch']}: its primary's CREATE "
                          "comes first", "unknown_epoch")
        if row["role"] != "replica":
            if msg.epoch == row["epoch"]:
                raise _Refuse(f"volume {row['name']} is a primary here (epoch {row['epoch']})", "not_replica")
            self._supersede(row, msg.epoch)  # a newer primary writes to us: this copy is its replica now
            row = self.catalog.volume_by_repl_id(msg.volume)
        if msg.epoch > row["epoch"]:
            self.catalog.set_epoch_role(row["id"], msg.epoch, "replica")
        if cached is not None:
            volume = cached[0]
        else:
            volume = self.engine.open(row["name"], replica=True)
        with self._cache_lock:
            if msg.epoch <= self._uncached.get(msg.volume, -1):
                # Being promoted here (drop() ran after our catalog read): apply this one message,
                # as if it had come a moment earlier, but hold no reference past it.
                self._volumes.pop(msg.volume, None)
                keep = False
            else:
                self._uncached.pop(msg.volume, None)  # superseded since (a newer epoch): a replica again
                self._volumes[msg.volume] = (volume, msg.epoch)
                keep = True
        if not keep:
            self._release_after.append(volume)
        return volume

    def _handle(self, msg):
        t = msg.type
        if t == rp.HEARTBEAT:
            return self._ack(msg, data=self.instance)  # a primary that sees another one knows we restarted
        if t == rp.CREATE:
            return self._create(msg)
        if t == rp.STATE:
            row = self.catalog.volume_by_repl_id(msg.volume)
            if row is None:
                raise _Refuse(f"no copy with replication id {msg.volume} here", "unknown_volume")
            try:
                token = msg.json().get("claim") if msg.data else None
            except rp.ProtocolError:
                token = None
            if msg.epoch > 0 and isinstance(token, str) and not self.claim(msg.volume, msg.epoch, token):
                # Another promotion announced this epoch here first (or a newer one): not taken for this one,
                # which must not count this copy (two primaries at one epoch would never fence each other).
                return self._state(msg, row, claimed_by_another=True)
            if msg.epoch > row["epoch"]:
                # A copy being promoted announces its new epoch: from now on the old primary's writes are
                # refused here as stale (it is fenced at its next request), and this copy, a replica,
                # waits for the new primary to say how in sync it is.
                if row["role"] != "replica":
                    self._supersede(row, msg.epoch)
                self.catalog.adopt_epoch(row["id"], msg.epoch)
                self._forget(msg.volume)  # the cached entry holds the old epoch
                row = self.catalog.volume_by_repl_id(msg.volume)
            return self._state(msg, row)
        if t == rp.DELETE:
            row = self.catalog.volume_by_repl_id(msg.volume)
            if row is None:
                raise _Refuse(f"no copy with replication id {msg.volume} here", "unknown_volume")
            if row["role"] != "replica":
                # Promoted here (even with --force at a lower epoch): never deleted, nor fenced, by a DELETE.
                raise _Refuse(f"volume {row['name']} is a primary here (epoch {row['epoch']}): not deleted",
                              "not_replica")
            if msg.epoch < row["epoch"]:
                raise _Stale(row)
        volume = self._volume(msg)
        if t == rp.WRITE or t == rp.RESYNC:
            if msg.offset + msg.length > volume.size:
                raise _Refuse(f"write past the end ({volume.size} bytes)", "range")
            data = np.frombuffer(msg.data, dtype=np.uint8)
            hashed = block_hashes(data)  # verified here, then reused by the write: hashed once
            if hashed[0].tobytes() != msg.sums:
                raise _Refuse("checksum mismatch on receipt: refused corrupt data", "corrupt")
            self._check_floor(msg)
            volume.write(data, msg.offset, bool(msg.flags & rp.FUA), hashed=hashed)
        elif t == rp.RESIZE:
            if msg.offset > volume.size:  # grow only (a smaller size is an old resize arriving late)
                try:
                    self.engine.grow_replica(volume.name, msg.offset)
                except BlockdError as exc:
                    raise _Refuse(f"resize: {exc}", "resize") from None
        elif t == rp.TRIM:
            self._check_floor(msg)
            volume.trim(msg.offset, msg.length, bool(msg.flags & rp.FUA))
        elif t == rp.ZERO:
            self._check_floor(msg)
            volume.zero(msg.offset, msg.length, bool(msg.flags & rp.FUA))
        elif t == rp.FLUSH:
            volume.flush()
            applied = self.applied_seq.get(msg.volume, (0, 0))
            if applied > self._persisted_seq.get(msg.volume, (0, 0)):
                # Durable with the data it stands for: what promotion compares after a restart here.
                self.catalog.set_applied(volume.volume_id, applied)
                self._persisted_seq[msg.volume] = applied
        elif t == rp.DELETE:
            self._close_applied(msg.volume)
            self.applied_seq.pop(msg.volume, None)
            with self._cache_lock:
                cached = self._volumes.pop(msg.volume, None)
            if cached is not None:
                self.engine.release(volume)
            self.engine.delete(volume.name, force=True)
        elif t == rp.CHUNKS:
            # One directory listing serves every page (and a retry, if listing a huge volume took longer
            # than the primary waited): kept for a minute.
            listed = self._chunk_lists.get(msg.volume)
            if listed is None or listed[1] != msg.epoch or time.monotonic() - listed[0] > 60:
                store = volume.store
                held = np.asarray(sorted(set(store.chunk_indexes()) | set(store.intent.chunks)), dtype="<u8")
                listed = self._chunk_lists[msg.volume] = (time.monotonic(), msg.epoch, held)
            held = listed[2]
            first = int(np.searchsorted(held, msg.offset))
            count = max(0, min(msg.length, rp.MAX_DATA // 8))
            if first + count >= len(held):
                self._chunk_lists.pop(msg.volume, None)  # the last page
            return self._ack(msg, sums=held[first:first + count].tobytes())
        elif t == rp.SUMS:
            if msg.offset + msg.length > volume.size:
                raise _Refuse("range past the end", "range")
            return self._ack(msg, sums=volume.block_sums(msg.offset, msg.length).tobytes())
        elif t == rp.READ:
            data = np.empty(msg.length, dtype=np.uint8)
            volume.read(data, msg.offset)
            return self._ack(msg, sums=volume.block_sums(msg.offset, msg.length).tobytes(), data=data.tobytes())
        else:
            raise _Refuse(f"{rp.NAMES[t]} is not accepted by a sink", "unexpected")
        self.applied[rp.NAMES[t]] += 1
        if t == rp.WRITE or t == rp.TRIM or t == rp.ZERO:
            # Client writes only: a RESYNC carries a new seq but brings a copy up to date, not ahead.
            self._note_applied(volume.volume_id, volume.name, msg.volume, (msg.epoch, msg.seq))
        return self._ack(msg)

    def _state(self, msg, row, **extra):
        """The answer to a STATE: what promotion decides on (epoch, role, size, sync state, last applied)."""
        applied = self.last_applied(msg.volume, row)
        return rp.json_message(rp.ACK, {"epoch": row["epoch"], "role": row["role"], "size": row["size"],
                                        "sync_state": self.engine.datadir.replica_sync_state(row),
                                        "applied_epoch": applied[0], "applied_seq": applied[1], **extra},
                               volume=msg.volume, seq=msg.seq, epoch=msg.epoch)

    def claim(self, repl_id, epoch, token):
        """A promotion (``token``, one per promotion) announces ``epoch`` for a volume here, or takes it
        here (this node's own promotion, before it adopts the epoch): False if another promotion claimed
        that epoch or a newer one first.  Two copies promoted at once both compute the same next epoch;
        without this, each could count the other (and a third copy that heard both) as holding its epoch.
        Kept in memory: a sink restarted between two such announcements takes the second too."""
        with self._claims_lock:
            held = self._claims.get(repl_id)
            if held is not None and (held[0] > epoch or (held[0] == epoch and held[1] != token)):
                return False
            self._claims[repl_id] = (epoch, token)
            return True

    def _note_applied(self, volume_id, name, repl_id, pos):
        """Remember the last client write applied, (epoch, seq), in memory and in the volume's applied
        file (a restart after kill -9 keeps the page cache, so the data, and must keep this with it)."""
        if repl_id not in self.applied_seq:
            row = self.catalog.volume_by_repl_id(repl_id)  # once per volume per process
            self.applied_seq[repl_id] = self.last_applied(repl_id, row) if row is not None else (0, 0)
        if pos <= self.applied_seq[repl_id]:
            return
        try:
            fd = self._applied_fds.get(repl_id)
            if fd is None:
                path = self.engine.datadir.applied_path(volume_id)
                folder = os.path.dirname(path)
                if not os.path.isdir(folder):  # a trim first, or nothing written: no chunk yet
                    # Durably: a volume directory missing after a power cut, with a position in the
                    # catalog, would read as a lost copy (DataDir.replica_copy_lost).
                    os.makedirs(folder, mode=0o700, exist_ok=True)
                    fsync_dir(os.path.dirname(folder))
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
                self._applied_fds[repl_id] = fd
            os.pwrite(fd, pos[0].to_bytes(8, "little") + pos[1].to_bytes(8, "little"), 0)
            self.applied_seq[repl_id] = pos  # only once recorded: a flush makes it durable in the catalog
        except OSError as exc:
            # Only promotion reads it: an older value makes this copy look behind (refused, not wrong).
            self.refused["applied_file"] += 1
            if self.refused["applied_file"] == 1:
                log(f"sink: {name}: recording the last applied write: {exc}")

    def _close_applied(self, repl_id):
        fd = self._applied_fds.pop(repl_id, None)
        if fd is not None:
            os.close(fd)

    def _check_floor(self, msg):
        floor = self._floor.get(msg.volume)
        if floor is not None and floor[0] == msg.epoch and msg.seq < floor[1]:
            raise _Refuse(f"{rp.NAMES[msg.type]} seq {msg.seq} was sent before the primary's session {floor[1]} began "
                          "(it counts as missed there): not applied over newer data", "stale_seq")

    def last_applied(self, repl_id, row):
        """(epoch, seq) of the last client write this copy applied: in this process, or as its durable
        records have it."""
        return max(self.applied_seq.get(repl_id, (0, 0)), self.engine.datadir.replica_applied(row))

    def _supersede(self, row, epoch):
        """A message at a newer epoch for a volume that is the primary here: a copy was promoted elsewhere.
        This one is fenced (never writable again here) and becomes a replica the new primary resyncs."""
        manager = self.engine.replication
        if manager is not None:
            manager.supersede(row, epoch, "a copy promoted elsewhere")
        elif self.engine.fence(row["id"], epoch):
            log(f"{row['name']}: a copy promoted elsewhere holds epoch {epoch} > {row['epoch']}: fenced, now a replica")

    def _create(self, msg):
        info = msg.json()
        _check_create(info)
        limits = _valid_limits(info)
        row = self.catalog.volume_by_repl_id(msg.volume)
        created = False
        if row is None:
            pool = self.catalog.pool()
            if info["chunk_size"] != pool["chunk_size"]:
                raise _Refuse(f"chunk size {info['chunk_size']} differs from this pool's {pool['chunk_size']}",
                              "chunk_size")
            try:
                row = self.catalog.create_replica(info["name"], info["size"], info["type"], msg.volume,
                                                  msg.epoch, info.get("min_copies", 1),
                                                  info.get("iops") if limits else None,
                                                  info.get("throughput") if limits else None)
            except (BadInput, Refused, NotFound) as exc:
                raise _Refuse(str(exc), "create") from None
            created = True
        else:
            if msg.epoch < row["epoch"]:
                raise _Stale(row)
            # The row may change below (epoch, role, size): the next message looks it up again, so a
            # superseded primary's message at the old epoch meets the catalog, not a stale cache.
            self._forget(msg.volume)
            if row["role"] == "primary":
                if msg.epoch == row["epoch"]:
                    raise _Refuse(f"volume {row['name']} is a primary here at the same epoch {row['epoch']}",
                                  "not_replica")
                # A newer primary exists: this node's copy was superseded (fencing).
                self._supersede(row, msg.epoch)
                row = self.catalog.volume_by_repl_id(msg.volume)
            elif msg.epoch > row["epoch"]:
                self.catalog.set_epoch_role(row["id"], msg.epoch, "replica")
            if limits and (info["type"], info["iops"], info.get("throughput")) != (
                    row["type"], row["iops"], row["throughput"]):
                # Modified on its primary (Elastic Volumes): kept here for when this copy is promoted.  Before
                # a growth: the new size may be one only the new type allows.
                self.catalog.set_replica_limits(row["id"], info["type"], info["iops"], info.get("throughput"))
            if info["size"] > row["size"]:
                try:
                    self.catalog.resize_volume(row["name"], info["size"])
                except BlockdError as exc:
                    self.catalog.mark_replica_behind(msg.volume)  # smaller than its primary: not a full copy
                    raise _Refuse(f"resize: {exc}", "resize") from None
        import json as _json

        state = info.get("state")
        if created:
            # A new copy here: nothing this process remembers of an earlier one with this id counts.
            self._close_applied(msg.volume)
            for kept in (self.applied_seq, self._persisted_seq, self._chunk_lists, self._state_seq,
                         self._empty_since):
                kept.pop(msg.volume, None)
            if info.get("seeded"):
                state = rp.EMPTY  # the primary had a copy here: this one is empty until fully resynced
        elif row["sync_state"] == rp.EMPTY and not self._filled(msg, info, state):
            # Still empty: said again (the answer that said so may have been lost) until the primary's
            # full resync ends and it says in sync.
            state, created = rp.EMPTY, True
        if created and state == rp.EMPTY:
            self._empty_since[msg.volume] = (msg.epoch, msg.seq)
        elif (msg.epoch, msg.seq) < self._state_seq.get(msg.volume, (0, 0)):
            state = row["sync_state"]  # an older CREATE than what last set it (a write refused here since)
        if (msg.epoch, msg.seq) > self._state_seq.get(msg.volume, (0, 0)):
            self._state_seq[msg.volume] = (msg.epoch, msg.seq)
            if state == rp.IN_SYNC and isinstance(info.get("applied_through"), int):
                # In sync, by its primary's count, with every request up to that seq (a resync included,
                # which carried no client seqs): as far along as a copy that applied them one by one.
                self._note_applied(row["id"], row["name"], msg.volume, (msg.epoch, info["applied_through"]))
        self.catalog.set_replica_view(row["id"], state, int(info.get("min_copies", 1)),
                                      _json.dumps(info.get("copies", [])))
        if msg.flags & rp.SESSION:
            # Set, not raised: seqs come from the primary's clock, which a new process (or a new
            # primary elsewhere) may have behind the last one.
            self._floor[msg.volume] = (msg.epoch, msg.seq)
        applied = self.last_applied(msg.volume, row)
        reply = {"created": created, "epoch": msg.epoch, "role": "replica", "applied_epoch": applied[0],
                 "applied_seq": applied[1]}
        return rp.json_message(rp.ACK, reply, volume=msg.volume, seq=msg.seq, epoch=msg.epoch)

    def _filled(self, msg, info, state):
        """Whether a CREATE for a copy that is empty here says its primary's full resync has ended: it
        says in sync, is not a session CREATE (an open or a reconnect says in sync from a primary that
        does not know yet: a copy lost while this node was down), and every request up to the last
        CREATE answered `created` was answered before it was sent (``applied_through``): a CREATE sent
        before the primary read that answer (a resize, a new quorum) does not count."""
        since = self._empty_since.get(msg.volume)
        through = info.get("applied_through")
        return (state == rp.IN_SYNC and not msg.flags & rp.SESSION and since is not None
                and isinstance(through, int) and (msg.epoch, through) >= since)

    def drop(self, repl_id, epoch):
        """Forget an open replica (it is being promoted here, to ``epoch``) and cache it no more until a
        newer epoch supersedes it; returns its Volume if it was open (the caller releases it)."""
        with self._cache_lock:
            self._uncached[repl_id] = epoch
            cached = self._volumes.pop(repl_id, None)
        return cached[0] if cached is not None else None

    def status(self):
        return {"address": self.address, "refused": dict(self.refused), "applied": dict(self.applied),
                "volumes": len(self._volumes)}


def query_copies(copies, keys, repl_id, insecure=False, timeout=2.0, epoch=0, refusals=False, claim=None):
    """Ask each copy's sink for its state of a volume: {address: {"epoch", "role", "sync_state",
    "applied_seq"} or None if it does not answer (with ``refusals``, a refusal is {"refused": code})}.
    Used by promotion to find the most up-to-date survivor, and, with ``epoch``, to announce a
    promotion's new epoch: a copy below it takes it (a primary there is fenced), so the old primary's
    writes are refused there from then on; ``claim`` (the promotion's token) lets a copy that heard
    another promotion announce the same epoch first answer ``claimed_by_another``."""
    msg = rp.json_message(rp.STATE, {"claim": claim} if claim else {}, volume=repl_id, seq=1, epoch=epoch)
    out = {}
    for address, reply in ask_copies(copies, keys, msg, insecure, timeout).items():
        try:
            if reply is None:
                out[address] = None
            elif reply.type == rp.ACK:
                out[address] = reply.json()
            else:
                out[address] = {"refused": _nack_code(reply)} if refusals else None
        except rp.ProtocolError:
            out[address] = None
    return out


def ask_copies(copies, keys, msg, insecure=False, timeout=2.0):
    """Send ``msg`` to each copy's sink on a socket of its own: {address: its reply (a Message) or None
    if it does not answer within ``timeout``}."""
    ctx = _context()
    out = {}
    for copy in copies:
        address = copy.get("address")
        if not address:
            continue
        out[address] = None
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            if not insecure:
                if not copy.get("key") or keys is None:
                    continue
                curve_client(sock, keys, copy["key"])
            sock.connect(address)
            sock.send_multipart(rp.encode(msg))
            if sock.poll(int(timeout * 1000)):
                out[address] = rp.decode(sock.recv_multipart())
        except (zmq.ZMQError, rp.ProtocolError):
            pass  # no usable answer: None, as set above
        finally:
            sock.close(linger=0)
    return out


def _copy(replica):
    """A replica (a catalog volume_replicas row) as ask_copies and query_copies take a copy."""
    return {"address": replica["address"], "key": replica["public_key"], "name": replica["name"],
            "seeded": replica["seeded"]}


def _remove_quietly(path):
    try:
        os.unlink(path)
    except OSError:
        pass


def _check_create(info):
    """A CREATE's payload, checked before anything here changes: ProtocolError (refused as malformed)."""
    from .catalog import check_qos
    from .voltypes import VOLUME_TYPES, check

    def whole(key, low=0):
        value = info.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise rp.ProtocolError(f"CREATE: {key} must be a whole number of at least {low}, not {value!r}")

    for key in ("name", "size", "type", "chunk_size"):
        if key not in info:
            raise rp.ProtocolError(f"CREATE: missing {key}")
    if not isinstance(info["name"], str):
        raise rp.ProtocolError("CREATE: name must be a string")
    whole("size", 1)
    whole("chunk_size", 1)
    if "min_copies" in info:
        whole("min_copies", 1)
        if info["min_copies"] > 64:
            raise rp.ProtocolError(f"CREATE: min_copies {info['min_copies']} is more copies than a volume has")
    if info.get("state") not in (None, rp.IN_SYNC, rp.OUT_OF_SYNC, rp.RESYNCING):
        raise rp.ProtocolError(f"CREATE: unknown state {info.get('state')!r}")
    if info["type"] not in VOLUME_TYPES:
        raise rp.ProtocolError(f"CREATE: unknown volume type {info['type']!r}")
    copies = info.get("copies", [])
    if not isinstance(copies, list) or not all(isinstance(c, dict) for c in copies):
        raise rp.ProtocolError("CREATE: copies must be a list of objects")
    if "iops" in info:  # (a primary from before limits were sent says nothing of them: kept as they are)
        try:
            check_qos(info["iops"], info.get("throughput"))
        except BlockdError as exc:
            raise rp.ProtocolError(f"CREATE: {exc}") from None


def _valid_limits(info):
    """Whether a CREATE's type, size, IOPS and throughput go together (a copy made before copies kept
    their IOPS, promoted, says io2 with none): only then are they stored; the CREATE is taken either way."""
    from .voltypes import check

    if "iops" not in info:
        return False
    try:
        check(info["type"], info["size"], info["iops"], info.get("throughput"))
    except BlockdError:
        return False
    return True


class _Refuse(Exception):
    def __init__(self, message, code, **extra):
        super().__init__(message)
        self.code = code
        self.extra = extra


class _Stale(_Refuse):
    def __init__(self, row):
        super().__init__(f"stale epoch: this copy is at epoch {row['epoch']} ({row['role']})", "stale_epoch",
                         epoch=row["epoch"], role=row["role"])


class _NullLog:
    def debug(self, *a, **k):
        pass

    info = warning = error = exception = debug
