"""A real Linux kernel's NBD driver against blockd: nbd-client inside a qemu guest.

This machine's kernel may have no NBD driver, so tools/vmtest boots Debian's
stock kernel (nbd.ko, ext4) with busybox, nbd-client and e2fsprogs under
qemu TCG, once for this module. The guest reaches the host's loopback at
10.0.2.2 (qemu user networking); every test serves its own data dir on a free
loopback port and runs its scenario as shell scripts in the guest (the
helpers in GUEST_LIB), parsing what they print. Skips, with the reason, when
qemu-system-x86_64 or the Debian packages cannot be had.
"""

import hashlib
import importlib.machinery
import importlib.util
import itertools
import os
import re
import shutil
import signal
import subprocess
import time

import pytest
from conftest import ROOT, Server, free_port, js, wait_for

pytestmark = pytest.mark.integration

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


def _load_vmtest():
    path = os.path.join(ROOT, "tools", "vmtest")
    loader = importlib.machinery.SourceFileLoader("vmtest", path)
    spec = importlib.util.spec_from_loader("vmtest", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


vmtest = _load_vmtest()

# Shell helpers installed in the guest as /tmp/lib.sh; every scenario script sources it.
# The nbd-client options are the ones README.md documents for the kernel driver.
GUEST_LIB = r"""
set -u
fail() { echo "FAIL: $*"; exit 1; }
[ "$(command -v mkfs.ext4)" = /sbin/mkfs.ext4 ] || fail "mkfs.ext4 is not e2fsprogs' ($(command -v mkfs.ext4))"
HOST=__HOST__
NBD_OPTS="-b 4096 -t 60"
# attach PORT DEV NAME [more nbd-client options]
attach() {
    port=$1; dev=$2; name=$3; shift 3
    nbd-client $HOST $port $dev -N $name $NBD_OPTS "$@" || fail "nbd-client $HOST $port $dev -N $name $*"
}
# detach DEV: disconnect and wait until the device is free again
detach() {
    nbd-client -d $1 >/dev/null 2>&1
    i=0
    while nbd-client -c $1 >/dev/null 2>&1; do
        i=$((i + 1)); [ $i -gt 200 ] && fail "$1 still connected"
        sleep 0.1
    done
}
# write_files MNT PREFIX COUNT KIB MANIFEST: COUNT files of KIB KiB of random data, each
# fsync'ed; a file's checksum goes to MANIFEST only once its fsync succeeded.
write_files() {
    mnt=$1; prefix=$2; count=$3; kib=$4; manifest=$5
    n=0
    while [ $n -lt $count ]; do
        n=$((n + 1)); rel=$prefix$n
        dd if=/dev/urandom of=$mnt/$rel bs=1k count=$kib 2>/dev/null || return 1
        sync $mnt/$rel || return 1
        (cd $mnt && sha256sum $rel) >>$manifest
    done
}
# writer MNT PREFIX MANIFEST STATE: write_files one 128 KiB file at a time until STATE.stop
# exists (at most 3000 files); STATE.synced counts synced files, STATE.err logs failures.
writer() {
    mnt=$1; prefix=$2; manifest=$3; state=$4
    n=0; ok=0; : >$state.err; echo 0 >$state.synced
    while [ ! -e $state.stop ] && [ $n -lt 3000 ]; do
        n=$((n + 1)); rel=$prefix$n
        if dd if=/dev/urandom of=$mnt/$rel bs=64k count=2 2>>$state.err && sync $mnt/$rel 2>>$state.err; then
            (cd $mnt && sha256sum $rel) >>$manifest
            ok=$((ok + 1)); echo $ok >$state.synced
        else
            echo "file $n failed at $(cut -d' ' -f1 /proc/uptime)" >>$state.err
        fi
        sleep 0.05
    done
    echo done >$state.done
}
""".replace("__HOST__", vmtest.HOST_IP)  # the host's 127.0.0.1, as the guest sees it


def parse_manifest(text):
    """[(sha256, relative path)] from sha256sum lines in a guest's output."""
    return re.findall(r"^([0-9a-f]{64})  (\S+)$", text, re.M)


def values(text):
    """KEY=value lines a guest script printed."""
    return dict(re.findall(r"^([A-Z_]+)=(.*)$", text, re.M))


class TcpServer(Server):
    """conftest.Server on 127.0.0.1:PORT instead of a unix socket (the guest dials 10.0.2.2:PORT)."""

    def __init__(self, data_dir, log_dir, port=None, extra=()):
        self.port = port or free_port()
        super().__init__(data_dir, os.path.join(str(log_dir), f"tcp-{self.port}"), extra=extra)

    def uri(self, name):
        return f"nbd://127.0.0.1:{self.port}/{name}"

    def listen(self):
        return f"127.0.0.1:{self.port}"

    def dial(self, h):
        h.connect_tcp("127.0.0.1", str(self.port))
        return True


class Guest:
    """The module's VM, seen by one test: run scenario scripts, hand out fresh nbd devices."""

    def __init__(self, holder):
        self.holder = holder
        self.vm = holder.vm
        self.devices = []
        self.mounts = []

    def sh(self, script, timeout=180, check=True):
        """Run SCRIPT (with /tmp/lib.sh sourced) in the guest; its output. A non-zero exit fails the test."""
        t0 = time.monotonic()
        rc, out = self.vm.run(". /tmp/lib.sh\n" + script, timeout=timeout, check=False)
        if check and rc != 0:
            raise AssertionError(f"guest script exited {rc} after {time.monotonic() - t0:.1f} s:\n{script}"
                                 f"\n--- output:\n{out[-4000:]}"
                                 f"\n--- guest console:\n{self.vm.console(3000)}")
        return out

    def device(self):
        """An nbd device no earlier test of this boot touched (a failed test may leave one stuck)."""
        dev = f"/dev/nbd{next(self.holder.devices)}"
        self.devices.append(dev)
        return dev

    def mountpoint(self, name):
        path = f"/mnt/{name}"
        self.mounts.append(path)
        return path

    def cleanup(self):
        script = "for f in /tmp/*.stop.me; do [ -e \"$f\" ] && touch \"${f%.me}\"; done\nsleep 0.3\n"
        script += "".join(f"umount -l {m} 2>/dev/null\n" for m in self.mounts)
        script += "".join(f"nbd-client -d {d} >/dev/null 2>&1\n" for d in self.devices)
        script += "true\n"
        self.vm.run(script, timeout=60, check=False)


class VMHolder:
    """Boots the module's VM on first use, and again if a test left it unusable."""

    def __init__(self, parts, workdir):
        self.parts = parts
        self.workdir = workdir
        self.vm = None
        self.boots = 0
        self.boot_seconds = []
        self.devices = None

    def get(self):
        if self.vm is None:
            self.boots += 1
            qemu, kernel, initrd = self.parts
            self.vm = vmtest.VM(os.path.join(str(self.workdir), f"boot{self.boots}"), qemu, kernel, initrd, cpus=4)
            self.vm.start()
            self.boot_seconds.append(self.vm.boot_seconds)
            self.devices = itertools.count(0)
            self.vm.run(f"cat >/tmp/lib.sh <<'VMTEST_LIB'\n{GUEST_LIB}\nVMTEST_LIB\n", timeout=60)
        return Guest(self)

    def discard(self):
        if self.vm is not None:
            self.vm.stop(timeout=10)
            self.vm = None

    def close(self):
        self.discard()


@pytest.fixture(scope="module")
def vm_holder(tmp_path_factory):
    try:
        parts = vmtest.prepare()
    except vmtest.Unavailable as exc:
        pytest.skip(f"kernel NBD tests need a qemu VM: {exc}")
    holder = VMHolder(parts, tmp_path_factory.mktemp("vm"))
    t0 = time.monotonic()
    yield holder
    holder.close()
    print(f"\nkernel NBD VM: {holder.boots} boot(s) of {holder.boot_seconds and max(holder.boot_seconds):.1f} s max, "
          f"module {time.monotonic() - t0:.1f} s")


@pytest.fixture
def servers(tmp_path):
    """Start TcpServers; all killed at the end of the test (after the guest let go of them)."""
    made = []

    def make(data_dir, **kw):
        s = TcpServer(data_dir, tmp_path, **kw)
        made.append(s)
        return s.start()

    yield make
    for s in made:
        s.stop(signal.SIGKILL)


@pytest.fixture
def guest(vm_holder, servers):
    try:
        g = vm_holder.get()
    except vmtest.GuestError as exc:
        vm_holder.discard()
        raise AssertionError(f"the VM did not boot: {exc}") from None
    yield g
    try:
        g.cleanup()
    except vmtest.GuestError:
        vm_holder.discard()  # the next test boots a fresh one


def run(cmd, timeout=120, check=True):
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}\nstdout: {proc.stdout[-3000:]}\nstderr: {proc.stderr[-3000:]}")
    return proc


