"""The output folder of a few-shot run: checked before any work, filled all at once.

A run's final files (the adapter, the model card, results.json) are written to a staging folder
inside the output folder and moved into place only when all of them are complete, results.json
last: an output folder holds one complete run, or the previous run untouched and nothing of the
new one. A failure while writing (a full disk, a quota) removes the staging folder; the
folder is checked for writability before training, so that a read-only folder is found before
the work is done.

One run at a time: a run holds the folder's lock (`RunLock`, an exclusive `flock` on
`<output dir>/.run.lock`, which records who holds it) from its first checks to its last file, and a
second run into the same folder is refused at once, naming the first. The operating system drops
the lock of a process that ends in any way (kill -9 included), so a lock file left by a dead run
is simply taken over.
"""

import errno
import json
import os
import shlex
import shutil
import socket
import sys
import tempfile
import time

from .record import RESULTS_FILE

try:
    import fcntl
except ImportError:  # Windows: no flock
    fcntl = None

CHECKPOINTS = "checkpoints"
STAGING = ".incoming"
LOCK_FILE = ".run.lock"
# Entries of an output folder that are not part of any run's results.
_BOOKKEEPING = (STAGING, LOCK_FILE)
# The files a run writes, in the order they are moved into place: results.json, which marks a
# complete run, goes last.
RUN_FILES = ("adapter_model.safetensors", "adapter_config.json", "README.md", RESULTS_FILE)


class OutputDirError(ValueError):
    """The output folder cannot take this run (not empty, not a folder, not writable, in use)."""


class OutputDirInUseError(OutputDirError):
    """Another run holds the output folder's lock. The message names it (pid, host, start, command)."""


def _describe_holder(output_dir: str, holder: dict | None) -> str:
    if holder:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
        who = f"pid {holder.get('pid')} on {holder.get('host')}, started {started}"
        if holder.get("command"):
            who += f": {holder['command']}"
    else:
        who = "details not yet written"
    return (f"--output-dir {output_dir} is in use by another run ({who}). Wait for it to end, or choose "
            "another --output-dir.")


def _read_holder(fd: int) -> dict | None:
    try:
        text = os.pread(fd, 1 << 16, 0).decode("utf-8", "replace")
        holder = json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return False
        raise
    return True


def lock_holder(output_dir: str) -> dict | None:
    """Returns what the run holding `output_dir`'s lock recorded (`pid`, `host`, `started`, `command`;
    `{}` if it has not written it yet), or None when no live run holds it. Takes nothing."""
    path = os.path.join(output_dir, LOCK_FILE)
    if fcntl is None or not os.path.isfile(path):
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        if _try_flock(fd):
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        return _read_holder(fd) or {}
    finally:
        os.close(fd)


class RunLock:
    """The exclusive lock of one run on its output folder, held until `release` (or the end of a
    `with` block, or of the process).

    `RunLock.acquire(output_dir)` creates the folder if needed (and `release` removes it again if
    the run left it empty), takes the lock without waiting and records the holder's pid, host, start
    time and command line in the lock file, where a refused run reads them.
    """

    def __init__(self, output_dir: str, fd: int | None, created: bool):
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, LOCK_FILE)
        self._fd = fd
        self._created = created

    @classmethod
    def acquire(cls, output_dir: str, command: str | None = None) -> "RunLock":
        """Takes the lock of `output_dir`.

        Raises:
            OutputDirInUseError: another live run holds it (named in the message).
        """
        created = not os.path.isdir(output_dir)
        os.makedirs(output_dir, exist_ok=True)
        if fcntl is None:
            return cls(output_dir, None, created)
        path = os.path.join(output_dir, LOCK_FILE)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            if not _try_flock(fd):
                holder = _read_holder(fd)
                os.close(fd)
                raise OutputDirInUseError(_describe_holder(output_dir, holder))
            # The run that held it may have removed the file between our open and our lock: then the
            # lock is on a file nobody else will open, and the path must be opened again.
            try:
                current = os.stat(path)
            except FileNotFoundError:
                current = None
            if current is not None and os.path.samestat(os.fstat(fd), current):
                break
            os.close(fd)
        holder = {
            "pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
            "command": command if command is not None else shlex.join(sys.argv),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode("utf-8"), 0)
        return cls(output_dir, fd, created)

    def release(self) -> None:
        """Removes the lock file and lets the lock go; removes the output folder if this run
        created it and left nothing in it. Does nothing the second time."""
        if self._fd is None and not self._created:
            return
        if self._fd is not None:
            try:
                os.unlink(self.path)  # while still held, so that no other run takes a file that goes away
            except FileNotFoundError:
                pass
            os.close(self._fd)
            self._fd = None
        if self._created:
            self._created = False
            try:
                os.rmdir(self.output_dir)
            except OSError:  # not empty: the run wrote something
                pass

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def check_output_dir(output_dir: str, *, resume: bool, overwrite: bool, check_lock: bool = True) -> None:
    """Checks, before anything is loaded, that `output_dir` can take this run.

    A folder another run is using is refused, naming that run (unless `check_lock` is False: the
    other processes of a run, whose first process may already hold the lock). A non-empty folder is refused unless
    the run resumes (`resume`) or replaces it (`overwrite`), with advice that fits what the folder holds. The folder (or, if it does not exist yet, its
    nearest existing parent) must be writable; nothing is created.

    Raises:
        OutputDirError: saying what is wrong and which flag to use.
    """
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise OutputDirError(f"--output-dir {output_dir} is a file; give a folder")
    holder = lock_holder(output_dir) if check_lock else None
    if holder is not None:
        raise OutputDirInUseError(_describe_holder(output_dir, holder))
    entries = sorted(e for e in os.listdir(output_dir) if e not in _BOOKKEEPING) if os.path.isdir(output_dir) else []
    if entries and not (resume or overwrite):
        checkpoints = os.path.join(output_dir, CHECKPOINTS)
        has_checkpoints = os.path.isdir(checkpoints) and any(n.startswith("step_") for n in os.listdir(checkpoints))
        if os.path.isfile(os.path.join(output_dir, RESULTS_FILE)):
            held = "holds a finished run (results.json)"
            advice = "pass --overwrite-output-dir to replace that run"
        elif has_checkpoints:
            held = "holds checkpoints of an unfinished run"
            advice = ("continue that run with --resume-from-checkpoint latest and the same flags, or pass "
                      "--overwrite-output-dir to start a new run there")
        else:
            listed = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
            held = f"is not empty ({listed})"
            advice = "pass --overwrite-output-dir to write the run's files there"
        raise OutputDirError(f"output directory {output_dir} {held}. Choose another --output-dir, or {advice}.")
    probe_dir = _nearest_existing(output_dir)
    try:
        with tempfile.TemporaryFile(dir=probe_dir):
            pass
    except OSError as exc:
        raise OutputDirError(
            f"cannot write to --output-dir {output_dir} ({type(exc).__name__} in {probe_dir}: {exc.strerror or exc}); "
            "choose a writable folder"
        ) from exc


