"""Capacity and event plans through the CLI, in-process, against a real SQLite catalog."""

import json
import os
import sqlite3
import subprocess
import sys

import pytest

from blockd import plan as plans
from blockd.catalog import FORMAT_VERSION, Catalog
from blockd.cli import main
from blockd.errors import BadInput
from conftest import ROOT

PiB = 1 << 50
TiB = 1 << 40
GiB = 1 << 30
PRIME_DAY = os.path.join(ROOT, "tools", "plans", "prime-day-2020.toml")


def run(capsys, d, *argv):
    code = main(["--data-dir", str(d), *[str(a) for a in argv]])
    out, err = capsys.readouterr()
    return code, out, err


def ok_json(capsys, d, *argv):
    code, out, err = run(capsys, d, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def snapshot(d):
    """Everything the catalog holds, to compare before/after a refusal."""
    path = os.path.join(d, "catalog.db")
    if not os.path.exists(path):
        return None
    db = sqlite3.connect(path)
    try:
        return {
            table: db.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()
            for table in ("meta", "pools", "volumes")
        }
    finally:
        db.close()


def refused(capsys, d, code, argv, *needles):
    before = snapshot(d)
    got, out, err = run(capsys, d, *argv)
    assert got == code, (argv, got, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("blockd: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert snapshot(d) == before
    return lines[0]


def write_plan(tmp_path, text, name="plan.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def du(path):
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            total += os.lstat(os.path.join(root, f)).st_blocks * 512
    return total


def check_catalog(d):
    db = sqlite3.connect(os.path.join(d, "catalog.db"))
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        provisioned, total = db.execute(
            "SELECT p.provisioned, (SELECT COALESCE(SUM(size), 0) FROM volumes) FROM pools p"
        ).fetchone()
        assert provisioned == total
    finally:
        db.close()


# ---- capacity ------------------------------------------------------------------------
def test_capacity_show_json_fields_and_arithmetic(tmp_path, capsys):
    d = tmp_path / "data"
    cap = ok_json(capsys, d, "capacity", "show")
    for key in ("logical_limit", "logical_provisioned", "physical_size", "physical_used"):
        assert isinstance(cap[key], int) and cap[key] >= 0, key
    assert isinstance(cap["overcommit_ratio"], float)
    assert cap["logical_limit_set"] is False and cap["logical_provisioned"] == 0
    st = os.statvfs(tmp_path)
    assert cap["physical_size"] == st.f_blocks * st.f_frsize
    assert not os.path.exists(d)  # show creates nothing

    assert run(capsys, d, "volume", "create", "a", "--size", "3TiB")[0] == 0
    cap = ok_json(capsys, d, "capacity", "show")
    assert cap["logical_provisioned"] == 3 * TiB and cap["logical_limit"] == 3 * TiB
    assert cap["overcommit_ratio"] == pytest.approx(3 * TiB / cap["physical_size"])
    cap = ok_json(capsys, d, "capacity", "add", "241PiB")
    assert cap["logical_limit"] == 3 * TiB + 241 * PiB and cap["logical_limit_set"] is True
    assert cap["logical_headroom"] == 241 * PiB
    cap = ok_json(capsys, d, "capacity", "set", "10TiB")
    assert cap["logical_limit"] == 10 * TiB
    line = refused(capsys, d, 1, ["volume", "create", "b", "--size", "8TiB"], "1TiB", str(TiB))
    assert "capacity add" in line
    assert run(capsys, d, "volume", "create", "b", "--size", "7TiB")[0] == 0
    refused(capsys, d, 1, ["volume", "resize", "b", "--size", "8TiB"], "needs 1TiB")
    refused(capsys, d, 1, ["capacity", "set", "9TiB"], "already provisioned")
    cap = ok_json(capsys, d, "capacity", "set", "unlimited")
    assert cap["logical_limit_set"] is False
    assert run(capsys, d, "volume", "create", "c", "--size", "1PiB")[0] == 0
    check_catalog(d)


@pytest.mark.parametrize(
    "argv, code",
    [
        (["capacity", "add", "0"], 2),
        (["capacity", "add", "-5G"], 2),
        (["capacity", "add", "lots"], 2),
        (["capacity", "add", "9EiB"], 2),  # past a signed 64-bit limit
        (["capacity", "set", "1.5"], 2),
        (["capacity", "set", "-1"], 2),
        (["capacity", "set", "1KiB"], 1),  # below what is provisioned
        (["capacity", "frob"], 2),
        (["volume", "create", "x", "--size", "1G", "--iops", "0"], 2),
        (["volume", "create", "x", "--size", "1G", "--iops", "many"], 2),
        (["volume", "create", "x", "--size", "1G", "--throughput", "-1"], 2),
        (["volume", "create", "a", "--size", "1G"], 1),  # duplicate name
        (["volume", "resize", "a", "--size", "1G"], 1),  # shrink
        (["volume", "resize", "a", "--size", "0"], 2),
        (["volume", "resize", "a", "--size", "2G+"], 2),
        (["volume", "delete", "nope"], 1),
        (["volume", "set", "a", "--min-copies", "1"], 1),  # not replicated: nothing to lower
    ],
)
def test_refusals_leave_the_catalog_unchanged(tmp_path, capsys, argv, code):
    d = tmp_path / "data"
    assert run(capsys, d, "volume", "create", "a", "--size", "4GiB")[0] == 0
    refused(capsys, d, code, argv)


def test_create_records_iops_and_throughput_and_exist_ok_compares_them(tmp_path, capsys):
    d = tmp_path / "data"
    v = ok_json(capsys, d, "volume", "create", "q", "--size", "100GiB", "--iops", "3000", "--throughput", "125")
    assert (v["iops"], v["throughput"]) == (3000, 125)
    again = ok_json(capsys, d, "volume", "create", "q", "--size", "100GiB", "--iops", "3000", "--throughput", "125",
                    "--exist-ok")
    assert again["id"] == v["id"]
    refused(capsys, d, 1, ["volume", "create", "q", "--size", "100GiB", "--iops", "4000", "--exist-ok"], "exists")
    shown = ok_json(capsys, d, "volume", "show", "q")
    assert shown["iops"] == 3000 and shown["attached"] is False and shown["server"] is False


KEY_B = "b" * 40
KEY_C = "c" * 40


def test_one_node_is_one_peer_and_one_copy(tmp_path, capsys):
    """From a black-box run: node b added again as `z` (same address and key) let `--replica b --replica z
    --min-copies 3` acknowledge writes as on three copies while two existed."""
    d = tmp_path / "data"
    assert run(capsys, d, "peer", "add", "b", "tcp://127.0.0.1:7001", f"--public-key={KEY_B}")[0] == 0
    refused(capsys, d, 1, ["peer", "add", "z", "tcp://127.0.0.1:7001", f"--public-key={KEY_C}"],
            "peer b already has address tcp://127.0.0.1:7001")
    refused(capsys, d, 1, ["peer", "add", "z", "tcp://127.0.0.1:7002", f"--public-key={KEY_B}"],
            "peer b already has public key")
    assert run(capsys, d, "peer", "add", "c", "tcp://127.0.0.1:7003", f"--public-key={KEY_C}")[0] == 0
    # A catalog that already holds one node under two names (made before this check): create refuses.
    db = sqlite3.connect(os.path.join(d, "catalog.db"))
    db.execute("UPDATE peers SET address='tcp://127.0.0.1:7001' WHERE name='c'")
    db.commit()
    db.close()
    refused(capsys, d, 2, ["volume", "create", "v", "--size", "1GiB", "--replica", "b", "--replica", "c",
                           "--min-copies", "3"], "peers b and c are the same node")


def test_a_node_is_not_its_own_peer(tmp_path, capsys):
    """From a black-box run: `peer add me ... --public-key=$(blockd keys show)` was taken; a volume
    replicated to it could never be written (its own sink refused the CREATE)."""
    d, k = tmp_path / "data", tmp_path / "keys"
    code, own, _ = run(capsys, d, "keys", "generate", "--key-dir", k)
    assert code == 0
    refused(capsys, d, 1, ["peer", "add", "me", "tcp://127.0.0.1:7001", f"--public-key={own.strip()}",
                           "--key-dir", k], "this node's own")
    assert run(capsys, d, "peer", "add", "b", "tcp://127.0.0.1:7001", f"--public-key={KEY_B}", "--key-dir", k)[0] == 0


def test_exist_ok_compares_the_replicas_too(tmp_path, capsys):
    """From a black-box run: `create --replica b --exist-ok` on an existing unreplicated volume said ok."""
    d = tmp_path / "data"
    assert run(capsys, d, "peer", "add", "b", "tcp://127.0.0.1:7001", f"--public-key={KEY_B}")[0] == 0
    assert run(capsys, d, "peer", "add", "c", "tcp://127.0.0.1:7002", f"--public-key={KEY_C}")[0] == 0
    plain = ok_json(capsys, d, "volume", "create", "plain", "--size", "1GiB")
    refused(capsys, d, 1, ["volume", "create", "plain", "--size", "1GiB", "--replica", "b", "--exist-ok"],
            "exists with no replicas")
    repl = ok_json(capsys, d, "volume", "create", "r", "--size", "1GiB", "--replica", "b")
    refused(capsys, d, 1, ["volume", "create", "r", "--size", "1GiB", "--exist-ok"], "exists with replicas b")
    refused(capsys, d, 1, ["volume", "create", "r", "--size", "1GiB", "--replica", "c", "--exist-ok"], "replicas b")
    refused(capsys, d, 1, ["volume", "create", "r", "--size", "1GiB", "--replica", "b", "--min-copies", "1",
                           "--exist-ok"], "min copies 2")
    assert ok_json(capsys, d, "volume", "create", "r", "--size", "1GiB", "--replica", "b", "--exist-ok")["id"] == repl["id"]
    assert ok_json(capsys, d, "volume", "create", "r", "--size", "1GiB", "--replica", "b", "--min-copies", "2",
                   "--exist-ok")["id"] == repl["id"]
    assert ok_json(capsys, d, "volume", "create", "plain", "--size", "1GiB", "--exist-ok")["id"] == plain["id"]


# ---- the Prime Day plan ----------------------------------------------------------------
def test_prime_day_plan_dry_run_then_real_then_noop(tmp_path, capsys):
    d = tmp_path / "data"
    assert run(capsys, d, "capacity", "show")[0] == 0
    empty = snapshot(d)
    dry = ok_json(capsys, d, "provision", PRIME_DAY, "--dry-run")
    assert snapshot(d) == empty  # changed nothing
    assert dry["dry_run"] is True and dry["changed"] is False
    assert dry["volumes_created"] == 15424 and dry["logical_capacity_added"] == 241 * PiB
    assert dry["logical_provisioned"] == 241 * PiB

    real = ok_json(capsys, d, "provision", PRIME_DAY)
    # The dry run printed exactly what the real run did.
    for key in ("volumes_planned", "volumes_created", "volumes_existing", "logical_bytes_created",
                "logical_capacity_added", "logical_limit", "logical_provisioned", "groups"):
        assert real[key] == dry[key], key
    assert real["changed"] is True
    vols = ok_json(capsys, d, "volume", "list")
    assert len(vols) == 15424 and sum(v["size"] for v in vols) == 241 * PiB
    assert {v["size"] for v in vols} == {16 * TiB} and {v["type"] for v in vols} == {"gp3"}
    assert vols[0]["name"] == "prime-00000" and vols[-1]["name"] == "prime-15423"
    cap = ok_json(capsys, d, "capacity", "show")
    assert cap["logical_limit"] == 241 * PiB and cap["logical_provisioned"] == 241 * PiB
    assert cap["volumes"] == 15424
    assert cap["overcommit_ratio"] == pytest.approx(241 * PiB / cap["physical_size"])
    assert cap["physical_used"] == du(d)
    assert du(d) < 64 << 20
    assert os.listdir(d / "volumes") == []  # metadata only

    after = snapshot(d)
    again = ok_json(capsys, d, "provision", PRIME_DAY)
    assert again["volumes_created"] == 0 and again["volumes_existing"] == 15424
    assert again["logical_capacity_added"] == 0 and again["changed"] is False
    assert snapshot(d) == after
    code, out, _ = run(capsys, d, "provision", PRIME_DAY)
    assert code == 0 and "nothing to do" in out
    check_catalog(d)


def test_text_summary_names_what_was_done(tmp_path, capsys):
    d = tmp_path / "data"
    code, out, _ = run(capsys, d, "provision", PRIME_DAY, "--dry-run")
    assert code == 0 and "nothing was changed" in out and "to create: 15424" in out and "241PiB" in out
    code, out, _ = run(capsys, d, "provision", PRIME_DAY)
    for needle in ("logical capacity added: 241PiB", "volumes created: 15424", "overcommit after:",
                   "physical headroom:"):
        assert needle in out, (needle, out)


def test_changed_plan_creates_only_what_is_missing_and_refuses_conflicts(tmp_path, capsys):
    d = tmp_path / "data"
    p = write_plan(tmp_path, '[[volumes]]\nname = "web-{index:02d}"\ncount = 3\nsize = "10GiB"\n')
    first = ok_json(capsys, d, "provision", p)
    assert first["volumes_created"] == 3 and first["logical_capacity_added"] == 0
    ids = {v["name"]: v["id"] for v in ok_json(capsys, d, "volume", "list")}
    p.write_text(
        '[pool]\nlogical_limit = "1TiB"\n'
        '[[volumes]]\nname = "web-{index:02d}"\ncount = 5\nsize = "10GiB"\n'
        '[[volumes]]\nname = "db-{index}"\ncount = 2\nstart = 1\nsize = 107374182400\n'
        'iops = 6000\nthroughput = 250\n'
    )
    second = ok_json(capsys, d, "provision", p)
    assert second["volumes_created"] == 4 and second["volumes_existing"] == 3
    assert [g["created"] for g in second["groups"]] == [2, 2]
    assert second["logical_limit"] == 1 * TiB
    vols = {v["name"]: v for v in ok_json(capsys, d, "volume", "list")}
    assert sorted(vols) == ["db-1", "db-2", "web-00", "web-01", "web-02", "web-03", "web-04"]
    assert all(vols[n]["id"] == i for n, i in ids.items())  # existing ones untouched
    assert vols["db-2"]["iops"] == 6000 and vols["db-2"]["throughput"] == 250
    p.write_text('[[volumes]]\nname = "web-{index:02d}"\ncount = 5\nsize = "20GiB"\n')
    refused(capsys, d, 1, ["provision", p], "web-00", "size 10GiB in the catalog, 20GiB in the plan", "4 more")
    p.write_text('[[volumes]]\nname = "db-{index}"\ncount = 2\nstart = 1\nsize = "100GiB"\n')
    refused(capsys, d, 1, ["provision", p], "db-1", "iops 6000 in the catalog, default in the plan")
    check_catalog(d)


def test_plan_target_never_lowers_the_limit_and_respects_an_explicit_one(tmp_path, capsys):
    d = tmp_path / "data"
    ok_json(capsys, d, "capacity", "set", "2PiB")
    p = write_plan(tmp_path, '[pool]\nlogical_limit = "1PiB"\n')
    out = ok_json(capsys, d, "provision", p)
    assert out["logical_limit"] == 2 * PiB and out["logical_capacity_added"] == 0
    ok_json(capsys, d, "capacity", "set", "1TiB")
    p.write_text('[pool]\nlogical_limit = "1TiB"\n[[volumes]]\nname = "v{index}"\ncount = 3\nsize = "512GiB"\n')
    refused(capsys, d, 1, ["provision", p], "needs 512GiB", str(512 * GiB))


def test_plan_on_an_unlimited_pool_with_volumes_sets_a_limit_that_holds_them(tmp_path, capsys):
    d = tmp_path / "data"
    assert run(capsys, d, "volume", "create", "vol0", "--size", "8GiB")[0] == 0
    out = ok_json(capsys, d, "provision", PRIME_DAY)
    assert out["volumes_created"] == 15424
    assert out["logical_limit"] == 241 * PiB + 8 * GiB == out["logical_provisioned"]


BAD_PLANS = [
    ("not toml = = 1", "TOML"),
    ('[[volumes]]\nname = "a-{index}"\ncount = 2\nsize = "1G"\nsizes = 3\n', "unknown key 'sizes'"),
    ('[pool]\nlogical_limit = "1P"\nextra = 1\n', "unknown key 'extra' in [pool]"),
    ('volumez = []\n', "unknown key 'volumez'"),
    ('[[volumes]]\nname = "a-{index}"\ncount = 2\n', "needs size"),
    ('[[volumes]]\nsize = "1G"\n', "needs name"),
    ('[[volumes]]\nname = "a-{index}"\ncount = 2\nsize = "0"\n', "must be positive"),
    ('[[volumes]]\nname = "a-{index}"\ncount = 2\nsize = "-1G"\n', "invalid size"),
    ('[[volumes]]\nname = "a-{index}"\ncount = 2\nsize = "lots"\n', "invalid size"),
    ('[[volumes]]\nname = "a-{index}"\ncount = 2\nsize = 4097\n', "multiple of 4096"),
    ('[[volumes]]\nname = "a-{index}"\ncount = 0\nsize = "1G"\n', "count must be a whole number >= 1"),
    ('[[volumes]]\nname = "a-{index}"\ncount = -3\nsize = "1G"\n', "count"),
    ('[[volumes]]\nname = "a-{index}"\ncount = "3"\nsize = "1G"\n', "count"),
    ('[[volumes]]\nname = "a-{index}"\ncount = true\nsize = "1G"\n', "count"),
    ('[[volumes]]\nname = "a"\ncount = 2\nsize = "1G"\n', "no {index}"),
    ('[[volumes]]\nname = "a-{idx}"\ncount = 2\nsize = "1G"\n', "only {index}"),
    ('[[volumes]]\nname = "a-{}"\ncount = 2\nsize = "1G"\n', "only {index}"),
    ('[[volumes]]\nname = "a-{index!r}"\ncount = 2\nsize = "1G"\n', "only {index}"),
    ('[[volumes]]\nname = "a-{index.real}"\ncount = 2\nsize = "1G"\n', "only {index}"),
    ('[[volumes]]\nname = "a-{index:s}"\ncount = 2\nsize = "1G"\n', "pattern"),
    ('[[volumes]]\nname = "a-{index"\ncount = 2\nsize = "1G"\n', "pattern"),
    ('[[volumes]]\nname = "A-{index}"\ncount = 2\nsize = "1G"\n', "invalid volume name 'A-0'"),
    ('[[volumes]]\nname = "a-{index:X}"\ncount = 11\nsize = "1G"\n', "invalid volume name 'a-A'"),
    ('[[volumes]]\nname = "{index:070d}"\ncount = 2\nsize = "1G"\n', "invalid volume name"),
    ('[[volumes]]\nname = "a-{index}"\ncount = 2\nsize = "1G"\ntype = "gp9"\n', "invalid volume type"),
    ('[[volumes]]\nname = "a-{index}"\ncount = 2\nsize = "1G"\niops = 0\n', "iops"),
    ('[[volumes]]\nname = "a-{index}"\ncount = 2\nsize = "1G"\nthroughput = 1.5\n', "throughput"),
    ('[[volumes]]\nname = "a-{index}"\ncount = 2\nsize = "1G"\n[[volumes]]\nname = "a-{index}"\nstart = 1\n'
     'count = 2\nsize = "1G"\n', "a-1 is named twice"),
    ('[[volumes]]\nname = "a-{index}"\ncount = 20000000\nsize = "1G"\n', "at most"),
    ("[pool]\nlogical_limit = 0\n", "must be positive"),
    ('[pool]\nlogical_limit = "9EiB"\n', "largest limit"),
    ("", "nothing to do"),
    ("volumes = 3\n", "array of tables"),
    ("pool = 3\n", "[pool] must be a table"),
]


@pytest.mark.parametrize("text, needle", BAD_PLANS)
def test_bad_plans_are_refused_with_one_line_and_change_nothing(tmp_path, capsys, text, needle):
    d = tmp_path / "data"
    assert run(capsys, d, "volume", "create", "a-0", "--size", "1GiB")[0] == 0
    p = write_plan(tmp_path, text)
    refused(capsys, d, 2, ["provision", p], needle)
    refused(capsys, d, 2, ["provision", p, "--dry-run"], needle)


def test_missing_and_unreadable_plan_files(tmp_path, capsys):
    d = tmp_path / "data"
    refused(capsys, d, 2, ["provision", tmp_path / "nope.toml"], "cannot read plan")
    (tmp_path / "binary.toml").write_bytes(b"\xff\xfe\x00")
    refused(capsys, d, 2, ["provision", tmp_path / "binary.toml"], "not UTF-8")
    refused(capsys, d, 2, ["provision", tmp_path], "cannot read plan")


def test_over_the_limit_plan_names_what_is_missing_and_changes_nothing(tmp_path, capsys):
    d = tmp_path / "data"
    ok_json(capsys, d, "capacity", "set", "100GiB")
    p = write_plan(tmp_path, '[[volumes]]\nname = "x{index}"\ncount = 11\nsize = "10GiB"\n')
    refused(capsys, d, 1, ["provision", p], "needs 10GiB", "11 new volumes")


def test_plan_patterns_and_indexes():
    plan = plans.parse(
        {"volumes": [{"name": "p-{index:05d}", "count": 3, "start": 98, "size": "1GiB"},
                     {"name": "solo", "size": 4096}]}
    )
    rows = [r for batch in plan.batches(size=2) for r in batch]
    assert [r[0] for r in rows] == ["p-00098", "p-00099", "p-00100", "solo"]
    assert rows[0][1:] == (GiB, "raw", None, None, 1) and rows[3][5] == 2
    assert plan.total_volumes == 4 and plan.total_bytes == 3 * GiB + 4096
    with pytest.raises(BadInput):
        plans.parse({"volumes": [{"name": "p-{index}{index:d}", "count": 2, "size": "1G", "colour": "red"}]})


def test_two_plans_at_once_both_land_and_the_catalog_stays_sound(tmp_path):
    d = tmp_path / "data"
    a = write_plan(tmp_path, '[[volumes]]\nname = "a-{index:06d}"\ncount = 60000\nsize = "1TiB"\n', "a.toml")
    b = write_plan(tmp_path, '[pool]\nlogical_limit = "1EiB"\n[[volumes]]\nname = "b-{index:06d}"\n'
                             'count = 60000\nsize = "2TiB"\n', "b.toml")
    procs = [
        subprocess.Popen([sys.executable, "-m", "blockd.cli", "--data-dir", str(d), "provision", str(p), "--json"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        for p in (a, b)
    ]
    results = [p.communicate(timeout=120) + (p.returncode,) for p in procs]
    codes = [r[2] for r in results]
    for out, err, code in results:
        assert code == 0 or (code == 1 and len(err.strip().splitlines()) == 1), (code, err)
    assert 0 in codes
    check_catalog(d)
    db = sqlite3.connect(os.path.join(d, "catalog.db"))
    counts = dict(db.execute("SELECT substr(name, 1, 1), COUNT(*) FROM volumes GROUP BY 1").fetchall())
    db.close()
    for prefix, code in zip("ab", codes):
        assert counts.get(prefix, 0) == (60000 if code == 0 else 0)  # all or nothing


def test_catalog_format_1_is_upgraded_in_place(tmp_path, capsys):
    d = tmp_path / "data"
    os.makedirs(d)
    db = sqlite3.connect(d / "catalog.db")
    db.executescript(
        """
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE pools (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL UNIQUE,
                            chunk_size INTEGER NOT NULL, logical_limit INTEGER);
        CREATE TABLE volumes (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL UNIQUE,
                              pool_id INTEGER NOT NULL REFERENCES pools(id),
                              size INTEGER NOT NULL CHECK (size > 0 AND size % 4096 = 0),
                              type TEXT NOT NULL DEFAULT 'raw', role TEXT NOT NULL DEFAULT 'primary',
                              epoch INTEGER NOT NULL DEFAULT 1, created_at REAL NOT NULL);
        INSERT INTO meta VALUES ('format_version', '1');
        INSERT INTO pools (name, chunk_size) VALUES ('default', 4194304);
        INSERT INTO volumes (name, pool_id, size, created_at) VALUES ('old1', 1, 1073741824, 0);
        INSERT INTO volumes (name, pool_id, size, created_at) VALUES ('old2', 1, 2147483648, 0);
        """
    )
    db.commit()
    db.close()
    vols = ok_json(capsys, d, "volume", "list")  # a read-only command upgrades it
    assert [(v["name"], v["size"], v["iops"]) for v in vols] == [("old1", GiB, None), ("old2", 2 * GiB, None)]
    assert ok_json(capsys, d, "capacity", "show")["logical_provisioned"] == 3 * GiB
    cat = Catalog(str(d / "catalog.db"))
    assert cat._version() == FORMAT_VERSION == 7
    cat.close()
    check_catalog(d)


def test_a_name_repeated_across_batches_is_refused_and_nothing_is_created(tmp_path):
    cat = Catalog(str(tmp_path / "catalog.db"))
    rows = [[("n1", GiB, "raw", None, None, 1), ("n2", GiB, "raw", None, None, 1)],
            [("n3", GiB, "raw", None, None, 2), ("n1", GiB, "raw", None, None, 2)]]
    with pytest.raises(BadInput, match="n1 is named twice"):
        cat.provision(iter(rows))
    assert cat.count_volumes() == 0
    report = cat.provision(iter(rows[:1]))
    assert report["volumes_created"] == 2 and cat.count_volumes() == 2
    cat.close()


def test_progress_bar_on_a_terminal_only(tmp_path):
    """stderr on a pty gets tqdm bars; piped stderr stays clean for scripts."""
    import fcntl
    import pty
    import struct
    import termios

    d = tmp_path / "data"
    p = write_plan(tmp_path, '[[volumes]]\nname = "t-{index:06d}"\ncount = 30000\nsize = "1GiB"\n')
    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal's width
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "blockd.cli", "--data-dir", str(d), "provision", str(p)],
            stdout=subprocess.PIPE, stderr=secondary, text=True, cwd=ROOT, timeout=120,
        )
        os.close(secondary)
        secondary = None
        drawn = b""
        while True:
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # EIO: the pty's other side is closed
                break
            if not chunk:
                break
            drawn += chunk
    finally:
        if secondary is not None:
            os.close(secondary)
        os.close(primary)
    assert proc.returncode == 0 and "volumes created: 30000" in proc.stdout
    assert b"checking" in drawn and b"creating" in drawn and b"/30.0k" in drawn, drawn[-500:]
    piped = subprocess.run(
        [sys.executable, "-m", "blockd.cli", "--data-dir", str(d), "provision", str(p)],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert piped.returncode == 0 and piped.stderr == ""