def volume(cli, name):
    return js(cli("volume", "show", name, "--json"))


def host_check(server, name, manifest, tmp_path):
    """Read the volume through libnbd (nbdcopy), e2fsck the image, and check every manifest file in it."""
    for tool in ("nbdcopy", "e2fsck", "debugfs"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} not installed (tools/setup installs libnbd-bin and e2fsprogs)")
    img = tmp_path / f"{name}.img"
    dump = tmp_path / f"{name}.files"
    run(["nbdcopy", server.uri(name), img])
    try:
        fsck = run(["e2fsck", "-fn", img], check=False)
        assert fsck.returncode == 0, f"host e2fsck -fn: {fsck.returncode}\n{fsck.stdout}\n{fsck.stderr}"
        dump.mkdir()
        run(["debugfs", "-R", f"rdump / {dump}", img])
        for sha, rel in manifest:
            with open(dump / rel, "rb") as f:
                assert hashlib.sha256(f.read()).hexdigest() == sha, f"{rel} differs on the host side"
    finally:
        img.unlink(missing_ok=True)
        shutil.rmtree(dump, ignore_errors=True)


def connection_bytes(port):
    """Bytes received by each established server-side connection on PORT (from ss -ti)."""
    out = run(["ss", "-tniH", "state", "established", f"( sport = :{port} )"]).stdout
    return [int(n) for n in re.findall(r"bytes_received:(\d+)", out)]


