"""Per-unit locks so that two jobs never compute (and commit) the same unit at once.

A lock is a file `units/<unit>.lock.<generation>` created exclusively and atomically
(create_exclusive) holding {host, pid, token}. While a job holds it, a background thread refreshes
its mtime (heartbeat). A lock is stale when its holder is gone: same host and the pid no longer
exists, or no heartbeat for `stale_after` seconds.

Breaking a stale lock never deletes it: the next job creates generation g+1 with O_EXCL, so when
two jobs find the same stale lock only one of them wins (no check-then-delete race). A holder that
sees a higher generation appear has lost the unit and does not commit. Files are only ever removed
from the top generation down, so probing 0, 1, 2 ... until a name is missing finds the highest.
Second line of defence: commits are idempotent (same inputs, same bytes), so even two holders of
one unit would leave a whole, correct unit.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from data_shards.files import fsync_file, pid_alive, temp_path

from .layout import UNITS_DIR, Unit, unit_json_path

HEARTBEAT_SECONDS = 20.0
DEFAULT_STALE_AFTER = 300.0


def _lock_path(root: Path, unit: Unit, generation: int) -> Path:
    return Path(root) / UNITS_DIR / f"{unit.name}.lock.{generation}"


def create_exclusive(path: Path, text: str) -> bool:
    """Create `path` holding `text` unless it exists; atomic: readers never see it partly written.
    Written aside, then hard-linked into place (link fails if the name exists: NFS-safe); on file
    systems without hard links, falls back to O_CREAT|O_EXCL and a write."""
    path = Path(path)
    tmp = temp_path(path)
    tmp.write_text(text)
    fsync_file(tmp)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(text)
        fsync_file(path)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def lock_is_stale(path: Path, stale_after: float) -> bool:
    try:
        age = time.time() - path.stat().st_mtime
        info = json.loads(path.read_text() or "{}")
    except FileNotFoundError:
        return True
    except (json.JSONDecodeError, UnicodeDecodeError):
        info = {}                    # only possible with the O_EXCL fallback: age decides
    holder_dead = info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int) \
        and not pid_alive(info["pid"])
    return holder_dead or age > stale_after


@dataclass
class UnitLock:
    root: Path
    unit: Unit
    generation: int
    token: str
    lost: bool = False

    @property
    def path(self) -> Path:
        return _lock_path(self.root, self.unit, self.generation)

    def _broken(self) -> bool:
        return _lock_path(self.root, self.unit, self.generation + 1).exists()

    def still_held(self) -> bool:
        """False once another job broke this lock (a higher generation exists)."""
        self.lost = self.lost or self._broken()
        return not self.lost

    def touch(self) -> None:
        try:
            os.utime(self.path)
        except FileNotFoundError:
            self.lost = True
        self.still_held()

    def release(self) -> None:
        """Remove this generation and the stale ones below it, top down; keep all if we lost it."""
        if not self._broken():
            for g in range(self.generation, -1, -1):
                _lock_path(self.root, self.unit, g).unlink(missing_ok=True)


def try_lock(root: Path, unit: Unit, stale_after: float = DEFAULT_STALE_AFTER,
             job: str = "") -> UnitLock | None:
    """The unit's lock, or None when the unit is done or a live job holds it."""
    root = Path(root)
    for _ in range(100):
        if unit_json_path(root, unit).exists():
            return None
        top = -1                                          # the highest existing generation
        while _lock_path(root, unit, top + 1).exists():
            top += 1
        if top >= 0 and not lock_is_stale(_lock_path(root, unit, top), stale_after):
            return None
        lock = UnitLock(root, unit, top + 1, uuid.uuid4().hex)
        info = {"host": socket.gethostname(), "pid": os.getpid(), "token": lock.token, "job": job,
                "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        if not create_exclusive(lock.path, json.dumps(info)):
            continue                  # another job took this generation first: look again
        if unit_json_path(root, unit).exists():    # committed between our check and the lock
            lock.release()
            return None
        return lock
    return None


@dataclass
class LockKeeper:
    """Background heartbeat for the locks a job holds."""
    interval: float = HEARTBEAT_SECONDS
    held: dict[str, UnitLock] = field(default_factory=dict)

    def __post_init__(self):
        self._guard = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="unit-lock-heartbeat", daemon=True)
        self._thread.start()

    def add(self, lock: UnitLock) -> None:
        with self._guard:
            self.held[lock.unit.name] = lock

    def discard(self, lock: UnitLock) -> None:
        with self._guard:
            self.held.pop(lock.unit.name, None)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with self._guard:
                locks = list(self.held.values())
            for lock in locks:
                lock.touch()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        with self._guard:
            locks = list(self.held.values())
            self.held.clear()
        for lock in locks:
            lock.release()
