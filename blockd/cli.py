"""The ``blockd`` command line.

Owns argument parsing, the JSON each ``--json`` prints (docs/CLI.md), and the
translation of errors into one line on stderr plus an exit code: 0 success,
2 bad input, 1 refused or failed.  Every command accepts ``--data-dir DIR``
(env BLOCKD_DATA_DIR) before or after the subcommand.

Two kinds of commands: catalog-only ones (volume create/list/show, capacity,
provision) edit SQLite and work whether or not a server runs; live ones
(volume resize/delete, scrub) go through the running server's control
socket, or, with no server, run offline under the data-dir lock.
"""

import argparse
import json
import os
import re
import sqlite3
import sys
import time

from . import control, voltypes
from .catalog import Catalog, check_not_a_replica_copy, check_type
from .datadir import DataDir, default_data_dir
from .errors import BadInput, BlockdError, NotFound, Refused
from .sizes import check_name, format_size, parse_size, parse_volume_size


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        # No abbreviations: a script's `--forc` must not mean --force, nor break when a flag is added.
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise BadInput(message)


def _add_data_dir(parser, top=False):
    parser.add_argument(
        "--data-dir",
        default=argparse.SUPPRESS if not top else None,
        help="data directory (default: $BLOCKD_DATA_DIR, else /var/lib/blockd as root, else ~/.local/share/blockd)",
    )


