"""The output folder: refused before any work with advice that fits it, filled all at once."""

import os

import pytest

from peft_svd.fewshot.output import (
    RUN_FILES,
    STAGING,
    OutputDirError,
    check_output_dir,
    promote,
    start_staging,
)


def _write_run(folder, tag):
    os.makedirs(folder, exist_ok=True)
    for name in RUN_FILES:
        with open(os.path.join(folder, name), "w") as f:
            f.write(f"{tag} {name}")


def _contents(folder):
    return {n: open(os.path.join(folder, n)).read() for n in sorted(os.listdir(folder)) if os.path.isfile(os.path.join(folder, n))}


def test_advice_fits_what_the_folder_holds(tmp_path):
    finished = tmp_path / "finished"
    _write_run(str(finished), "old")
    with pytest.raises(OutputDirError, match="holds a finished run") as exc:
        check_output_dir(str(finished), resume=False, overwrite=False)
    assert "--resume-from-checkpoint" not in str(exc.value) and "--overwrite-output-dir" in str(exc.value)

    unfinished = tmp_path / "unfinished"
    (unfinished / "checkpoints" / "step_4").mkdir(parents=True)
    with pytest.raises(OutputDirError, match="checkpoints of an unfinished run.*--resume-from-checkpoint latest"):
        check_output_dir(str(unfinished), resume=False, overwrite=False)

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(OutputDirError, match=r"is not empty \(notes.txt\)") as exc:
        check_output_dir(str(other), resume=False, overwrite=False)
    assert "--resume-from-checkpoint" not in str(exc.value)

    check_output_dir(str(finished), resume=False, overwrite=True)
    check_output_dir(str(tmp_path / "new" / "nested"), resume=False, overwrite=False)
    assert not (tmp_path / "new").exists()  # checking creates nothing
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputDirError, match="is a file"):
        check_output_dir(str(tmp_path / "file"), resume=False, overwrite=False)


def test_unwritable_folder_is_refused(tmp_path, monkeypatch):
    import tempfile

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", denied)  # as for a read-only folder (root ignores chmod)
    with pytest.raises(OutputDirError, match="cannot write to --output-dir .*Permission denied"):
        check_output_dir(str(tmp_path / "run"), resume=False, overwrite=False)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes to read-only folders")
def test_read_only_folder_is_refused(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(OutputDirError, match="cannot write"):
            check_output_dir(str(folder), resume=False, overwrite=False)
    finally:
        folder.chmod(0o755)


def test_promote_replaces_the_previous_run_and_leaves_no_staging(tmp_path):
    out = str(tmp_path / "run")
    _write_run(out, "old")
    staging = start_staging(out)
    _write_run(staging, "new")
    promote(staging, out)
    assert _contents(out) == {n: f"new {n}" for n in RUN_FILES}
    assert not os.path.exists(os.path.join(out, STAGING))


def test_incomplete_staging_moves_nothing(tmp_path):
    out = str(tmp_path / "run")
    _write_run(out, "old")
    staging = start_staging(out)
    with open(os.path.join(staging, "adapter_model.safetensors"), "w") as f:
        f.write("new")
    with pytest.raises(FileNotFoundError, match="missing"):
        promote(staging, out)
    assert _contents(out) == {n: f"old {n}" for n in RUN_FILES}
