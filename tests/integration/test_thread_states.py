"""nbdkit worker threads keep one Python thread state each (blockd/pythreads.py), and the states of
threads that exited with their connection are deleted, not piled up; every thread of the server runs
under the scheduling policy `blockd serve --cpu-policy` chose."""

import os

from conftest import control

THREADS = 4


def test_thread_states_kept_per_worker_and_deleted_after_close(data_dir, server_factory, cli):
    cli("volume", "create", "vol0", "--size", "16MiB", check=True)
    srv = server_factory(data_dir, threads=THREADS).start()
    expected = {}
    deleted_before = control(data_dir, {"op": "ping"})["thread_states_deleted"]
    for rnd in range(6):
        h = srv.connect("vol0")
        try:
            for i in range(64):  # many in flight: every worker thread of the connection takes some
                offset = ((rnd * 64 + i) * 12288) % (16 << 20)
                data = os.urandom(4096)
                expected[offset] = data
                h.aio_pwrite(data, offset)
            while h.aio_in_flight() > 0:
                h.poll(-1)
            h.flush()
            for offset, data in expected.items():
                assert h.pread(4096, offset) == data
            states = control(data_dir, {"op": "ping"})["thread_states"]
            # This connection's workers, plus at most the previous connection's (deleted when a new
            # worker keeps its state): never one per request or per connection ever made.
            assert 1 <= states <= 2 * THREADS, states
        finally:
            h.shutdown()
    assert control(data_dir, {"op": "ping"})["thread_states_deleted"] - deleted_before >= THREADS
    assert srv.stop() == 0


def _policies(pid):
    out = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out.add(os.sched_getscheduler(int(tid)))
        except ProcessLookupError:
            pass  # exited meanwhile
    return out


def test_every_server_thread_runs_under_the_chosen_cpu_policy(data_dir, server_factory, cli):
    cli("volume", "create", "vol0", "--size", "1MiB", check=True)
    for extra, policy in (((), os.SCHED_BATCH), (("--cpu-policy", "normal"), os.SCHED_OTHER)):
        srv = server_factory(data_dir, extra=extra).start()
        h = srv.connect("vol0")  # a connection's worker threads exist now
        try:
            h.pwrite(b"x" * 4096, 0)
            assert _policies(srv.proc.pid) == {policy}  # the supervisor
            assert _policies(srv.nbdkit_pid()) == {policy}
        finally:
            h.shutdown()
        assert srv.stop() == 0