# ---- 1. attach, ext4, manifest, reattach, host-side check ------------------------


def test_ext4_attach_write_reattach_verify(guest, servers, data_dir, cli, tmp_path):
    cli("volume", "create", "k1", "--size", "1GiB", check=True)
    srv = servers(data_dir)
    dev, mnt = guest.device(), guest.mountpoint("k1")
    out = guest.sh(f"""
attach {srv.port} {dev} k1
echo SECTORS=$(cat /sys/block/{dev[5:]}/size)
echo LOGICAL_BLOCK=$(cat /sys/block/{dev[5:]}/queue/logical_block_size)
mkfs.ext4 -q {dev} || fail mkfs
mkdir -p {mnt} && mount {dev} {mnt} || fail mount
mkdir {mnt}/data
write_files {mnt} data/f 32 128 /tmp/k1.manifest || fail write_files
dd if=/dev/urandom of={mnt}/data/big bs=1M count=8 2>/dev/null && (cd {mnt} && sha256sum data/big) >>/tmp/k1.manifest
sync
umount {mnt} || fail umount
e2fsck -fn {dev} || fail "e2fsck -fn"
detach {dev}
cat /tmp/k1.manifest
""")
    v = values(out)
    assert int(v["SECTORS"]) * 512 == GiB, out
    assert v["LOGICAL_BLOCK"] == "4096", out
    manifest = parse_manifest(out)
    assert len(manifest) == 33, out
    show = volume(cli, "k1")
    assert not show["attached"], show
    assert show["allocated_bytes"] >= 12 * MiB, show

    # The host reads the same bytes: a clean filesystem holding every file.
    host_check(srv, "k1", manifest, tmp_path)

    # Reattach in the guest and verify the manifest there.
    guest.sh(f"""
attach {srv.port} {dev} k1
mount {dev} {mnt} || fail mount
(cd {mnt} && sha256sum -c /tmp/k1.manifest >/tmp/k1.check) || {{ cat /tmp/k1.check; fail "manifest"; }}
umount {mnt}
e2fsck -fn {dev} >/dev/null || fail "e2fsck -fn after reattach"
detach {dev}
""")


