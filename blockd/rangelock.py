"""A byte-range lock: shared for reads, exclusive for writes.

Overlapping writes are serialized (so a block's data and checksum change
together), reads of a range being written wait, and non-overlapping requests
never wait for each other.  Held ranges are few (one per in-flight request),
so a linear scan under one condition variable is cheaper than a tree.
"""

import threading


class RangeLock:
    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._held = []  # [start, end, exclusive]

    def _conflicts(self, start, end, exclusive):
        for s, e, x in self._held:
            if s < end and start < e and (x or exclusive):
                return True
        return False

    def acquire(self, start, end, exclusive):
        entry = [start, end, exclusive]
        with self._cond:
            while self._conflicts(start, end, exclusive):
                self._cond.wait()
            self._held.append(entry)
        return entry

    def release(self, entry):
        with self._cond:
            self._held.remove(entry)
            self._cond.notify_all()

    def held(self):
        with self._cond:
            return len(self._held)
