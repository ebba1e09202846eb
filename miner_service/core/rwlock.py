"""A readers-writer lock: many concurrent searches, exclusive writes, writers never starved."""

import threading
from contextlib import contextmanager


class ReadWriteLock:
    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0
        self._readers_waiting = 0

    def wait_for_writers(self, count: int, timeout_s: float | None = None) -> bool:
        """Block until at least `count` writers wait for this lock (tests). Returns whether they do."""
        with self._cond:
            return self._cond.wait_for(lambda: self._writers_waiting >= count, timeout_s)

    def wait_for_readers(self, count: int, timeout_s: float | None = None) -> bool:
        """Block until at least `count` readers wait for this lock (tests). Returns whether they do."""
        with self._cond:
            return self._cond.wait_for(lambda: self._readers_waiting >= count, timeout_s)

    @contextmanager
    def read(self):
        with self._cond:
            if self._writer or self._writers_waiting:
                self._readers_waiting += 1
                self._cond.notify_all()  # wakes wait_for_readers
                while self._writer or self._writers_waiting:
                    self._cond.wait()
                self._readers_waiting -= 1
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextmanager
    def write(self):
        with self._cond:
            self._writers_waiting += 1
            self._cond.notify_all()  # wakes wait_for_writers
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()