def build_parser():
    parser = _Parser(prog="blockd", description="Thin, checksummed block volumes served over NBD.")
    _add_data_dir(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("serve", help="serve every volume over NBD (runs nbdkit in the foreground)")
    _add_data_dir(p)
    p.add_argument("--listen", default="127.0.0.1:10809", help="HOST:PORT or unix:PATH (default 127.0.0.1:10809)")
    p.add_argument("--threads", type=int, default=None, help="nbdkit worker threads per connection (default 4: see docs/ARCHITECTURE.md)")
    p.add_argument("--cpu-policy", default=None, metavar="batch|normal",
                   help="Linux scheduling policy of the server's threads (default batch: see docs/CLI.md)")
    p.add_argument("--verbose", action="store_true", help="nbdkit debug output")
    p.add_argument("--metrics", metavar="HOST:PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (off by default; make run uses 127.0.0.1:9810)")
    p.add_argument("--replication-listen", metavar="tcp://HOST:PORT", help="run the replication sink for replicas here")
    p.add_argument("--key-dir", help="node key pair (default $BLOCKD_KEY_DIR, /etc/blockd/keys as root, ~/.config/blockd/keys)")
    p.add_argument("--insecure-replication", action="store_true",
                   help="plain TCP, no CurveZMQ (both sides must say so)")
    p.add_argument("--ack-timeout", type=float, metavar="S", help="a replica missing this deadline is out of sync (default 2)")
    p.add_argument("--write-timeout", type=float, metavar="S",
                   help="a write without min-copies acknowledgements fails with EIO after this (default 30)")
    p.add_argument("--heartbeat", type=float, metavar="S", help="idle heartbeat interval to peers (default 0.5)")
    p.add_argument("--resync-rate", type=float, metavar="MiB/s", help="resync throttle per peer (default 256)")
    p.set_defaults(func=cmd_serve)

    keys = sub.add_parser("keys", help="this node's CurveZMQ key pair (replication identity)")
    _add_data_dir(keys)
    ksub = keys.add_subparsers(dest="keys_command", metavar="ACTION")
    ksub.required = True
    p = ksub.add_parser("generate", help="create the key pair (private key mode 0600)")
    _add_data_dir(p)
    p.add_argument("--key-dir")
    p.add_argument("--force", action="store_true", help="replace an existing key pair")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_keys_generate)
    p = ksub.add_parser("show", help="print the public key (give it to peers)")
    _add_data_dir(p)
    p.add_argument("--key-dir")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_keys_show)

    peer = sub.add_parser("peer", help="nodes that hold replicas")
    _add_data_dir(peer)
    psub2 = peer.add_subparsers(dest="peer_command", metavar="ACTION")
    psub2.required = True
    p = psub2.add_parser("add", help="record a peer: its name, replication address and public key")
    _add_data_dir(p)
    p.add_argument("name")
    p.add_argument("address", metavar="tcp://HOST:PORT")
    p.add_argument("--public-key", help="the peer's `blockd keys show` (omit only for --insecure-replication)")
    p.add_argument("--key-dir", help="this node's key dir (default: $BLOCKD_KEY_DIR, else /etc/blockd/keys as root): "
                                     "a peer with this node's own key is refused")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_peer_add)
    p = psub2.add_parser("list", help="list peers")
    _add_data_dir(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_peer_list)
    p = psub2.add_parser("remove", help="forget a peer that holds no copies")
    _add_data_dir(p)
    p.add_argument("name")
    p.set_defaults(func=cmd_peer_remove)

    p = sub.add_parser("verify", help="compare every block's checksum with every replica's (exit 1 on differences)")
    _add_data_dir(p)
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("status", help="one screen: attached volumes, IOPS and throughput now, capacity, QoS")
    _add_data_dir(p)
    p.add_argument("--json", action="store_true")
    p.add_argument("--metrics-url", help="scrape this instead of the running server's --metrics endpoint")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between the two scrapes rates come from")
    p.set_defaults(func=cmd_status)

    vol = sub.add_parser("volume", help="create, list, show, resize and delete volumes")
    _add_data_dir(vol)
    vsub = vol.add_subparsers(dest="volume_command", metavar="ACTION")
    vsub.required = True

    p = vsub.add_parser("create", help="provision a thin volume (writes one catalog row)")
    _add_data_dir(p)
    p.add_argument("name")
    p.add_argument("--size", required=True, help="e.g. 8GiB, 16T, 500GB, 1073741824")
    p.add_argument("--type", default="raw", help="raw (default: unthrottled), gp3, gp2, io2, io1, st1 or sc1")
    p.add_argument("--iops", type=_positive_int, help="provisioned IOPS (gp3, io1, io2; a cap for raw)")
    p.add_argument("--throughput", type=_positive_int, metavar="MiB/s", help="provisioned MiB/s (gp3; a cap for raw)")
    p.add_argument("--initial-credits", metavar="N|P%", help="start gp2/st1/sc1 with this burst balance (default full)")
    p.add_argument("--replica", action="append", default=[], metavar="PEER", help="a peer holding a copy (repeat)")
    p.add_argument("--min-copies", type=_positive_int, help="copies a write needs, this one included (default 2 with replicas)")
    p.add_argument("--exist-ok", action="store_true", help="succeed if a volume of this name, size and type exists")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_volume_create)

    p = vsub.add_parser("list", help="list volumes")
    _add_data_dir(p)
    p.add_argument("--json", action="store_true", help="JSON array of volume objects (docs/CLI.md)")
    p.add_argument("--type", help="only volumes of this type")
    p.add_argument("--limit", type=_positive_int, help="at most N volumes (by name)")
    p.set_defaults(func=cmd_volume_list)

    p = vsub.add_parser("show", help="show one volume (with its attachment, if a server runs)")
    _add_data_dir(p)
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_volume_show)

    p = vsub.add_parser("resize", help="grow a volume (online: new connections see the new size)")
    _add_data_dir(p)
    p.add_argument("name")
    p.add_argument("--size", required=True, help="the new size; shrinking is refused")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_volume_resize)

    p = vsub.add_parser("delete", help="delete a volume and free its chunks (refused while attached)")
    _add_data_dir(p)
    p.add_argument("name")
    p.add_argument("--force", action="store_true", help="delete even while attached: its connections get EIO")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_volume_delete)

    p = vsub.add_parser("modify", help="Elastic Volumes: change type, size, IOPS or throughput in place")
    _add_data_dir(p)
    p.add_argument("name")
    p.add_argument("--type", help="new type")
    p.add_argument("--size", help="new size (grow only)")
    p.add_argument("--iops", type=_positive_int, help="new provisioned IOPS")
    p.add_argument("--throughput", type=_positive_int, metavar="MiB/s", help="new provisioned MiB/s")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_volume_modify)

    p = vsub.add_parser("promote", help="make this node's replica the primary (failover), with a new epoch")
    _add_data_dir(p)
    p.add_argument("name")
    p.add_argument("--force", action="store_true",
                   help="promote a copy that may lack acknowledged writes (reports how far behind it may be)")
    p.add_argument("--key-dir", help="this node's key dir (to tell itself apart from the other copies)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_volume_promote)

    p = vsub.add_parser("set", help="change a volume setting (--min-copies)")
    _add_data_dir(p)
    p.add_argument("name")
    p.add_argument("--min-copies", type=_positive_int, required=True,
                   help="copies a write needs; 1 is the explicit choice to continue on one copy")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_volume_set)

    p = vsub.add_parser("set-credits", help="set a gp2/st1/sc1 volume's burst balance (rehearsals)")
    _add_data_dir(p)
    p.add_argument("name")
    p.add_argument("credits", metavar="N|P%", help="I/O credits (gp2), bytes (st1/sc1), or a percentage")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_volume_set_credits)

    pool = sub.add_parser("pool", help="pool settings (modification cooldown)")
    _add_data_dir(pool)
    psub = pool.add_subparsers(dest="pool_command", metavar="ACTION")
    psub.required = True
    p = psub.add_parser("show", help="pool settings")
    _add_data_dir(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_pool_show)
    p = psub.add_parser("set", help="change pool settings")
    _add_data_dir(p)
    p.add_argument("--modify-cooldown", metavar="DURATION", required=True,
                   help="time between modifications of a volume, e.g. 6h (default), 10m, 30s, 0")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_pool_set)

    cap = sub.add_parser("capacity", help="the pool's logical limit, provisioned and physical capacity")
    _add_data_dir(cap)
    csub = cap.add_subparsers(dest="capacity_command", metavar="ACTION")
    csub.required = True
    p = csub.add_parser("show", help="logical limit, provisioned, physical size and use, overcommit, headroom")
    _add_data_dir(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_capacity_show)
    p = csub.add_parser("add", help="raise the logical limit by SIZE (e.g. 241PiB)")
    _add_data_dir(p)
    p.add_argument("size")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_capacity_add)
    p = csub.add_parser("set", help="set the logical limit to SIZE ('unlimited' removes it)")
    _add_data_dir(p)
    p.add_argument("size")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_capacity_set)

    p = sub.add_parser("provision", help="apply an event plan (TOML): capacity and volumes, all or nothing")
    _add_data_dir(p)
    p.add_argument("plan", help="plan file, e.g. tools/plans/prime-day-2020.toml")
    p.add_argument("--dry-run", action="store_true", help="print exactly what would happen; change nothing")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_provision)

    p = sub.add_parser("scrub", help="verify every allocated block of a volume (online: flushes first)")
    _add_data_dir(p)
    p.add_argument("name")
    p.add_argument("--repair", action="store_true", help="rewrite corrupt blocks from an in-sync replica")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_scrub)
    return parser


def _positive_int(text):
    # ArgumentTypeError: argparse names the flag ("argument --min-copies: invalid number '0': ...").
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}: must be positive")
    return value


def _datadir(args):
    return DataDir(args.data_dir or default_data_dir())


def _volume_json(row):
    return {
        "name": row["name"],
        "id": row["id"],
        "size": row["size"],
        "type": row["type"],
        "iops": row["iops"],
        "throughput": row["throughput"],
        "role": row["role"],
        "epoch": row["epoch"],
        "created_at": row["created_at"],
    }


def _print(obj):
    print(json.dumps(obj))


