import threading

from blockd import pythreads


def test_threads_started_by_python_are_left_alone():
    before = pythreads.kept()
    pythreads.keep()  # the main thread
    t = threading.Thread(target=pythreads.keep)
    t.start()
    t.join()
    assert pythreads.kept() == before


def test_exited_names_dead_thread_ids_and_the_callers_own_earlier_entry():
    me = threading.get_native_id()
    ready, stop = threading.Event(), threading.Event()
    ids = []

    def live():
        ids.append(threading.get_native_id())
        ready.set()
        stop.wait(30)

    t = threading.Thread(target=live)
    t.start()
    ready.wait(30)
    try:
        gone = 2**22 + 12345  # above any pid_max: no such thread
        assert sorted(pythreads.exited([me, ids[0], gone], me)) == sorted([me, gone])
    finally:
        stop.set()
        t.join()
