"""The CLI in-process: exit codes, one-line errors, nothing written on bad input."""

import json
import os
import sqlite3

import pytest

from blockd.catalog import FORMAT_VERSION, Catalog
from blockd.cli import main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def listing(capsys, d):
    code, out, _ = run(capsys, "--data-dir", d, "volume", "list", "--json")
    assert code == 0
    return json.loads(out)


def test_create_list_show_delete(tmp_path, capsys):
    d = tmp_path / "data"
    assert run(capsys, "--data-dir", d, "volume", "create", "db1", "--size", "16TiB")[0] == 0
    assert run(capsys, "volume", "create", "db2", "--size", "4096", "--data-dir", d)[0] == 0
    vols = listing(capsys, d)
    assert [(v["name"], v["size"], v["type"]) for v in vols] == [("db1", 16 << 40, "raw"), ("db2", 4096, "raw")]
    code, out, _ = run(capsys, "volume", "show", "db1", "--json", "--data-dir", d)
    assert code == 0 and json.loads(out)["allocated_bytes"] == 0
    assert run(capsys, "--data-dir", d, "volume", "delete", "db1")[0] == 0
    assert [v["name"] for v in listing(capsys, d)] == ["db2"]
    # provisioning wrote a row and no volume files
    assert os.listdir(d / "volumes") == []


def test_data_dir_from_environment(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BLOCKD_DATA_DIR", str(tmp_path / "env"))
    assert run(capsys, "volume", "create", "v", "--size", "1G")[0] == 0
    assert os.path.exists(tmp_path / "env" / "catalog.db")


@pytest.mark.parametrize(
    "argv",
    [
        ["volume", "create", "Bad", "--size", "1G"],
        ["volume", "create", "ok", "--size", "4097"],
        ["volume", "create", "ok", "--size", "0"],
        ["volume", "create", "ok", "--size", "lots"],
        ["volume", "create", "ok", "--size", "9EiB"],
        ["volume", "create", "ok"],
        ["volume", "create", "ok", "--size", "1G", "--type", "gp9"],
        ["volume", "frobnicate"],
        ["nonsense"],
        ["serve", "--threads", "x"],
        ["volume", "show", "BAD NAME"],
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, argv):
    d = tmp_path / "data"
    assert run(capsys, "--data-dir", d, "volume", "create", "keep", "--size", "1G")[0] == 0
    before = listing(capsys, d)
    code, out, err = run(capsys, "--data-dir", d, *argv)
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("blockd: "), err
    assert listing(capsys, d) == before


def test_refusals_exit_1(tmp_path, capsys):
    d = tmp_path / "data"
    assert run(capsys, "--data-dir", d, "volume", "create", "v", "--size", "1G")[0] == 0
    code, _, err = run(capsys, "--data-dir", d, "volume", "create", "v", "--size", "1G")
    assert code == 1 and "already exists" in err
    code, _, err = run(capsys, "--data-dir", d, "volume", "delete", "nope")
    assert code == 1 and "unknown volume" in err
    code, _, err = run(capsys, "--data-dir", d, "volume", "show", "nope")
    assert code == 1
    code, _, _ = run(capsys, "--data-dir", d, "volume", "create", "v", "--size", "1G", "--exist-ok")
    assert code == 0
    code, _, err = run(capsys, "--data-dir", d, "volume", "create", "v", "--size", "2G", "--exist-ok")
    assert code == 1 and "exists with size" in err


def test_catalog_is_wal_synchronous_full_with_format_version(tmp_path, capsys):
    d = tmp_path / "data"
    run(capsys, "--data-dir", d, "volume", "create", "v", "--size", "1G")
    db = sqlite3.connect(d / "catalog.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("SELECT value FROM meta WHERE key='format_version'").fetchone()[0] == str(FORMAT_VERSION)
    cat = Catalog(str(d / "catalog.db"))
    assert cat._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    cat.close()


def test_live_commands_refused_while_data_dir_locked_without_a_server(tmp_path, capsys, monkeypatch):
    """Lock held, nothing on the control socket (a server starting, or another offline command)."""
    from blockd import control
    from blockd.datadir import DataDir

    monkeypatch.setattr(control, "SERVER_START_WAIT_SECONDS", 0.3)
    d = tmp_path / "data"
    run(capsys, "--data-dir", d, "volume", "create", "v", "--size", "1G")
    holder = DataDir(str(d)).init()
    holder.lock()
    try:
        for argv in (["scrub", "v"], ["volume", "delete", "v"], ["volume", "resize", "v", "--size", "2G"]):
            code, _, err = run(capsys, "--data-dir", d, *argv)
            assert code == 1 and str(os.getpid()) in err and "control socket does not answer" in err, (argv, err)
        assert [(v["name"], v["size"]) for v in listing(capsys, d)] == [("v", 1 << 30)]
    finally:
        holder.unlock()
    code, out, _ = run(capsys, "--data-dir", d, "scrub", "v")
    assert code == 0 and "clean" in out


def test_control_plane_commands_do_not_import_numba(tmp_path):
    """Catalog and offline live commands stay fast: no JIT runtime, no zmq."""
    import subprocess
    import sys

    d = str(tmp_path / "data")
    code = (
        "import sys\n"
        "from blockd.cli import main\n"
        f"d = {d!r}\n"
        f"open({str(tmp_path / 'p.toml')!r}, 'w').write('[[volumes]]\\nname = \"p{{index}}\"\\ncount = 3\\nsize = 4096\\n')\n"
        "for argv in (['volume','create','v','--size','1G'], ['volume','list','--json'], ['volume','show','v'],"
        " ['volume','resize','v','--size','2G'], ['capacity','add','1P'], ['capacity','show','--json'],"
        f" ['provision', {str(tmp_path / 'p.toml')!r}], ['volume','delete','v']):\n"
        "    assert main(['--data-dir', d] + argv) == 0, argv\n"
        "heavy = sorted(m for m in ('numba', 'zmq', 'llvmlite') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_list_filters_and_resize_grows_only(tmp_path, capsys):
    d = tmp_path / "data"
    for name in ("c", "a", "b"):
        assert run(capsys, "--data-dir", d, "volume", "create", name, "--size", "1G")[0] == 0
    code, out, _ = run(capsys, "--data-dir", d, "volume", "list", "--json", "--limit", "2")
    assert [v["name"] for v in json.loads(out)] == ["a", "b"]
    code, out, _ = run(capsys, "--data-dir", d, "volume", "list", "--json", "--type", "gp3")
    assert json.loads(out) == []
    assert run(capsys, "--data-dir", d, "volume", "list", "--limit", "0")[0] == 2
    assert run(capsys, "--data-dir", d, "volume", "resize", "a", "--size", "2G")[0] == 0
    code, _, err = run(capsys, "--data-dir", d, "volume", "resize", "a", "--size", "1G")
    assert code == 1 and "shrinking" in err
    assert run(capsys, "--data-dir", d, "volume", "resize", "a", "--size", "4097")[0] == 2
    assert run(capsys, "--data-dir", d, "volume", "resize", "nope", "--size", "4G")[0] == 1
    sizes = {v["name"]: v["size"] for v in listing(capsys, d)}
    assert sizes == {"a": 2 << 30, "b": 1 << 30, "c": 1 << 30}