# ---- commands ----------------------------------------------------------------
def cmd_serve(args):
    from . import server

    threads = args.threads if args.threads is not None else server.DEFAULT_THREADS
    replication = {
        "replication_listen": args.replication_listen,
        "key_dir": args.key_dir,
        "insecure_replication": "1" if args.insecure_replication else None,
        "ack_timeout": args.ack_timeout,
        "write_timeout": args.write_timeout,
        "heartbeat": args.heartbeat,
        "resync_mibps": args.resync_rate,
    }
    for key in ("ack_timeout", "write_timeout", "heartbeat", "resync_mibps"):
        if replication[key] is not None and not replication[key] > 0:
            raise BadInput(f"invalid --{key.replace('_', '-').replace('resync-mibps', 'resync-rate')}: must be positive")
    return server.serve(_datadir(args), args.listen, threads, args.verbose, metrics_text=args.metrics,
                        replication=replication, cpu_policy=args.cpu_policy or server.DEFAULT_CPU_POLICY)


def cmd_volume_create(args):
    check_name(args.name)
    size = parse_volume_size(args.size)
    check_type(args.type)
    catalog = _datadir(args).catalog()
    try:
        existing = catalog.find_volume(args.name)
        if existing and args.exist_ok:
            wanted = (size, args.type, args.iops, args.throughput)
            if (existing["size"], existing["type"], existing["iops"], existing["throughput"]) != wanted:
                raise Refused(
                    f"volume {args.name} exists with size {existing['size']} and type {existing['type']}"
                    f"{_qos_text(existing)}"
                )
            _same_replication(catalog, existing, args)
            row = existing
        else:
            credits = None
            if args.initial_credits is not None:
                voltypes.check(args.type, size, args.iops, args.throughput)
                credits = voltypes.parse_credits(args.initial_credits, args.type, size)
            row = catalog.create_volume(args.name, size, args.type, args.iops, args.throughput, credits,
                                        replicas=args.replica, min_copies=args.min_copies)
    finally:
        catalog.close()
    if args.json:
        _print(_volume_json(row))
    else:
        print(f"{row['name']} {format_size(row['size'])} {row['type']}{_qos_text(row)}")


def _same_replication(catalog, existing, args):
    """--exist-ok: an existing volume matches only with the copies asked for (a script asking for a
    replicated volume must not get an unreplicated one, nor a replica copy held here for a peer)."""
    name = existing["name"]
    if existing["role"] != "primary":
        raise Refused(f"volume {name} exists here as a replica copy for a peer (not a volume of this node)")
    wanted = sorted(args.replica or [])
    have = sorted(p["name"] for p in catalog.volume_replicas(existing["id"])) if existing["repl_id"] else []
    if have != wanted or (args.min_copies is not None and existing["min_copies"] != args.min_copies):
        copies = (f"replicas {', '.join(have)}, min copies {existing['min_copies']}" if have else "no replicas")
        raise Refused(f"volume {name} exists with {copies}")


def _qos_text(row):
    parts = []
    if row["iops"] is not None:
        parts.append(f" iops {row['iops']}")
    if row["throughput"] is not None:
        parts.append(f" throughput {row['throughput']}MiB/s")
    return "".join(parts)


def cmd_volume_list(args):
    datadir = _datadir(args)
    rows = []
    if datadir.exists():
        catalog = datadir.catalog(create=False, readonly=True)
        try:
            rows = catalog.volumes(limit=args.limit, type_=args.type)
        finally:
            catalog.close()
    if args.json:
        _print([_volume_json(r) for r in rows])
        return
    if not rows:
        print("no volumes")
        return
    width = max(len(r["name"]) for r in rows)
    roles = any(r["role"] != "primary" or r["repl_id"] is not None for r in rows)
    out = [f"{'NAME':<{width}}  {'SIZE':>10}  {'TYPE':<4}" + ("  ROLE" if roles else "")]
    for r in rows:
        role = ""
        if roles:
            role = f"  {r['role']}" + (" (replicated)" if r["repl_id"] is not None and r["role"] == "primary" else "")
        out.append(f"{r['name']:<{width}}  {format_size(r['size']):>10}  {r['type']:<4}{role}")
    print("\n".join(out))


def _find(datadir, name):
    check_name(name)
    if not datadir.exists():
        raise NotFound(f"unknown volume {name!r}")
    catalog = datadir.catalog(create=False, readonly=True)
    try:
        return catalog.volume(name)
    finally:
        catalog.close()


def cmd_volume_show(args):
    datadir = _datadir(args)
    row = _find(datadir, args.name)
    info = _volume_json(row)
    info["chunk_size"] = row["chunk_size"]
    info["allocated_bytes"] = datadir.allocated_bytes(row["id"])
    connections = 0
    live = None
    try:
        sock = control.connect_serving(datadir)
    except control.NoServer:
        info["server"] = False
    else:
        info["server"] = True
        connections = control.call(sock, "attached", name=args.name)["connections"]
        live = control.call(control.connect(datadir.path), "qos", name=args.name)
    info["attached"] = connections > 0
    info["connections"] = connections
    info.update(_qos_info(row, live))
    info["replication"] = None
    if row["repl_id"] is not None:
        if info["server"]:
            info["replication"] = control.call(control.connect(datadir.path), "replication", name=args.name)
        else:
            catalog = datadir.catalog(create=False, readonly=True)
            try:
                peers = catalog.volume_replicas(row["id"]) if row["role"] != "replica" else []
            finally:
                catalog.close()
            info["replication"] = {
                "repl_id": row["repl_id"], "epoch": row["epoch"], "min_copies": row["min_copies"], "role": row["role"],
                "fenced": False, "peers": {p["name"]: datadir.closed_peer_status(row["id"], p, "no server")
                                           for p in peers},
            }
            if row["role"] == "replica":
                # What promotion compares: the catalog's (as of the last flush) or the applied file's, later.
                applied = datadir.replica_applied(row)
                info["replication"].update(sync_state=datadir.replica_sync_state(row), copies=len(json.loads(row["copies"] or "[]")),
                                           applied_epoch=applied[0], applied_seq=applied[1])
    if args.json:
        _print(info)
    else:
        _print_show(info)


