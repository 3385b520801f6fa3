"""Output folders of training runs: one run per folder, checked before training starts.

:class:`RunDir` claims a folder for one run: it creates the folder if needed, proves it is
writable by writing a lock file into it, and holds an exclusive ``flock`` on that file for
as long as the run lasts (the kernel releases it when the process ends, however it ends,
so a killed run never leaves a stale lock). A second run on the same folder fails at once
with a message naming the run that holds it. A folder that already holds an earlier run's
results is refused unless the run continues it (``--resume`` of a checkpoint in it) or
the caller asked to overwrite it. Temporary files left by a save that was killed halfway
are deleted once the folder is ours.

:func:`new_run_dir` makes the default folder ``runs/<date-time>``, created exclusively so
that two runs started in the same second get different folders (``...-2``, ``-3``, ...).
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import sys
import time
from pathlib import Path

__all__ = [
    "LOCK_NAME",
    "RESULT_FILES",
    "RunDir",
    "RunDirError",
    "new_run_dir",
    "remove_if_unused",
]

LOCK_NAME = ".fastmlp.lock"
#: What a run writes; a folder holding any of these holds an earlier run's results.
RESULT_FILES = ("metrics.json", "last.pt", "best.pt", "curves.png", "confusion.png")


class RunDirError(RuntimeError):
    """The output folder cannot be used for this run (the message says why and what to do)."""


def new_run_dir(root: str | os.PathLike[str] = "runs") -> Path:
    """Create and return a new, empty ``root/<YYYYmmdd-HHMMSS>[-N]`` folder.

    ``mkdir`` without ``exist_ok`` is atomic: of two runs started in the same second one
    gets the plain name and the other the next free ``-N`` suffix.
    """
    root = Path(root)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"cannot create {root}/: {_reason(e)}; pass --out DIR") from None
    for n in range(1, 10_000):
        path = root / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        except OSError as e:
            raise RunDirError(f"cannot create {path}: {_reason(e)}; pass --out DIR") from None
        return path
    raise RunDirError(f"no free folder name for {root}/{stamp}-N; pass --out DIR")


def _reason(e: OSError) -> str:
    return e.strerror or str(e)


class RunDir:
    """An output folder owned by this run until :meth:`release` (or the ``with`` block ends).

    Args:
        path: the folder (created if missing).
        resume: the checkpoint this run continues, if any; when it lies in ``path``, the
            folder's earlier results are this run's own.
        overwrite: replace an earlier run's results in ``path`` (they are deleted now).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        resume: str | os.PathLike[str] | None = None,
        overwrite: bool = False,
    ) -> None:
        self.path = Path(path)
        self.resume = Path(resume) if resume is not None else None
        self.overwrite = overwrite
        self._fd: int | None = None
        self._created = False

    def __enter__(self) -> RunDir:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        """Claim the folder; raises :class:`RunDirError` with a one-line reason."""
        path = self.path
        if path.exists() and not path.is_dir():
            raise RunDirError(f"output folder {path} is a file, not a folder; choose another --out")
        if not path.exists():
            try:
                path.mkdir(parents=True)
                self._created = True
            except FileExistsError:
                pass  # made by someone else meanwhile: the lock below decides
            except OSError as e:
                raise RunDirError(
                    f"cannot create output folder {path}: {_reason(e)}; choose another --out"
                ) from None
        self._lock()
        try:
            self._check_earlier_results()
            self._remove_stale_temporaries()
        except BaseException:
            self.release()
            raise

    def _lock(self) -> None:
        lock = self.path / LOCK_NAME
        while True:
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise RunDirError(
                    f"output folder {self.path} is not writable ({_reason(e)}); "
                    "choose another --out"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _read_holder(fd)
                os.close(fd)
                if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise RunDirError(
                        f"output folder {self.path} is in use by another run ({holder}); "
                        "wait for it to finish or choose another --out"
                    ) from None
                raise RunDirError(f"cannot lock {lock}: {_reason(e)}") from None
            # The lock file may have been removed (by a run that created the folder and
            # gave it up empty) between our open and our lock: then retry on the new file.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(lock))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self._fd = fd
        me = f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%F %T')}"
        command = " ".join(["fastmlp", *sys.argv[1:]]) if sys.argv[1:] else sys.argv[0]
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{me}: {command}\n".encode())
            os.fsync(fd)
        except OSError as e:
            self.release()
            raise RunDirError(
                f"output folder {self.path} is not writable ({_reason(e)}); choose another --out"
            ) from None

    def _check_earlier_results(self) -> None:
        found = [name for name in RESULT_FILES if (self.path / name).exists()]
        if not found:
            return
        resuming_here = self.resume is not None and _same_dir(self.resume.parent, self.path)
        if resuming_here:
            return
        if self.overwrite:
            for name in found:
                (self.path / name).unlink()
            return
        raise RunDirError(
            f"output folder {self.path} already holds an earlier run ({', '.join(found)}); "
            f"continue it with --resume {self.path / 'last.pt'}, replace it with --overwrite, "
            "or choose another --out"
        )

    def _remove_stale_temporaries(self) -> None:
        # Written by checkpoint.save_checkpoint / save_json as ".<name>.<random>.tmp" and
        # renamed over <name> when complete; any left now belong to a save that was killed.
        for tmp in self.path.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)

    def release(self) -> None:
        """Give the folder up; one this run created and left empty is removed again."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if self._created and {p.name for p in self.path.iterdir()} == {LOCK_NAME}:
                # Nothing was written (the run failed before its first epoch): no trace.
                (self.path / LOCK_NAME).unlink(missing_ok=True)
                self.path.rmdir()
        except OSError:
            pass  # the folder changed under us; leaving it is harmless
        finally:
            os.close(fd)  # closing releases the flock


def remove_if_unused(path: str | os.PathLike[str]) -> None:
    """Remove ``path`` if it holds nothing but a released lock file (a default run folder
    whose run failed before writing anything)."""
    path = Path(path)
    try:
        names = {p.name for p in path.iterdir()}
    except OSError:
        return
    if names <= {LOCK_NAME}:
        (path / LOCK_NAME).unlink(missing_ok=True)
        try:
            path.rmdir()
        except OSError:
            pass


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text.splitlines()[0] if text else "holder unknown"


def _same_dir(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()