# ---- 2. multi-connection under parallel writers ---------------------------------


def test_multi_connection_parallel_writers(guest, servers, data_dir, cli, tmp_path):
    cli("volume", "create", "k2", "--size", "1GiB", check=True)
    srv = servers(data_dir)
    dev, mnt = guest.device(), guest.mountpoint("k2")
    guest.sh(f"""
attach {srv.port} {dev} k2 -C 4
mkfs.ext4 -q {dev} && mkdir -p {mnt} && mount {dev} {mnt} || fail mkfs/mount
""")
    shows = []

    def four_connections():
        shows.append(volume(cli, "k2"))
        return shows[-1]["attached"] and shows[-1]["connections"] == 4

    try:
        wait_for(four_connections, 30, interval=0.5, what="volume show to count 4 connections")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {shows[-1]}\n{srv.log()}") from None
    before = connection_bytes(srv.port)
    assert len(before) == 4, before
    # Four writers, one per guest CPU: blk-mq maps each CPU to its own hardware
    # queue, and nbd gives each queue its own connection.
    out = guest.sh(f"""
for w in 1 2 3 4; do
    mkdir -p {mnt}/w$w
    taskset -c $((w - 1)) sh -c ". /tmp/lib.sh; write_files {mnt} w$w/f 24 256 /tmp/k2.m$w" &
done
wait
cat /tmp/k2.m1 /tmp/k2.m2 /tmp/k2.m3 /tmp/k2.m4
""", timeout=240)
    manifest = parse_manifest(out)
    assert len(manifest) == 4 * 24, out
    after = connection_bytes(srv.port)
    moved = sorted(a - b for a, b in zip(after, before))
    print(f"multi-conn: bytes received per connection under the writers: {moved}")
    assert len(after) == 4, after
    assert sum(m > MiB for m in moved) >= 2, f"the writers used fewer than two of the four connections: {moved}"
    guest.sh(f"""
umount {mnt} || fail umount
e2fsck -fn {dev} >/dev/null || fail "e2fsck -fn"
detach {dev}
""")
    # Read back over a single connection, in the guest and on the host.
    guest.sh(f"""
attach {srv.port} {dev} k2
mount {dev} {mnt} || fail mount
cat /tmp/k2.m1 /tmp/k2.m2 /tmp/k2.m3 /tmp/k2.m4 >/tmp/k2.all
(cd {mnt} && sha256sum -c /tmp/k2.all >/tmp/k2.check) || {{ cat /tmp/k2.check; fail manifest; }}
umount {mnt}
detach {dev}
""")
    host_check(srv, "k2", manifest, tmp_path)


# ---- 3. fstrim gives the space back ----------------------------------------------