def _qos_info(row, live):
    """Limits, burst balance and modification: from the server when it answers, else from the catalog."""
    if live is not None:
        out = {
            "limits": live["limits"],
            "burst_balance": live["burst_balance"],
            "credits": live["credits"],
            "modification": live["modification"],
        }
        if "stats" in live:
            out["qos_stats"] = live["stats"]
        return out
    now = time.time()
    restored = voltypes.restored_credits(row, now)
    return {
        "limits": voltypes.limits(*voltypes.effective(row, now)),
        "burst_balance": 100.0 * restored[0] / restored[1] if restored else 100.0,
        "credits": restored[0] if restored else None,
        "modification": voltypes.modification(row, now),
    }


def _print_show(info):
    lim = info["limits"]
    for key in ("name", "id", "size", "type", "iops", "throughput", "role", "epoch", "created_at", "chunk_size",
                "allocated_bytes", "server", "attached", "connections"):
        print(f"{key}: {info[key]}")
    if lim["iops"] is None and lim["throughput_mibps"] is None:
        print("limits: none (raw, unthrottled)")
    else:
        iops = f"{lim['iops']} IOPS" if lim["iops"] is not None else "unlimited IOPS"
        mibps = f"{lim['throughput_mibps']:g} MiB/s" if lim["throughput_mibps"] is not None else "unlimited MiB/s"
        print(f"limits: {iops}, {mibps}")
        if lim["credits_max"]:
            print(f"baseline: {lim['baseline_iops']} IOPS, {lim['baseline_throughput_mibps']:g} MiB/s")
    unit = {"ops": " I/O credits", "bytes": " bytes"}.get(lim["credit_unit"], "")
    credits = f" ({info['credits']:.0f} of {lim['credits_max']}{unit})" if info["credits"] is not None else ""
    print(f"burst_balance: {info['burst_balance']:.1f}%{credits}")
    repl = info.get("replication")
    if repl:
        as_replica = ""
        if repl["role"] == "replica":
            as_replica = (f", {repl.get('sync_state') or 'sync state not yet known'} (as its primary last said), "
                          f"last applied write epoch {repl.get('applied_epoch', 0)} seq {repl.get('applied_seq', 0)}")
        print(f"replication: {repl['role']}, epoch {repl['epoch']}, min copies {repl['min_copies']}" + as_replica
              + (", FENCED" if repl.get("fenced") else ""))
        for peer, st in repl["peers"].items():
            extra = ""
            left = st.get("resync_remaining_chunks")
            if left and st.get("state") == "resyncing":
                extra = (f", resync {st['resync_done_chunks']}/{st['resync_total_chunks']} chunks "
                         f"({left} left)")
            elif left:
                extra = f", {left} chunk(s) to resync when it answers"
            print(f"  {peer} {st.get('address', '')}: {st['state']}{extra}")
    mod = info["modification"]
    if mod:
        print(f"modification: {mod['state']} ({mod['progress']}%), from {mod['original']}")
    stats = info.get("qos_stats")
    if stats:
        print(f"qos: {stats['requests']} requests, {stats['throttled']} throttled "
              f"({stats['throttled_seconds']:.1f} s waiting)")


def _offline(datadir, edit):
    """``edit(catalog)`` with no server running: under the data-dir lock `_live` took, released after."""
    try:
        catalog = datadir.catalog(create=False)
        try:
            return edit(catalog)
        finally:
            catalog.close()
    finally:
        datadir.unlock()


def _live(datadir, name):
    """("online", sock) with a server running, else ("offline", lock fd): see control.wait_for_server_or_lock."""
    _find(datadir, name)  # unknown volume: refused before waiting for anything
    return control.wait_for_server_or_lock(datadir)


def cmd_volume_resize(args):
    check_name(args.name)
    size = parse_volume_size(args.size)
    datadir = _datadir(args)
    mode, handle = _live(datadir, args.name)
    if mode == "online":
        result = control.call(handle, "resize", name=args.name, size=size)
        old = result["old_size"]
    else:
        old, _ = _offline(datadir, lambda catalog: _resize_offline(catalog, args.name, size))
    if args.json:
        _print({"name": args.name, "old_size": old, "size": size, "online": mode == "online"})
    else:
        print(f"{args.name} {format_size(size)}" + (f" (was {format_size(old)})" if old != size else ""))


def _check_offline_growth(catalog, name, size):
    row = catalog.volume(name)
    check_not_a_replica_copy(row)
    if row["repl_id"] is not None and size is not None and size > row["size"]:
        # Its copies must grow first (a failover must not shrink it): only its running server reaches them.
        raise Refused(f"volume {name} is replicated: resize it while this node's server runs (blockd serve), "
                      "so its copies grow with it")


def _resize_offline(catalog, name, size):
    _check_offline_growth(catalog, name, size)
    return catalog.resize_volume(name, size)


def cmd_volume_delete(args):
    check_name(args.name)
    datadir = _datadir(args)
    if not args.force:
        catalog = datadir.catalog()
        try:
            row = catalog.find_volume(args.name)
        finally:
            catalog.close()
        if row is not None and row["role"] == "replica":
            raise Refused(f"volume {args.name} is a replica held here for its primary: deleting it loses a copy "
                          "(the primary recreates it and resyncs it in full when it next reaches this node); "
                          "--force to delete it anyway")
    mode, handle = _live(datadir, args.name)
    cut = 0
    if mode == "online":
        answer = control.call(handle, "delete", name=args.name, force=args.force)
        cut, pending = answer["connections_cut"], answer.get("copies_pending_delete", [])
    else:
        def delete(catalog):
            # Files go while the lock is still held: no server can open the volume meanwhile.  Its copies
            # on peers are deleted by this node's next server (tombstones), once each peer answers.
            row = catalog.volume(args.name)
            peers = ([p["name"] for p in catalog.volume_replicas(row["id"])]
                     if row["repl_id"] is not None and row["role"] == "primary" else [])
            datadir.remove_volume_files(catalog.delete_volume(args.name))
            datadir.remember_peer_deletes(row, peers)
            return peers

        pending = _offline(datadir, delete)
    if args.json:
        _print({"name": args.name, "deleted": True, "connections_cut": cut, "online": mode == "online",
                "copies_pending_delete": pending})
        return
    if cut:
        print(f"deleted {args.name} (forced: {cut} connection{'s' if cut != 1 else ''} now get EIO)")
    else:
        print(f"deleted {args.name}")
    if pending:
        print(f"its copies on {', '.join(pending)} are deleted when {'they answer' if len(pending) > 1 else 'it answers'} "
              "(a server runs here)")


