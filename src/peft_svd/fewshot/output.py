"""The output folder of a few-shot run: checked before any work, filled all at once.

A run's final files (the adapter, the model card, results.json) are written to a staging folder
inside the output folder and moved into place only when all of them are complete, results.json
last: an output folder holds one complete run, or the previous run untouched and nothing of the
new one. A failure while writing (a full disk, a quota) removes the staging folder; the
folder is checked for writability before training, so that a read-only folder is found before
the work is done.
"""

import os
import shutil
import tempfile

from .record import RESULTS_FILE

CHECKPOINTS = "checkpoints"
STAGING = ".incoming"
# The files a run writes, in the order they are moved into place: results.json, which marks a
# complete run, goes last.
RUN_FILES = ("adapter_model.safetensors", "adapter_config.json", "README.md", RESULTS_FILE)


class OutputDirError(ValueError):
    """The output folder cannot take this run (not empty, not a folder, not writable)."""


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def check_output_dir(output_dir: str, *, resume: bool, overwrite: bool) -> None:
    """Checks, before anything is loaded, that `output_dir` can take this run.

    A non-empty folder is refused unless the run resumes (`resume`) or replaces it (`overwrite`),
    with advice that fits what the folder holds. The folder (or, if it does not exist yet, its
    nearest existing parent) must be writable; nothing is created.

    Raises:
        OutputDirError: saying what is wrong and which flag to use.
    """
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise OutputDirError(f"--output-dir {output_dir} is a file; give a folder")
    entries = sorted(e for e in os.listdir(output_dir) if e != STAGING) if os.path.isdir(output_dir) else []
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
