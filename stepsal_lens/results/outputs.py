"""Output folders, output files and run locks: nothing stale, nothing duplicated, nothing lost.

Three rules every command that writes follows:

* **A fresh folder, written atomically.** :func:`output_dir` checks the folder before
  any expensive work (it must be empty, or ``overwrite=True``), hands out a temporary
  sibling to write into and renames it into place only when the run succeeded. With
  ``overwrite`` the old folder is replaced as a whole, so no file of an earlier run
  survives beside the new report; a failed run leaves the old folder as it was.
* **One file, written atomically.** :func:`check_new_file` refuses an existing file
  (unless ``overwrite``) and an unwritable folder up front; :func:`write_text_atomic`
  writes a sibling and renames it.
* **One writer per run folder.** :func:`run_lock` creates ``.stepsal.lock`` (the
  process id, host, start time and command) with ``O_EXCL``; a second run refuses while
  the first is alive and takes over the lock of a process that is gone.

Examples
--------
>>> import tempfile
>>> from pathlib import Path
>>> root = Path(tempfile.mkdtemp())
>>> with output_dir(root / "run") as tmp:
...     _ = (tmp / "a.txt").write_text("hi")
>>> sorted(p.name for p in (root / "run").iterdir())
['a.txt']
>>> with output_dir(root / "run", overwrite=True) as tmp:
...     _ = (tmp / "b.txt").write_text("new")
>>> sorted(p.name for p in (root / "run").iterdir())  # a.txt is gone
['b.txt']
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from stepsal_lens.errors import StepSalError

__all__ = ["LOCK_NAME", "check_new_file", "check_output_dir", "check_unlocked",
           "check_writable", "lock_holder", "output_dir", "read_jsonl_objects", "run_lock",
           "write_text_atomic"]

#: The lock file of a run folder.
LOCK_NAME = ".stepsal.lock"
# A lock file that cannot be read is another writer between create and write, unless it
# is older than this many seconds (then its writer died in between).
_UNREADABLE_GRACE_S = 10.0


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def read_jsonl_objects(path: str | Path, fix: str, *,
                       what: str = "data file") -> list[tuple[str, dict]]:
    """``(where, object)`` for each non-empty line of a JSONL file; a missing file, a line
    that is not JSON or not an object raises naming the file, the line and ``fix``."""
    path = Path(path)
    if not path.exists():
        raise StepSalError(f"{what} {str(path)!r} does not exist")
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise StepSalError(f"{path}:{i} is not valid JSON ({err}); {fix}") from None
        if not isinstance(row, dict):
            raise StepSalError(f"{path}:{i} holds a {type(row).__name__}, not an object; {fix}")
        rows.append((f"{path}:{i}", row))
    return rows


def check_writable(folder: str | Path, *, what: str = "output folder", flag: str = "--out") -> None:
    """Refuse a folder that cannot be created or written (before any work is done)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise StepSalError(f"{what} {str(folder)!r} is a file, not a folder; pass a folder "
                           f"path to {flag}")
    base = _existing_ancestor(folder)
    if not base.is_dir():
        raise StepSalError(f"{what} {str(folder)!r} cannot be created: {str(base)!r} is a "
                           f"file; pass another {flag}")
    if not os.access(base, os.W_OK | os.X_OK):
        raise StepSalError(f"{what} {str(folder)!r} is not writable ({str(base)!r} does not "
                           f"allow writing for this user); pass a writable {flag} or fix its "
                           f"permissions")


def _refuse_dangerous(out: Path, flag: str) -> None:
    """--overwrite replaces the folder; never a root, the home folder or the cwd's ancestors."""
    resolved = out.resolve()
    cwd = Path.cwd().resolve()
    if resolved == Path(resolved.anchor) or resolved == Path.home().resolve() \
            or resolved == cwd or resolved in cwd.parents:
        raise StepSalError(f"{flag} {str(out)!r} is {str(resolved)!r}, which --overwrite would "
                           f"replace as a whole; pass a folder of its own (e.g. {flag} "
                           f"{out / 'stepsal-out'})")


def _listing(folder: Path, limit: int = 4) -> str:
    names = sorted(p.name for p in folder.iterdir())
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_output_dir(out: str | Path, *, overwrite: bool = False, flag: str = "--out",
                     what: str = "output folder") -> Path:
    """The checks :func:`output_dir` makes on entry, without creating anything."""
    out = Path(out)
    check_writable(out, what=what, flag=flag)
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise StepSalError(
                f"{what} {str(out)!r} already holds files ({_listing(out)}); pass --overwrite "
                f"to replace them (the whole folder), or choose another {flag}")
        _refuse_dangerous(out, flag)
        if (out / LOCK_NAME).exists() or (out / "run.json").exists():
            raise StepSalError(f"{what} {str(out)!r} is an evaluation run folder (it holds "
                               f"run.json); --overwrite does not replace it: choose another "
                               f"{flag}")
    return out