def cmd_volume_modify(args):
    check_name(args.name)
    changes = {}
    if args.type is not None:
        changes["type"] = check_type(args.type)
    if args.size is not None:
        changes["size"] = parse_volume_size(args.size)
    if args.iops is not None:
        changes["iops"] = args.iops
    if args.throughput is not None:
        changes["throughput"] = args.throughput
    if not changes:
        raise BadInput("volume modify needs at least one of --type, --size, --iops, --throughput")
    datadir = _datadir(args)
    row = _find(datadir, args.name)
    # A new type where the old figures cannot be provisioned falls back to its defaults.
    new_type = changes.get("type", row["type"])
    reset = []
    if new_type != row["type"]:
        spec = voltypes.TYPES.get(new_type, {})
        if "iops" not in changes and row["iops"] is not None and not spec.get("iops_provisionable", True):
            reset.append("iops")
        if "throughput" not in changes and row["throughput"] is not None and not spec.get("throughput_provisionable",
                                                                                            True):
            reset.append("throughput")
    mode, handle = _live(datadir, args.name)
    if mode == "online":
        control.call(handle, "modify", name=args.name, reset=reset, **changes)
    else:
        def edit(catalog):
            _check_offline_growth(catalog, args.name, changes.get("size"))
            return catalog.modify_volume(args.name, reset=tuple(reset), **_kw(changes))

        _offline(datadir, edit)
    row = _find(datadir, args.name)
    info = _volume_json(row)
    info["modification"] = voltypes.modification(row, time.time())
    info["limits"] = voltypes.limits(row["type"], row["size"], row["iops"], row["throughput"])
    if args.json:
        _print(info)
    else:
        lim = info["limits"]
        print(f"{row['name']}: modifying to {format_size(row['size'])} {row['type']}{_qos_text(row)} "
              f"(limits {lim['iops'] or 'unlimited'} IOPS, {lim['throughput_mibps'] or 'unlimited'} MiB/s "
              "from the optimizing phase)")


def _kw(changes):
    """JSON/CLI field names to Python keyword names (``type`` is ``type_``)."""
    return {("type_" if k == "type" else k): v for k, v in changes.items()}


def cmd_volume_set_credits(args):
    datadir = _datadir(args)
    row = _find(datadir, args.name)
    wall = time.time()
    credits = voltypes.parse_credits(args.credits, *voltypes.effective(row, wall)[:2])
    mode, handle = _live(datadir, args.name)
    if mode == "online":
        live = control.call(handle, "set-credits", name=args.name, credits=credits)
        balance = live["burst_balance"]
    else:
        _offline(datadir, lambda catalog: catalog.set_credits(args.name, credits, wall))
        depth = voltypes.restored_credits(row, wall)[1]
        balance = 100.0 * credits / depth
    if args.json:
        _print({"name": args.name, "credits": credits, "burst_balance": balance, "online": mode == "online"})
    else:
        print(f"{args.name}: burst balance {balance:.1f}% ({credits:.0f} credits)")


def _parse_duration(text):
    import re

    t = text.strip().lower()
    if re.fullmatch(r"[0-9]+(\.[0-9]+)?", t):
        return float(t)
    parts = re.findall(r"([0-9]+(?:\.[0-9]+)?)\s*(d|h|m|s)", t)
    if not parts or re.sub(r"([0-9]+(?:\.[0-9]+)?)\s*(d|h|m|s)", "", t).strip():
        raise BadInput(f"invalid duration {text!r}: use e.g. 6h, 10m, 30s, 1h30m or seconds")
    scale = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    return sum(float(n) * scale[u] for n, u in parts)


def _pool_json(pool):
    return {"pool": pool["name"], "chunk_size": pool["chunk_size"], "modify_cooldown_seconds": pool["modify_cooldown"]}


def cmd_pool_show(args):
    datadir = _datadir(args)
    if datadir.exists():
        catalog = datadir.catalog(create=False, readonly=True)
        try:
            info = _pool_json(catalog.pool())
        finally:
            catalog.close()
    else:
        info = {"pool": "default", "chunk_size": None, "modify_cooldown_seconds": voltypes.MODIFY_COOLDOWN_SECONDS}
    if args.json:
        _print(info)
    else:
        for key, value in info.items():
            print(f"{key}: {value}")


def cmd_pool_set(args):
    seconds = _parse_duration(args.modify_cooldown)
    catalog = _datadir(args).catalog()
    try:
        catalog.set_modify_cooldown(seconds)
        info = _pool_json(catalog.pool())
    finally:
        catalog.close()
    if args.json:
        _print(info)
    else:
        print(f"pool {info['pool']}: modify cooldown {seconds:g} s")


def cmd_volume_promote(args):
    datadir = _datadir(args)
    mode, handle = _live(datadir, args.name)
    if mode == "online":
        report = control.call(handle, "promote", name=args.name, force=args.force)
    else:
        from . import keys
        from .engine import Engine

        from .replication import query_copies

        try:
            node_keys = None  # the key pair once: our public key tells us apart from the other copies
            try:
                node_keys = keys.load(_key_dir(args))
            except BlockdError:
                pass
            engine = Engine(datadir)
            try:
                report = engine.promote(args.name, force=args.force,
                                        own_key=node_keys[0].decode() if node_keys else None,
                                        survivors=lambda copies, rid, epoch=0, claim=None: query_copies(
                                            copies, node_keys, rid, epoch=epoch, claim=claim))
            finally:
                engine.close()
        finally:
            datadir.unlock()
    report["online"] = mode == "online"
    if args.json:
        _print(report)
    else:
        for w in report["warnings"]:
            print(f"warning: forced although {w}")
        if report.get("confirmed_only") and not report["forced"]:
            print(f"{args.name}: primary here at epoch {report['epoch']}, already confirmed by a peer: nothing forced")
            return
        if report.get("confirmed_only"):
            print(f"{args.name}: primary here at epoch {report['epoch']}, writable without a peer's confirmation; "
                  f"writes need {report['min_copies']} cop{'y' if report['min_copies'] == 1 else 'ies'}"
                  + (" (`blockd volume set --min-copies 1` to continue alone)" if report['min_copies'] > 1 else ""))
            return
        n = report["min_copies"]
        print(f"{args.name}: primary here at epoch {report['epoch']}; replicas {', '.join(report['replicas']) or 'none'} "
              f"will be compared and resynced; writes need {n} cop{'y' if n == 1 else 'ies'}"
              + (" (`blockd volume set --min-copies 1` to continue alone)" if n > 1 else ""))


