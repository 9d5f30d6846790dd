"""Locks keyed by a name: one per instance uuid, one per image id."""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class KeyedLock:
    """``with locks.hold(key):`` serializes the threads of this process that use the same key.

    Entries exist only while somebody holds or waits for them, so a worker that sees thousands of
    instances keeps no lock per instance it ever saw.
    """

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, int]] = {}

    @contextmanager
    def hold(self, key: str) -> Iterator[None]:
        with self._guard:
            lock, users = self._locks.get(key, (threading.Lock(), 0))
            self._locks[key] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            self._forget(key)

    @contextmanager
    def try_hold(self, key: str) -> Iterator[bool]:
        """``with locks.try_hold(key) as held:`` the lock of ``key`` if nobody holds it (True), else
        at once False; never waits."""
        with self._guard:
            if key in self._locks:
                held = False
            else:
                lock = threading.Lock()
                lock.acquire()
                self._locks[key] = (lock, 1)
                held = True
        if not held:
            yield False
            return
        try:
            yield True
        finally:
            self._forget(key).release()

    def _forget(self, key: str) -> threading.Lock:
        """One user fewer of ``key``'s lock (the last one removes it); returns the lock."""
        with self._guard:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)
            return lock

    def __len__(self) -> int:
        with self._guard:
            return len(self._locks)

    def held(self) -> list[str]:
        """The keys somebody holds or waits for now, sorted."""
        with self._guard:
            return sorted(self._locks)


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created if missing), against other processes on the host."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the last descriptor releases the lock


@contextmanager
def try_file_lock(path: Path) -> Iterator[bool]:
    """An exclusive ``flock`` on ``path`` if no other process holds one (True), else False at once."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)
