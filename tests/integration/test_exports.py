"""Export listing stays bounded; attaching by name is not."""

import json
import subprocess

import pytest

from blockd.catalog import Catalog
from blockd.engine import EXPORT_LIST_LIMIT

pytestmark = pytest.mark.integration


def test_export_list_is_bounded_and_any_name_attaches(data_dir, cli, server_factory):
    cli("volume", "create", "first", "--size", "1GiB", check=True)
    catalog = Catalog(str(data_dir / "catalog.db"))
    with catalog.transaction() as db:
        for i in range(EXPORT_LIST_LIMIT + 200):
            db.execute(
                "INSERT INTO volumes (name, pool_id, size, type, created_at) VALUES (?, 1, ?, 'raw', 0)",
                (f"v{i:05d}", 1 << 30),
            )
    catalog.close()
    srv = server_factory(data_dir).start()
    listing = subprocess.run(
        ["nbdinfo", "--list", "--json", f"nbd+unix://?socket={srv.sock}"], capture_output=True, text=True, timeout=120
    )
    assert listing.returncode == 0, listing.stderr
    exports = json.loads(listing.stdout)["exports"]
    assert len(exports) == EXPORT_LIST_LIMIT
    h = srv.connect(f"v{EXPORT_LIST_LIMIT + 150:05d}")  # not in the list, still attachable
    assert h.get_size() == 1 << 30
    h.shutdown()
    # serve printed the count and the URI pattern instead of 1201 lines
    out = srv.log()
    assert f"{EXPORT_LIST_LIMIT + 201} volumes: nbd+unix:///NAME?socket={srv.sock}" in out


def test_serve_prints_one_uri_per_volume(data_dir, cli, server_factory):
    for name in ("a", "b"):
        cli("volume", "create", name, "--size", "1GiB", check=True)
    srv = server_factory(data_dir).start()
    out = srv.log()
    assert f"a nbd+unix:///a?socket={srv.sock}" in out
    assert f"b nbd+unix:///b?socket={srv.sock}" in out
