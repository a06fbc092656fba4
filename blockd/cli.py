"""The ``blockd`` command line.

Owns argument parsing and the translation of errors into one line on stderr
plus an exit code: 0 success, 2 bad input, 1 refused or failed.  Every command
accepts ``--data-dir DIR`` (env BLOCKD_DATA_DIR) before or after the
subcommand.  Commands that only edit the catalog work while a server runs;
commands that read volume data offline (scrub) take the data-dir lock.
"""

import argparse
import json
import os
import sqlite3
import sys

from .datadir import DataDir, default_data_dir
from .errors import BadInput, BlockdError, Busy, NotFound, Refused
from .sizes import check_name, format_size, parse_volume_size


class _Parser(argparse.ArgumentParser):
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
    p.add_argument("--threads", type=int, default=None, help="nbdkit worker threads per connection (default 1: see docs/ARCHITECTURE.md)")
    p.add_argument("--verbose", action="store_true", help="nbdkit debug output")
    p.set_defaults(func=cmd_serve)

    vol = sub.add_parser("volume", help="create, list, show and delete volumes")
    _add_data_dir(vol)
    vsub = vol.add_subparsers(dest="volume_command", metavar="ACTION")
    vsub.required = True

    p = vsub.add_parser("create", help="provision a thin volume (writes one catalog row)")
    _add_data_dir(p)
    p.add_argument("name")
    p.add_argument("--size", required=True, help="e.g. 8GiB, 16T, 500GB, 1073741824")
    p.add_argument("--type", default="raw", help="volume type (default raw: no QoS)")
    p.add_argument("--exist-ok", action="store_true", help="succeed if a volume of this name and size exists")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_volume_create)

    p = vsub.add_parser("list", help="list volumes")
    _add_data_dir(p)
    p.add_argument("--json", action="store_true", help="JSON array of {name, id, size, type, ...}")
    p.add_argument("--type", help="only volumes of this type")
    p.add_argument("--limit", type=_positive_int, help="at most N volumes (by name)")
    p.set_defaults(func=cmd_volume_list)

    p = vsub.add_parser("resize", help="grow a volume (new connections see the new size)")
    _add_data_dir(p)
    p.add_argument("name")
    p.add_argument("--size", required=True, help="the new size; shrinking is refused")
    p.set_defaults(func=cmd_volume_resize)

    p = vsub.add_parser("show", help="show one volume")
    _add_data_dir(p)
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_volume_show)

    p = vsub.add_parser("delete", help="delete a volume that is not attached, and free its chunks")
    _add_data_dir(p)
    p.add_argument("name")
    p.set_defaults(func=cmd_volume_delete)

    p = sub.add_parser("scrub", help="verify every allocated block of a volume (offline)")
    _add_data_dir(p)
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_scrub)
    return parser


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise BadInput(f"invalid number {text!r}") from None
    if value <= 0:
        raise BadInput(f"invalid number {text!r}: must be positive")
    return value


def _datadir(args):
    return DataDir(args.data_dir or default_data_dir())


def _volume_json(row):
    out = {
        "name": row["name"],
        "id": row["id"],
        "size": row["size"],
        "type": row["type"],
        "role": row["role"],
        "epoch": row["epoch"],
        "created_at": row["created_at"],
    }
    return out


# ---- commands ----------------------------------------------------------------
def cmd_serve(args):
    from . import server

    threads = args.threads if args.threads is not None else server.DEFAULT_THREADS
    server.serve(_datadir(args), args.listen, threads, args.verbose)


def cmd_volume_create(args):
    check_name(args.name)
    size = parse_volume_size(args.size)
    catalog = _datadir(args).catalog()
    try:
        existing = catalog.find_volume(args.name)
        if existing and args.exist_ok:
            if existing["size"] != size or existing["type"] != args.type:
                raise Refused(
                    f"volume {args.name} exists with size {existing['size']} and type {existing['type']}"
                )
            row = existing
        else:
            row = catalog.create_volume(args.name, size, args.type)
    finally:
        catalog.close()
    if args.json:
        print(json.dumps(_volume_json(row)))
    else:
        print(f"{row['name']} {format_size(row['size'])} {row['type']}")


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
        print(json.dumps([_volume_json(r) for r in rows]))
        return
    if not rows:
        print("no volumes")
        return
    width = max(len(r["name"]) for r in rows)
    print(f"{'NAME':<{width}}  {'SIZE':>10}  TYPE")
    for r in rows:
        print(f"{r['name']:<{width}}  {format_size(r['size']):>10}  {r['type']}")


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
    if args.json:
        print(json.dumps(info))
    else:
        for key, value in info.items():
            print(f"{key}: {value}")


def cmd_volume_resize(args):
    check_name(args.name)
    size = parse_volume_size(args.size)
    datadir = _datadir(args)
    _find(datadir, args.name)
    catalog = datadir.catalog()
    try:
        catalog.resize_volume(args.name, size)
    finally:
        catalog.close()
    print(f"{args.name} {format_size(size)}")


def cmd_volume_delete(args):
    datadir = _datadir(args)
    row = _find(datadir, args.name)
    lock_fd = datadir.volume_lock(row["id"])
    if lock_fd is None:
        raise Busy(f"volume {args.name} is attached; detach it first")
    try:
        catalog = datadir.catalog(create=False)
        try:
            catalog.delete_volume(args.name)
        finally:
            catalog.close()
        datadir.remove_volume_files(row["id"])
    finally:
        os.close(lock_fd)
    print(f"deleted {args.name}")


def cmd_scrub(args):
    from .engine import Engine

    datadir = _datadir(args)
    _find(datadir, args.name)
    try:
        datadir.lock()
    except Busy:
        raise Busy(
            f"data dir {datadir.path} is held by a running server: its newest checksums are not on disk yet; "
            "stop the server to scrub offline"
        ) from None
    engine = Engine(datadir)
    try:
        volume = engine.open(args.name)
        progress = _progress(volume)
        try:
            bad = volume.scrub(progress=progress.update if progress else None)
        finally:
            if progress:
                progress.close()
            engine.release(volume)
    finally:
        engine.close()
        datadir.unlock()
    if args.json:
        print(json.dumps({"name": args.name, "corrupt_offsets": bad, "clean": not bad}))
    elif bad:
        for offset in bad:
            print(f"corrupt block at offset {offset}")
        print(f"{args.name}: {len(bad)} corrupt block(s)")
    else:
        print(f"{args.name}: clean")
    return 1 if bad else 0


def _progress(volume):
    if not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    total = len(volume.store.chunk_indexes()) * volume.chunk_size
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"scrub {volume.name}")


def main(argv=None):
    parser = build_parser()
    try:
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
