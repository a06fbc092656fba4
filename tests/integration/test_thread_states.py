"""nbdkit worker threads keep one Python thread state each (blockd/pythreads.py), and the states of
threads that exited with their connection are deleted, not piled up."""

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