def test_fstrim_releases_physical_space(guest, servers, data_dir, cli):
    cli("volume", "create", "k3", "--size", "1GiB", check=True)
    srv = servers(data_dir)
    dev, mnt = guest.device(), guest.mountpoint("k3")
    guest.sh(f"""
attach {srv.port} {dev} k3
echo DISCARD_MAX=$(cat /sys/block/{dev[5:]}/queue/discard_max_bytes)
mkfs.ext4 -q {dev} && mkdir -p {mnt} && mount {dev} {mnt} || fail mkfs/mount
dd if=/dev/urandom of=/tmp/k3.rand bs=1M count=4 2>/dev/null
for f in 1 2 3 4; do for i in 1 2 3 4; do cat /tmp/k3.rand; done >{mnt}/big$f; done
sync
""")
    full = volume(cli, "k3")["allocated_bytes"]
    assert full >= 64 * MiB, full
    out = guest.sh(f"""
rm {mnt}/big*
sync
fstrim -v {mnt} || fail fstrim
sync
""")
    trimmed = volume(cli, "k3")["allocated_bytes"]
    print(f"fstrim: allocated {full >> 20} MiB -> {trimmed >> 20} MiB ({out.strip()})")
    assert trimmed <= full - 60 * MiB, (full, trimmed, out)
    guest.sh(f"""
umount {mnt}
e2fsck -fn {dev} >/dev/null || fail "e2fsck -fn"
detach {dev}
""")


# ---- 4. server restart under guest I/O --------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_server_restart_during_guest_writes(guest, servers, data_dir, cli, tmp_path, sig):
    name = f"k4{sig.name.lower()}"
    cli("volume", "create", name, "--size", "1GiB", check=True)
    srv = servers(data_dir)
    dev, dev2 = guest.device(), guest.device()
    mnt = guest.mountpoint(name)
    st = f"/tmp/{name}"
    # nbd-client 3.24 (Debian 12) honours -persist only with the ioctl interface (-L): in
    # netlink mode it configures the device and exits. Even then it reconnects only when the
    # kernel gives up on a request (the -t 60 timeout in NBD_OPTS), not when the server closes
    # the connection, so the report below records whether the guest's writes resumed.
    clients = values(guest.sh(f"""
attach {srv.port} {dev} {name} -L -persist
mkfs.ext4 -q {dev} && mkdir -p {mnt} && mount {dev} {mnt} || fail mkfs/mount
mkdir {mnt}/d
write_files {mnt} d/pre 8 256 {st}.manifest || fail write_files
echo CLIENTS=$(pidof nbd-client | wc -w)
touch {st}.stop.me
setsid sh -c ". /tmp/lib.sh; writer {mnt} d/w {st}.manifest {st}" >/dev/null 2>&1 </dev/null &
"""))["CLIENTS"]

    def synced():
        return int(guest.sh(f"cat {st}.synced 2>/dev/null || echo 0").strip() or 0)

    wait_for(lambda: synced() >= 10, 120, interval=0.5, what="the guest writer to sync 10 files")
    before = synced()
    t0 = time.monotonic()
    code = srv.stop(sig)
    stopped = time.monotonic() - t0
    if sig == signal.SIGTERM:
        assert code == 0, srv.log()
    srv.start()
    down = time.monotonic() - t0
    at_restart = synced()
    time.sleep(8)  # the guest's chance to resume
    out = guest.sh(f"""
echo SYNCED=$(cat {st}.synced)
echo FAILED=$(grep -c failed {st}.err)
echo RO=$(grep -c " {mnt} ext4 ro" /proc/mounts)
echo WRITABLE=$( (echo probe >{mnt}/probe && sync {mnt}/probe) 2>/dev/null && echo yes || echo no)
echo CLIENT=$(pidof nbd-client | wc -w)
dmesg | grep -E "{dev[5:]}: |\\({dev[5:]}\\)" | grep -v -e "mounted filesystem" -e "capacity change" | sed "s/^\\[[ 0-9.]*\\] //" | awk '!seen[$0]++' | sed -n "s/^/KERNEL=/p" | head -8
touch {st}.stop
i=0; while [ ! -e {st}.done ] && [ $i -lt 100 ]; do sleep 0.2; i=$((i + 1)); done
umount {mnt} 2>/dev/null || umount -l {mnt}
detach {dev}
""")
    v = values(out)
    after = int(v["SYNCED"])
    resumed = after > at_restart
    report = (f"restart {sig.name}: server stopped in {stopped:.2f} s, serving again after {down:.2f} s; "
              f"guest had synced {before} files before, {at_restart} at the restart, {after} 8 s later "
              f"(writes resumed: {'yes' if resumed else 'no'}); failed writes: {v['FAILED']}; "
              f"filesystem mounted {'ro' if v['RO'] != '0' else 'rw'}, accepts a synced write: {v['WRITABLE']}; "
              f"nbd-client processes: {clients} before, {v['CLIENT']} after; kernel said: "
              + "; ".join(re.findall(r"KERNEL=(.*)", out)))
    print(report)

    # The gate: after reattaching, the filesystem checks clean and every file the guest synced verifies.
    out = guest.sh(f"""
attach {srv.port} {dev2} {name}
mount {dev2} {mnt} || fail "mount after restart"
(cd {mnt} && sha256sum -c {st}.manifest >{st}.check) || {{ grep -v ': OK$' {st}.check; fail "synced files lost"; }}
echo VERIFIED=$(grep -c ': OK$' {st}.check)
umount {mnt}
e2fsck -fn {dev2} >{st}.fsck 2>&1 || {{ cat {st}.fsck; fail "e2fsck -fn after restart"; }}
detach {dev2}
cat {st}.manifest
""")
    manifest = parse_manifest(out)
    assert int(values(out)["VERIFIED"]) == len(manifest) >= 8 + before, out
    host_check(srv, name, manifest, tmp_path)