def cmd_volume_set(args):
    datadir = _datadir(args)
    mode, handle = _live(datadir, args.name)
    if mode == "online":
        control.call(handle, "set-min-copies", name=args.name, min_copies=args.min_copies)
    else:
        _offline(datadir, lambda catalog: catalog.set_min_copies(args.name, args.min_copies))
    if args.json:
        _print({"name": args.name, "min_copies": args.min_copies, "online": mode == "online"})
    else:
        print(f"{args.name}: writes need {args.min_copies} cop{'y' if args.min_copies == 1 else 'ies'}")


# ---- keys and peers --------------------------------------------------------------------
def _key_dir(args):
    from . import keys

    return args.key_dir or keys.default_key_dir()


def cmd_keys_generate(args):
    from . import keys

    key_dir = _key_dir(args)
    public = keys.generate(key_dir, force=args.force)
    if args.json:
        _print({"key_dir": key_dir, "public_key": public})
    else:
        # stdout is the key alone (PUB=$(blockd keys generate) works); the hint is for a person.
        print(public)
        print(f"blockd: key pair written to {key_dir}; give the public key to peers: "
              f"blockd peer add NAME tcp://HOST:PORT --public-key='{public}'", file=sys.stderr)


def cmd_keys_show(args):
    from . import keys

    key_dir = _key_dir(args)
    public = keys.load_public(key_dir)
    if args.json:
        _print({"key_dir": key_dir, "public_key": public})
    else:
        print(public)


def _peer_json(p):
    return {"name": p["name"], "address": p["address"], "public_key": p["public_key"], "created_at": p["created_at"]}


def cmd_peer_add(args):
    from . import keys
    from .server import parse_zmq_address

    check_name(args.name, "peer")
    parse_zmq_address(args.address, "address")
    if args.address.startswith("tcp://*:"):
        raise BadInput(f"invalid address {args.address!r}: a peer is connected to, so name its host, "
                       "e.g. tcp://10.0.0.2:10810 (* is for --replication-listen)")
    if args.public_key is not None:
        keys.check_public_key(args.public_key)
        try:
            own = keys.load_public(_key_dir(args))
        except Exception:
            own = None  # no key pair here yet: nothing to compare with
        if args.public_key == own:
            raise Refused(f"public key {args.public_key} is this node's own (key dir {_key_dir(args)}): "
                          "a node cannot be its own peer")
    catalog = _datadir(args).catalog()
    try:
        peer = catalog.add_peer(args.name, args.address, args.public_key)
    finally:
        catalog.close()
    if args.json:
        _print(_peer_json(peer))
    else:
        print(f"peer {peer['name']} {peer['address']}" + ("" if peer["public_key"] else " (no key: insecure only)"))


def cmd_peer_list(args):
    datadir = _datadir(args)
    peers = []
    if datadir.exists():
        catalog = datadir.catalog(create=False, readonly=True)
        try:
            peers = catalog.peers()
        finally:
            catalog.close()
    if args.json:
        _print([_peer_json(p) for p in peers])
    elif not peers:
        print("no peers")
    else:
        for p in peers:
            print(f"{p['name']}  {p['address']}  {p['public_key'] or '-'}")


def cmd_peer_remove(args):
    catalog = _datadir(args).catalog()
    try:
        catalog.remove_peer(args.name)
    finally:
        catalog.close()
    print(f"removed peer {args.name}")


def cmd_verify(args):
    datadir = _datadir(args)
    _find(datadir, args.name)
    try:
        sock = control.connect(datadir.path)
    except control.NoServer:
        raise Refused(f"verify compares live copies: start the server holding {args.name} (blockd serve)") from None
    result = control.call(sock, "verify", timeout=None, name=args.name)
    diffs = result["differences"]
    size, sizes = result.get("size"), result.get("sizes") or {}
    resized = {peer: n for peer, n in sizes.items() if n is not None and n != size}
    total = sum(len(v) for v in diffs.values()) + len(resized)
    if args.json:
        _print({"name": args.name, "identical": total == 0, "differences": diffs, "size": size, "sizes": sizes})
    else:
        for peer, offsets in diffs.items():
            if peer in resized:
                print(f"{peer}: size {format_size(resized[peer])} differs from {format_size(size)} (blocks compared "
                      f"up to the smaller)")
            if offsets:
                shown = ", ".join(str(o) for o in offsets[:10]) + (" ..." if len(offsets) > 10 else "")
                print(f"{peer}: {len(offsets)} block(s) differ at offsets {shown}")
            elif peer not in resized:
                print(f"{peer}: identical")
    return 1 if total else 0


