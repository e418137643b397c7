"""The run-folder layer: atomic swaps that re-check their target, crash recovery, locks."""

from __future__ import annotations

import json
import re
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from stepsal_lens import StepSalError
from stepsal_lens.results import outputs
from stepsal_lens.results.outputs import (MARKER, output_dir, output_file, read_marker,
                                          run_folder)


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_folder_that_appears_meanwhile_is_never_replaced(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(StepSalError, match=r"was made or changed by another program while this "
                                           r"run worked; it is left as it is, and this run's "
                                           r"results are in '.*out-2'"):
        with output_dir(out, command="analyze") as tmp:
            (tmp / "maps.png").write_text("new")
            out.mkdir()  # e.g. an eval run folder started meanwhile
            (out / "results.jsonl").write_text("hours of work")
    assert (out / "results.jsonl").read_text() == "hours of work"
    assert (tmp_path / "out-2" / "maps.png").read_text() == "new"  # nothing lost either
    assert _names(tmp_path) == ["out", "out-2"]


def test_overwrite_replaces_only_the_folder_it_checked(tmp_path):
    out = tmp_path / "out"
    with output_dir(out, command="analyze") as tmp:
        (tmp / "a").write_text("old")
    with pytest.raises(StepSalError, match="was made or changed by another program"):
        with output_dir(out, command="analyze", overwrite=True) as tmp:
            (tmp / "a").write_text("new")
            os.rename(out, tmp_path / "moved")  # someone swaps another folder in
            out.mkdir()
            (out / "theirs").write_text("keep")
    assert _names(out) == ["theirs"] and (tmp_path / "out-2" / "a").read_text() == "new"


def test_the_exchange_fallback_gives_the_same_result(tmp_path, monkeypatch):
    monkeypatch.setattr(outputs, "_renameat2", lambda src, dst, flags: False)
    out = tmp_path / "out"
    with output_dir(out, command="demo") as tmp:
        (tmp / "a").write_text("first")
    with output_dir(out, command="demo", overwrite=True) as tmp:
        (tmp / "b").write_text("second")
    assert _names(out) == [MARKER, "b"] and _names(tmp_path) == ["out"]


def _killed_inside(out: Path, stage: str) -> None:
    """Run output_dir in a child that SIGKILLs itself at ``stage``."""
    code = f"""
import os, signal
from pathlib import Path
from stepsal_lens.results import outputs
out = Path({str(out)!r})
if {stage!r} == "between renames":  # the two-rename fallback, killed in between
    outputs._renameat2 = lambda src, dst, flags: False
    real = os.rename
    calls = []
    def rename(a, b):
        real(a, b)
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGKILL)
    outputs.os.rename = rename
with outputs.output_dir(out, command="demo", overwrite=True) as tmp:
    (tmp / "new.txt").write_text("new")
    if {stage!r} == "while writing":
        os.kill(os.getpid(), signal.SIGKILL)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL, done.stderr


@pytest.mark.parametrize("stage", ["while writing", "between renames"])
def test_a_killed_run_is_recovered_by_the_next_one(tmp_path, capsys, stage):
    out = tmp_path / "out"
    with output_dir(out, command="demo") as tmp:
        (tmp / "old.txt").write_text("old")
    _killed_inside(out, stage)
    leftovers = [n for n in _names(tmp_path) if n != "out"]
    assert leftovers and all(n.startswith(".out.stepsal-") for n in leftovers), leftovers
    if stage == "between renames":
        assert not out.exists()  # the old results are aside, the new ones not yet in place
    # the next run on the same output restores the old results first, then runs
    with pytest.raises(StepSalError, match="already holds files"):
        with output_dir(out, command="demo"):
            pass
    assert (out / "old.txt").read_text() == "old" and _names(tmp_path) == ["out"]
    if stage == "between renames":
        assert "restored" in capsys.readouterr().err


def test_run_folder_creates_marks_and_refuses(tmp_path):
    with run_folder(tmp_path / "run", command="eval") as folder:
        (folder / "run.json").write_text("{}")
    assert read_marker(tmp_path / "run")["command"] == "eval"
    with run_folder(tmp_path / "new", command="eval"):
        pass  # refused or stopped before writing anything: no folder left
    assert not (tmp_path / "new").exists()
    with pytest.raises(StepSalError, match=r"holds the results of `stepsal eval`, not a "
                                           r"`stepsal analyze-traces` run"):
        with run_folder(tmp_path / "run", command="analyze-traces"):
            pass
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("x")
    with pytest.raises(StepSalError, match=r"holds files that are not a stepsal run "
                                           r"\(thesis\.tex; no \.stepsal marker"):
        with run_folder(tmp_path / "mine", command="eval"):
            pass


def test_output_file_is_atomic_and_refuses_its_inputs(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("input")
    out = tmp_path / "out.jsonl"
    with pytest.raises(RuntimeError):
        with output_file(out) as tmp:
            tmp.write_text("half")
            raise RuntimeError
    assert _names(tmp_path) == ["in.jsonl"]  # nothing half-written
    with output_file(out) as tmp:
        tmp.write_text("done")
    with output_file(out, overwrite=True) as tmp:
        tmp.write_text("again")
    assert out.read_text() == "again" and _names(tmp_path) == ["in.jsonl", "out.jsonl"]
    os.link(src, tmp_path / "hard")
    with pytest.raises(StepSalError, match=r"is the command's own input IN \'.*in\.jsonl\' "
                                           r"\(or a link to it\)"):
        with output_file(tmp_path / "hard", overwrite=True, inputs={"IN": src}):
            pass
    assert src.read_text() == "input"


def test_the_marker_is_json_naming_the_command(tmp_path):
    with output_dir(tmp_path / "o", command="effects") as tmp:
        pass
    doc = json.loads((tmp_path / "o" / MARKER).read_text())
    assert doc["command"] == "effects" and doc["state"] == "complete" and doc["stepsal"]


@pytest.fixture
def small_disk(tmp_path):
    """A real 256 KiB filesystem (tmpfs; needs root, as in CI), unmounted afterwards."""
    folder = tmp_path / "disk"
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_a_full_disk_is_one_clear_error_and_leaves_nothing(small_disk, capsys):
    from stepsal_lens.apps.cli import main

    trace = Path(__file__).parents[2] / "examples" / "trace.json"
    (small_disk / "filler").write_bytes(b"x" * (240 << 10))  # 16 KiB left
    rc = main(["analyze", "--model", "tiny-lrm", "--trace", str(trace), "--out",
               str(small_disk / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    assert re.search(r"stepsal: error: no space left to write output folder '.*out' \(No space "
                     r"left on device\); nothing was changed: free some space", err), err
    assert _names(small_disk) == ["filler"]  # no partial folder, no lock
    # with no room even for the lock's contents
    (small_disk / "filler").write_bytes(b"x" * (256 << 10))
    graded = small_disk.parent / "in.jsonl"
    graded.write_text(json.dumps({"output": "\\boxed{2}", "answer": "2"}) + "\n")
    assert main(["grade", str(graded), "--out", str(small_disk / "g.jsonl")]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert _names(small_disk) == ["filler"]