# ---- 5. a volume provisioned while the guest is up -----------------------------------


def test_volume_provisioned_while_guest_attached(guest, servers, data_dir, cli, tmp_path):
    cli("volume", "create", "k5a", "--size", "1GiB", check=True)
    srv = servers(data_dir)
    pid = srv.proc.pid
    dev_a, dev_b = guest.device(), guest.device()
    mnt_a, mnt_b = guest.mountpoint("k5a"), guest.mountpoint("k5b")
    guest.sh(f"""
attach {srv.port} {dev_a} k5a
mkfs.ext4 -q {dev_a} && mkdir -p {mnt_a} && mount {dev_a} {mnt_a} || fail mkfs/mount
""")
    # Provisioned now, with the server serving and the guest attached: no restart anywhere.
    cli("volume", "create", "k5b", "--size", "256MiB", check=True)
    out = guest.sh(f"""
nbd-client -l $HOST {srv.port} >/tmp/k5.list 2>&1; grep -q "^k5b:" /tmp/k5.list || {{ cat /tmp/k5.list; fail "k5b not listed"; }}
attach {srv.port} {dev_b} k5b
echo SECTORS=$(cat /sys/block/{dev_b[5:]}/size)
mkfs.ext4 -q {dev_b} && mkdir -p {mnt_b} && mount {dev_b} {mnt_b} || fail mkfs/mount
write_files {mnt_b} f 8 128 /tmp/k5b.manifest || fail write_files
write_files {mnt_a} f 8 128 /tmp/k5a.manifest || fail "write_files on the first volume"
umount {mnt_b} && umount {mnt_a} || fail umount
e2fsck -fn {dev_b} >/dev/null || fail "e2fsck -fn k5b"
e2fsck -fn {dev_a} >/dev/null || fail "e2fsck -fn k5a"
detach {dev_b}
detach {dev_a}
cat /tmp/k5b.manifest
""")
    assert int(values(out)["SECTORS"]) * 512 == 256 * MiB, out
    assert srv.proc.pid == pid and srv.proc.poll() is None
    host_check(srv, "k5b", parse_manifest(out), tmp_path)