# ---- capacity ----------------------------------------------------------------------
def _capacity(datadir, catalog=None):
    """The capacity object of docs/CLI.md."""
    if catalog is None and not datadir.exists():
        pool = {"name": "default", "logical_limit": None, "provisioned": 0, "volumes": 0}
    else:
        own = catalog is None
        if own:
            catalog = datadir.catalog(create=False, readonly=True)
        try:
            pool = catalog.pool()
        finally:
            if own:
                catalog.close()
    phys = datadir.physical()
    provisioned = pool["provisioned"]
    limit = pool["logical_limit"]
    return {
        "pool": pool["name"],
        "logical_limit": limit if limit is not None else provisioned,
        "logical_limit_set": limit is not None,
        "logical_provisioned": provisioned,
        "logical_headroom": limit - provisioned if limit is not None else None,
        "volumes": pool["volumes"],
        "physical_size": phys["size"],
        "physical_used": phys["used"],
        "physical_available": phys["available"],
        "physical_headroom_ratio": phys["available"] / phys["size"] if phys["size"] else 0.0,
        "overcommit_ratio": provisioned / phys["size"] if phys["size"] else 0.0,
    }


def _print_capacity(cap, datadir):
    limit = format_size(cap["logical_limit"]) if cap["logical_limit_set"] else "none set (unlimited)"
    headroom = format_size(cap["logical_headroom"]) if cap["logical_limit_set"] else "unlimited"
    lines = [
        f"pool                 {cap['pool']} ({datadir.path})",
        f"logical limit        {limit}",
        f"logical provisioned  {format_size(cap['logical_provisioned'])} in {cap['volumes']} volumes",
        f"logical headroom     {headroom}",
        f"physical size        {format_size(cap['physical_size'])}",
        f"physical used        {format_size(cap['physical_used'])} by blockd",
        f"physical available   {format_size(cap['physical_available'])} "
        f"({cap['physical_headroom_ratio'] * 100:.1f}% headroom)",
        f"overcommit           {cap['overcommit_ratio']:,.2f}x (logical provisioned / physical size)",
    ]
    print("\n".join(lines))


def cmd_capacity_show(args):
    datadir = _datadir(args)
    cap = _capacity(datadir)
    if args.json:
        _print(cap)
    else:
        _print_capacity(cap, datadir)


def _capacity_change(args, change):
    datadir = _datadir(args)
    catalog = datadir.catalog()
    try:
        old, new = change(catalog)
        cap = _capacity(datadir, catalog)
    finally:
        catalog.close()
    if args.json:
        _print(cap)
    else:
        shown = format_size(new) if new is not None else "unlimited"
        print(f"logical limit {format_size(old)} -> {shown} ({format_size(cap['logical_provisioned'])} provisioned)")


def cmd_capacity_add(args):
    delta = parse_size(args.size)
    if delta <= 0:
        raise BadInput(f"invalid size {args.size!r}: capacity add needs a positive size")
    _capacity_change(args, lambda catalog: catalog.add_capacity(delta))


def cmd_capacity_set(args):
    limit = None if args.size.strip().lower() in ("unlimited", "none") else parse_size(args.size)
    _capacity_change(args, lambda catalog: catalog.set_capacity(limit))


# ---- event plans ---------------------------------------------------------------------
def cmd_provision(args):
    from . import plan as plans

    plan = plans.load(args.plan)
    datadir = _datadir(args)
    bars = _ProvisionProgress(plan.total_volumes) if sys.stderr.isatty() else None
    if args.dry_run and not datadir.exists():
        catalog = Catalog(":memory:")  # a dry run on a new data dir must not create it
    else:
        catalog = datadir.catalog()
    try:
        report = catalog.provision(
            plan.batches(), plan.logical_limit, dry_run=args.dry_run, progress=bars.update if bars else None
        )
        if bars:
            bars.close()
        cap = _capacity(datadir, catalog)
    finally:
        catalog.close()
    if args.dry_run:
        # Nothing was written: show the figures the real run would leave.
        cap["logical_provisioned"] = report["logical_provisioned"]
        cap["logical_limit"] = report["logical_limit"]
        cap["logical_limit_set"] = report["logical_limit_set"]
        cap["volumes"] += report["volumes_created"]
        size = cap["physical_size"]
        cap["overcommit_ratio"] = report["logical_provisioned"] / size if size else 0.0
    groups = []
    for g in plan.groups:
        counts = report["groups"].get(g.number, {})
        first, last = g.first_and_last()
        groups.append(
            {
                "name": g.pattern, "count": g.count, "first": first, "last": last, "size": g.size, "type": g.type,
                "iops": g.iops, "throughput": g.throughput,
                "created": counts.get("created", 0), "existing": counts.get("existing", 0),
            }
        )
    summary = {
        "plan": args.plan,
        "dry_run": args.dry_run,
        "changed": bool(report["volumes_created"] or report["logical_capacity_added"]) and not args.dry_run,
        "volumes_planned": report["volumes_planned"],
        "volumes_created": report["volumes_created"],
        "volumes_existing": report["volumes_existing"],
        "logical_bytes_created": report["logical_bytes_created"],
        "logical_capacity_added": report["logical_capacity_added"],
        "logical_limit_before": report["logical_limit_before"],
        "logical_limit": cap["logical_limit"],
        "logical_provisioned": cap["logical_provisioned"],
        "overcommit_ratio": cap["overcommit_ratio"],
        "physical_size": cap["physical_size"],
        "physical_used": cap["physical_used"],
        "physical_available": cap["physical_available"],
        "physical_headroom_ratio": cap["physical_headroom_ratio"],
        "groups": groups,
    }
    if args.json:
        _print(summary)
    else:
        _print_provision(summary)


def _print_provision(s):
    would = "would " if s["dry_run"] else ""
    lines = []
    if s["dry_run"]:
        lines.append(f"dry run of {s['plan']}: nothing was changed; a real run {would}do this:")
    else:
        lines.append(f"plan {s['plan']}:")
    for g in s["groups"]:
        span = g["first"] if g["count"] == 1 else f"{g['first']} .. {g['last']}"
        lines.append(
            f"  {span}: {g['count']} x {format_size(g['size'])} {g['type']}: "
            f"{would}create {g['created']}, {g['existing']} already exist"
        )
    added = s["logical_capacity_added"]
    lines.append(
        f"logical capacity {'to add' if would else 'added'}: {format_size(added)} "
        f"(limit {format_size(s['logical_limit_before'])} -> {format_size(s['logical_limit'])})"
    )
    lines.append(
        f"volumes {'to create' if would else 'created'}: {s['volumes_created']} "
        f"({format_size(s['logical_bytes_created'])}); already present: {s['volumes_existing']}"
    )
    lines.append(
        f"overcommit after: {s['overcommit_ratio']:,.2f}x "
        f"({format_size(s['logical_provisioned'])} provisioned on {format_size(s['physical_size'])} physical)"
    )
    lines.append(
        f"physical headroom: {format_size(s['physical_available'])} available "
        f"({s['physical_headroom_ratio'] * 100:.1f}%)"
    )
    if not s["dry_run"] and not s["changed"]:
        lines.append("nothing to do: the plan is already in place")
    print("\n".join(lines))


