"""How the experiment tool writes and reads its files so that a kill, a full disk or a
second run on the same folder never leaves a half-written or mixed result.

- Whole files (``meta.json``, ``bench.json``, tables, plots, checkpoints) are written to
  ``NAME.tmp`` beside the target and renamed over it (:func:`atomic_write`): a reader sees
  the old file or the new one, never a torn one. :func:`remove_stale_temporaries` deletes
  ``*.tmp`` left by a killed writer.
- Logs are appended one JSON line at a time; :func:`read_log` keeps every whole line and
  says which lines were torn.
- :class:`FolderLock` makes a results folder one writer's at a time.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write", "write_json", "read_json", "remove_stale_temporaries",
           "FolderLock", "FolderBusy", "Log", "read_log", "check_output_folder"]

TMP_SUFFIX = ".tmp"


def _reason(err: BaseException) -> str:
    """A one-line reason for a failed write (torch's file writer reports a full disk as
    ``enforce fail at inline_container.cc`` with a C++ trace)."""
    if isinstance(err, OSError) and err.errno is not None:
        return os.strerror(err.errno)
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return first[:200]


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` through ``write(file)`` into ``path.tmp``, flush it to disk and
    rename it over ``path``; on any failure the temporary is removed and ``path`` is as it
    was.

    Raises:
        OSError: the write failed (full disk, no permission...), naming ``path``.
    """
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    target = None
    try:
        with open(tmp, "wb") as f:
            target = _Recording(f)
            write(target)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        try:
            tmp.unlink()
        except OSError:
            pass
        if isinstance(err, (KeyboardInterrupt, SystemExit)):
            raise
        # torch's writer turns the file's OSError into "unexpected pos": use the OSError.
        cause = target.error if target is not None and target.error is not None else err
        code = cause.errno if isinstance(cause, OSError) else errno.EIO
        raise OSError(code, f"cannot write {path}: {_reason(cause)}") from err


class _Recording:
    """A file that remembers the first ``OSError`` its ``write`` raised."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """``obj`` as indented JSON, atomically."""
    text = (json.dumps(obj, indent=2) + "\n").encode()
    atomic_write(path, lambda f: f.write(text))


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """The JSON object in ``path``.

    Raises:
        ValueError: the file is not JSON (naming the file, line and column).
    """
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path} is not valid JSON ({e})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{what} {path} is not valid JSON (not UTF-8 text)") from None
    except IsADirectoryError:
        raise ValueError(f"{what} {path} is a folder, not a JSON file") from None


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete ``*.tmp`` files in ``folder`` (left by a writer killed mid-write); return them."""
    removed = []
    folder = Path(folder)
    if folder.is_dir():
        for tmp in folder.glob("*" + TMP_SUFFIX):
            if tmp.is_file():
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
    return removed


def check_output_folder(path: str | os.PathLike, option: str = "--out") -> Path:
    """``path`` as a folder this process may write (created if missing).

    Raises:
        ValueError: ``path`` is a file, or a folder that cannot be written.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option} {path} is a file, not a folder")
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"{option} {path}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path}: {probe} is not writable")
    return path


# ---------------------------------------------------------------------- lock
class FolderBusy(RuntimeError):
    """Another live process holds the folder's lock."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


@dataclass
class FolderLock:
    """``FOLDER/.lock``: created exclusively, holding ``{"pid", "host", "started"}``.

    A second process finds it and fails with :class:`FolderBusy` naming the holder; a
    lock whose process is dead (same host) is taken over with a note in :attr:`notes`.
    """

    folder: Path
    notes: list[str] = field(default_factory=list)
    held: bool = False

    @property
    def path(self) -> Path:
        return Path(self.folder) / ".lock"

    def acquire(self) -> FolderLock:
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None:  # being written this instant, or garbage: look again
                    time.sleep(0.05)
                    holder = self._holder()
                if holder is not None and not self._stale(holder):
                    raise FolderBusy(
                        f"{self.folder} is in use by pid {holder.get('pid')} on "
                        f"{holder.get('host')} (started {holder.get('started')}); wait for "
                        f"it to finish or use another --out (lock file: {self.path})"
                    ) from None
                who = ("an unreadable lock" if holder is None else
                       f"pid {holder.get('pid')} on {holder.get('host')} (started "
                       f"{holder.get('started')}), which is no longer running")
                self.notes.append(f"took over the lock of {self.folder} from {who}")
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise FolderBusy(f"could not lock {self.folder} ({self.path} keeps reappearing)")

    def _holder(self) -> dict[str, Any] | None:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) else None

    @staticmethod
    def _stale(holder: dict[str, Any]) -> bool:
        pid = holder.get("pid")
        if holder.get("host") != socket.gethostname() or not isinstance(pid, int):
            return False  # another machine's process: cannot tell, so it holds
        return not _alive(pid)

    def release(self) -> None:
        if self.held:
            holder = self._holder()
            if holder is not None and holder.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


# ---------------------------------------------------------------------- logs
@dataclass
class Log:
    """The whole records of a ``log.jsonl`` and the 1-based numbers of torn lines (a
    line that is not a JSON object; the last one is what a kill mid-write leaves)."""

    records: list[dict[str, Any]]
    torn: list[int]


def read_log(path: str | os.PathLike) -> Log:
    """Read a JSON-lines log, keeping every whole record."""
    records, torn = [], []
    with open(path, errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                torn.append(number)
                continue
            if isinstance(record, dict):
                records.append(record)
            else:
                torn.append(number)
    return Log(records, torn)
