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
        self._waiters = 0  # notify only when someone waits: the common case is no contention

    def _conflicts(self, start, end, exclusive):
        for s, e, x in self._held:
            if s < end and start < e and (x or exclusive):
                return True
        return False

    def acquire(self, start, end, exclusive):
        entry = [start, end, exclusive]
        with self._cond:
            if self._held and self._conflicts(start, end, exclusive):
                self._waiters += 1
                try:
                    while self._conflicts(start, end, exclusive):
                        self._cond.wait()
                finally:
                    self._waiters -= 1
            self._held.append(entry)
        return entry

    def release(self, entry):
        with self._cond:
            self._held.remove(entry)
            if self._waiters:
                self._cond.notify_all()

    def held(self):
        with self._cond:
            return len(self._held)