def _bar_shape():
    """tqdm measures the terminal, except one reporting 0x0 (some ptys): then 80x24, not an invisible bar."""
    try:
        size = os.get_terminal_size(2)
        if size.columns and size.lines:
            return {}
    except OSError:
        pass
    return {"ncols": 80, "nrows": 24}


class _ProvisionProgress:
    """Progress bars on a terminal: checking the plan, then creating volumes."""

    def __init__(self, total):
        from tqdm import tqdm

        self._tqdm = tqdm
        self.total = total
        self.bar = None
        self.phase = None

    def update(self, phase, count, total):
        if phase != self.phase:
            self.close()
            self.phase = phase
            self.bar = self._tqdm(
                total=total or self.total, unit="vol", unit_scale=True, desc=phase, leave=False, **_bar_shape()
            )
        self.bar.update(count)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# ---- status ------------------------------------------------------------------------
def cmd_status(args):
    from . import status

    datadir = _datadir(args)
    pid = None
    url = args.metrics_url
    if not 0 < args.interval <= 60:
        raise BadInput(f"invalid --interval {args.interval}: more than 0, at most 60 seconds")
    if url is not None and not re.fullmatch(r"https?://[^/\s]+(/\S*)?", url):
        raise BadInput(f"invalid --metrics-url {url!r}: expected http://HOST:PORT/metrics")
    if url is None:
        try:
            sock = control.connect_serving(datadir)
        except control.NoServer:
            raise Refused(f"no server is running on data dir {datadir.path} (blockd serve --metrics HOST:PORT)") from None
        ping = control.call(sock, "ping")
        pid = ping["pid"]
        if not ping.get("metrics"):
            raise Refused(
                f"the server (pid {pid}) runs without --metrics: restart it with --metrics HOST:PORT "
                "or pass --metrics-url"
            )
        host, _, port = ping["metrics"].rpartition(":")
        if host in ("0.0.0.0", "", "::"):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        url = f"http://{host}:{port}/metrics"
    st = status.collect(url, args.interval, pid)
    if args.json:
        _print(st)
    else:
        print(status.render(st))


# ---- scrub -------------------------------------------------------------------------
def cmd_scrub(args):
    datadir = _datadir(args)
    row = _find(datadir, args.name)
    mode, handle = _live(datadir, args.name)
    if mode == "online":
        bar = _bytes_bar(datadir.chunk_count(row["id"]) * row["chunk_size"], args.name)
        last = [0]

        def progress(done):
            if bar:
                bar.update(done - last[0])
                last[0] = done

        try:
            result = control.call(handle, "scrub", progress=progress, timeout=None, name=args.name,
                                  repair=args.repair)
        finally:
            if bar:
                bar.close()
        bad = result["corrupt_offsets"]
        repaired = result.get("repaired_offsets", [])
        scanned = result["scanned_bytes"]
    else:
        if args.repair:
            datadir.unlock()
            raise Refused("scrub --repair reads from replicas: it needs the running server (blockd serve)")
        repaired = []
        try:
            bad, scanned = _scrub_offline(datadir, args.name)
        finally:
            datadir.unlock()
    unrepaired = [o for o in bad if o not in set(repaired)]
    if args.json:
        _print({"name": args.name, "clean": not bad, "corrupt_offsets": bad, "repaired_offsets": repaired,
                "scanned_bytes": scanned, "online": mode == "online"})
    elif bad:
        for offset in bad:
            print(f"corrupt block at offset {offset}" + (" (repaired from a replica)" if offset in repaired else ""))
        print(f"{args.name}: {len(bad)} corrupt block(s), {len(repaired)} repaired")
    else:
        print(f"{args.name}: clean")
    return 1 if unrepaired else 0


def _scrub_offline(datadir, name):
    from .engine import Engine

    engine = Engine(datadir)
    try:
        volume = engine.open(name, replica=engine.catalog.volume(name)["role"] == "replica")
        bar = _bytes_bar(len(volume.store.chunk_indexes()) * volume.chunk_size, name)
        scanned = [0]

        def progress(nbytes):
            scanned[0] += nbytes
            if bar:
                bar.update(nbytes)

        try:
            bad = volume.scrub(progress=progress)
        finally:
            if bar:
                bar.close()
            engine.release(volume)
    finally:
        engine.close()
    return bad, scanned[0]


def _bytes_bar(total, name):
    if not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"scrub {name}", **_bar_shape())


def _join_key_values(argv):
    """``--public-key KEY`` where a Z85 key starts with '-' would look like an option to argparse."""
    out = []
    i = 0
    while i < len(argv):
        if argv[i] == "--public-key" and i + 1 < len(argv):
            out.append(f"--public-key={argv[i + 1]}")
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out


def main(argv=None):
    parser = build_parser()
    try:
        argv = _join_key_values(list(sys.argv[1:] if argv is None else argv))
        args = parser.parse_args(argv)
        return args.func(args) or 0
    except BlockdError as exc:
        print(f"blockd: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except sqlite3.Error as exc:  # a locked, corrupt or unreadable catalog: the environment, not a bug
        print(f"blockd: catalog: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        print(f"blockd: error:{where}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug: still one line; BLOCKD_DEBUG=1 shows the traceback
        if os.environ.get("BLOCKD_DEBUG"):
            raise
        print(f"blockd: internal error: {type(exc).__name__}: {exc} (BLOCKD_DEBUG=1 for details)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
