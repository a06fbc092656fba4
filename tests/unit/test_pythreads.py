import threading

from blockd import pythreads


def test_threads_started_by_python_are_left_alone():
    before = pythreads.kept()
    pythreads.keep()  # the main thread
    t = threading.Thread(target=pythreads.keep)
    t.start()
    t.join()
    assert pythreads.kept() == before
