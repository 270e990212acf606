"""A directory used by one process at a time: a run directory while a trainer writes it, a data
directory while it is prepared.

The lock is a file holding the owner's pid and host, created atomically (``O_EXCL``). A second
process refuses (or, with ``wait``, waits) with a line naming the holder; a lock left by a
process that no longer runs on this host is taken over.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from lmforge.errors import LMForgeError

LOCK = ".lmforge.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


class DirectoryLock:
    """``with DirectoryLock(path, "training run"):`` holds ``path/.lmforge.lock`` for the block."""

    def __init__(self, directory: str | Path, what: str, wait: bool = False, poll: float = 0.2):
        self.directory, self.what, self.wait, self.poll = Path(directory), what, wait, poll
        self.path = self.directory / LOCK
        self.held = False
        self.created_directory = False

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def _make_directory(self) -> None:
        try:
            self.created_directory = not self.directory.exists()
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise LMForgeError(f"cannot create {self.directory} ({e.strerror}); choose a writable directory") from None

    def acquire(self) -> "DirectoryLock":
        self._make_directory()
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileNotFoundError:  # the holder made the directory, wrote nothing and removed it: make it again
                self._make_directory()
                continue
            except FileExistsError:
                holder = self._holder()
                if holder is None:  # being written this instant, or unreadable: look again
                    time.sleep(self.poll)
                    holder = self._holder()
                if holder == me:  # this process holds it already (an outer block)
                    return self
                stale = holder is None or (holder.get("host") == me["host"] and not _alive(int(holder.get("pid", -1))))
                if stale:
                    self.path.unlink(missing_ok=True)  # its process is gone: take the lock over
                    continue
                if self.wait:
                    time.sleep(self.poll)
                    continue
                raise LMForgeError(
                    f"{self.directory} is in use by another {self.what} (pid {holder.get('pid')} on "
                    f"{holder.get('host')}); wait for it to finish, stop it, or choose another directory") from None
            except OSError as e:
                raise LMForgeError(f"cannot write {self.path} ({e.strerror}); choose a writable directory") from None
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(me, f)
            self.held = True
            return self

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
            if self.created_directory:  # a run refused before it wrote anything leaves no trace
                try:
                    self.directory.rmdir()
                except OSError:  # not empty: the run wrote its files
                    pass

    def __enter__(self) -> "DirectoryLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