@contextmanager
def output_dir(out: str | Path, *, overwrite: bool = False, flag: str = "--out",
               what: str = "output folder") -> Iterator[Path]:
    """Write a run's files into a temporary sibling of ``out`` and move it into place.

    Checks on entry (so call it before loading a model): ``out`` is not a file, is empty
    or absent (else ``overwrite=True``, which replaces it as a whole) and its parent is
    writable. On success the temporary folder becomes ``out``; on any error or Ctrl-C it
    is removed and ``out`` is left as it was.

    Yields
    ------
    pathlib.Path
        The temporary folder to write into.
    """
    out = check_output_dir(out, overwrite=overwrite, flag=flag, what=what)
    parent = out.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=parent))
    except OSError as err:
        raise StepSalError(f"cannot write {what} {str(out)!r}: {err.strerror or err}; pass a "
                           f"writable {flag}") from err
    try:
        yield tmp
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
            old.rmdir()
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_new_file(path: str | Path, *, overwrite: bool = False, flag: str = "--out",
                   what: str = "output file") -> Path:
    """Refuse an existing file (unless ``overwrite``), a folder, or an unwritable place."""
    path = Path(path)
    if path.is_dir():
        raise StepSalError(f"{what} {str(path)!r} is a folder; pass a file path to {flag} "
                           f"(e.g. {path / 'out.json'})")
    if path.exists() and not overwrite:
        raise StepSalError(f"{what} {str(path)!r} already exists; pass --overwrite to replace "
                           f"it, or choose another {flag}")
    check_writable(path.parent, what=f"folder of the {what}", flag=flag)
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to a sibling temporary file and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# ---- run locks ----------------------------------------------------------------------------

_HELD: dict[str, int] = {}  # lock files this process holds -> nesting depth


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read_lock(path: Path) -> dict | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("pid"), int) else None


def lock_holder(folder: str | Path) -> dict | None:
    """The live writer of a run folder (its lock's contents), or None if there is none."""
    path = Path(folder) / LOCK_NAME
    if not path.exists():
        return None
    holder = _read_lock(path)
    if holder is None:
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return None
        return {"pid": -1, "host": "?", "command": "?", "started": "?"} \
            if age < _UNREADABLE_GRACE_S else None
    if holder.get("pid") == os.getpid() and str(path.resolve()) in _HELD:
        return None  # ours
    if holder.get("host") not in (None, socket.gethostname()):
        return holder  # cannot tell whether a process on another machine is alive
    return holder if _alive(holder["pid"]) else None


def _in_use(folder: Path, holder: dict) -> StepSalError:
    pid = holder.get("pid")
    where = "" if holder.get("host") in (None, socket.gethostname()) else f" on {holder['host']}"
    return StepSalError(
        f"run folder {str(folder)!r} is in use by process {pid}{where} "
        f"({holder.get('command', '?')!r}, since {holder.get('started', '?')}); wait for it to "
        f"finish or stop it, then run again (it resumes); if no such process runs, delete "
        f"{str(folder / LOCK_NAME)!r}")


def check_unlocked(folder: str | Path) -> None:
    """Refuse a run folder another live process is writing (cheap; call before loading)."""
    holder = lock_holder(folder)
    if holder is not None:
        raise _in_use(Path(folder), holder)


@contextmanager
def run_lock(folder: str | Path) -> Iterator[Path]:
    """Hold ``folder/.stepsal.lock`` for the block: one writer per run folder.

    A lock whose process is gone (same host) is taken over, with a note on stderr. The
    same process may nest the lock (the CLI takes it before loading the model,
    :func:`~stepsal_lens.eval.runs.evaluate` again).
    """
    folder = Path(folder)
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StepSalError(f"cannot create run folder {str(folder)!r}: {err.strerror or err}; "
                           f"pass a writable --out") from err
    path = folder / LOCK_NAME
    key = str(path.resolve())
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield path
        finally:
            _HELD[key] -= 1
        return
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(["stepsal", *sys.argv[1:]]) if sys.argv else "stepsal"}
    for _ in range(20):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = lock_holder(folder)
            if holder is not None:
                raise _in_use(folder, holder) from None
            stale = _read_lock(path) or {}
            # rename first: of two processes taking over, only one succeeds
            grave = path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}")
            try:
                os.rename(path, grave)
            except FileNotFoundError:
                continue
            grave.unlink(missing_ok=True)
            print(f"stepsal: note: took over the lock of process {stale.get('pid', '?')} in "
                  f"{str(folder)!r}, which is no longer running", file=sys.stderr)
            continue
        except OSError as err:
            raise StepSalError(f"cannot write the lock file in {str(folder)!r}: "
                               f"{err.strerror or err}; pass a writable --out") from err
        with os.fdopen(fd, "w") as f:
            json.dump(info, f)
        break
    else:
        raise StepSalError(f"could not take the lock {str(path)!r} (other processes keep "
                           f"taking it); run again")
    _HELD[key] = 1
    try:
        yield path
    finally:
        del _HELD[key]
        if (_read_lock(path) or {}).get("pid") == os.getpid():
            path.unlink(missing_ok=True)
        # a run refused or stopped before writing anything leaves no folder behind
        if created and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