# Besides the trained values, a checkpoint holds AdamW's two moments of each (as large again, twice),
# the scheduler, random states and the run record (a few KiB); the final folder the adapter and text files.
_CHECKPOINT_OVERHEAD = 256 * 1024
_FINAL_OVERHEAD = 1024 * 1024


def bytes_to_write(adapter_bytes: int, checkpoints: int) -> int:
    """Returns about how many bytes a run writes into its output folder: `checkpoints` checkpoints and
    the final files, for an adapter of `adapter_bytes` (the trained parameters' bytes)."""
    return checkpoints * (3 * adapter_bytes + _CHECKPOINT_OVERHEAD) + adapter_bytes + _FINAL_OVERHEAD


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def check_free_space(output_dir: str, needed: int, *, checkpoints: int = 0) -> None:
    """Raises OutputDirError if the file system of `output_dir` has less than `needed` bytes free."""
    free = shutil.disk_usage(_nearest_existing(output_dir)).free
    if free < needed:
        raise OutputDirError(
            f"--output-dir {output_dir} has {_size(free)} free and this run writes about {_size(needed)} "
            f"({checkpoints} checkpoint(s) and the adapter); free space there, raise --checkpointing-steps, or "
            "choose another --output-dir"
        )


def write_failure(output_dir: str, cause: str) -> str:
    """Returns the one-line error for a run whose final files could not be written to `output_dir`
    (the staging folder already removed): what failed, and that none of them was kept."""
    return (
        f"cannot write the run's files to {output_dir} ({cause}); none of them was kept (a previous run's files "
        "there are untouched). Free space there (or choose another --output-dir) and run again; with "
        "--checkpointing-steps, --resume-from-checkpoint latest continues from the last checkpoint"
    )


def start_staging(output_dir: str) -> str:
    """Creates `output_dir` if needed and an empty staging folder inside it; returns the latter.
    Main process only."""
    os.makedirs(output_dir, exist_ok=True)
    staging = os.path.join(output_dir, STAGING)
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    return staging


def discard_staging(staging: str) -> None:
    """Removes a staging folder and what it holds."""
    shutil.rmtree(staging, ignore_errors=True)


def promote(staging: str, output_dir: str) -> list[str]:
    """Moves the run files of `staging` into `output_dir`, replacing those of a previous run, and
    removes `staging`. The previous run's results.json is removed first and the new one moved last,
    so that at any moment results.json belongs to the adapter beside it or is absent.

    Returns:
        The names of the files moved.

    Raises:
        FileNotFoundError: `staging` lacks one of `RUN_FILES` (nothing is moved).
    """
    missing = [f for f in RUN_FILES if not os.path.isfile(os.path.join(staging, f))]
    if missing:
        raise FileNotFoundError(f"the run's files are incomplete in {staging}: missing {missing}")
    extra = sorted(set(os.listdir(staging)) - set(RUN_FILES))
    old_results = os.path.join(output_dir, RESULTS_FILE)
    if os.path.exists(old_results):
        os.remove(old_results)
    moved = []
    for name in [*extra, *RUN_FILES]:
        os.replace(os.path.join(staging, name), os.path.join(output_dir, name))
        moved.append(name)
    os.rmdir(staging)
    return moved
