"""The run-folder layer: every command that writes goes through it.

What it promises, whatever the arguments, a second job at once, a crash or a full disk:

* **Nothing outside the run is touched.** Output paths are resolved (symlinks
  followed) before every check. stepsal never writes into, or replaces, a filesystem
  root, the home folder or an ancestor of it, the working folder or an ancestor of it,
  or a folder holding one of the command's inputs; it never writes a file onto one of
  its inputs (hard links included).
* **Only stepsal's own folders are replaced.** Each folder stepsal makes holds a marker
  file, :data:`MARKER`. ``--overwrite`` replaces a folder only if it holds that marker
  (or is empty), and never a resumable run folder (``eval``, ``analyze --traces``).
* **One writer per output.** :func:`run_lock` holds an advisory lock
  (``.NAME.stepsal-lock`` beside the output, ``flock``: released by the kernel when the
  process dies, so it is never stale) from the first check to the final swap; a second
  job on the same output is refused, naming the first.
* **Atomic results, recovered after a crash.** A folder is written into a hidden sibling
  (``.NAME.stepsal-partial-*``) and swapped into place with one atomic rename:
  ``RENAME_NOREPLACE`` for a new folder, ``RENAME_EXCHANGE`` to replace an old one (two
  renames through ``.NAME.stepsal-old-*`` where the filesystem lacks it). The swap
  re-checks the target: something that appeared or changed meanwhile is never replaced,
  and this run's results are then kept beside it under a visible name. Leftovers of a
  killed run are removed by the next run on the same output (old results restored
  first where a replacement was cut short).

Examples
--------
>>> import tempfile
>>> from pathlib import Path
>>> root = Path(tempfile.mkdtemp())
>>> with output_dir(root / "run", command="analyze") as tmp:
...     _ = (tmp / "a.txt").write_text("hi")
>>> sorted(p.name for p in (root / "run").iterdir())
['.stepsal', 'a.txt']
>>> with output_dir(root / "run", overwrite=True, command="analyze") as tmp:
...     _ = (tmp / "b.txt").write_text("new")
>>> sorted(p.name for p in (root / "run").iterdir())  # a.txt is gone
['.stepsal', 'b.txt']
>>> sorted(p.name for p in root.iterdir())  # no lock, no hidden folder left
['run']
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from stepsal_lens._version import __version__
from stepsal_lens.errors import StepSalError

__all__ = ["MARKER", "RESUMABLE", "check_new_file", "clean_leftovers", "check_output_dir", "check_run_dir",
           "check_unlocked", "check_writable", "lock_holder", "output_dir", "output_file",
           "read_marker", "run_folder", "run_lock", "write_text_atomic"]

#: The marker file of every folder stepsal makes (JSON: version, command, time).
MARKER = ".stepsal"
#: Commands whose folders are resumed in place, never replaced by ``--overwrite``.
RESUMABLE = frozenset({"eval", "analyze-traces"})
_TAG = "stepsal-"  # in the names of the lock and of temporary siblings: .NAME.stepsal-*
_NO_ROOM = (errno.ENOSPC, errno.EDQUOT)

Inputs = Mapping[str, "str | os.PathLike | None"] | None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _resolve(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().resolve()


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino)


# ---- checks ---------------------------------------------------------------------------------

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


def _protected(target: Path) -> str | None:
    """Why stepsal must never write ``target`` as a run's own folder (None: it may)."""
    if target == Path(target.anchor):
        return "a filesystem root"
    try:
        home = Path.home().resolve()
    except (RuntimeError, KeyError):  # no home folder known
        home = None
    if home is not None and target == home:
        return "your home folder"
    if home is not None and target in home.parents:
        return "an ancestor of your home folder"
    cwd = Path.cwd().resolve()
    if target == cwd:
        return "the working folder"
    if target in cwd.parents:
        return "an ancestor of the working folder"
    return None


def _check_place(out: str | os.PathLike, target: Path, inputs: Inputs, flag: str,
                 what: str) -> None:
    reason = _protected(target)
    if reason is not None:
        raise StepSalError(f"{flag} {str(out)!r} is {reason} ({str(target)!r}); stepsal "
                           f"writes into a folder of its own there: pass a new one, e.g. "
                           f"{flag} {Path(out) / 'stepsal-out'}")
    for name, given in (inputs or {}).items():
        if given is None or not Path(given).expanduser().exists():
            continue
        source = _resolve(given)
        if source == target or target in source.parents:
            raise StepSalError(f"{flag} {str(out)!r} holds the command's own input {name} "
                               f"{str(given)!r}; write the {what} somewhere else")


def _placed(out: str | os.PathLike, inputs: Inputs, flag: str, what: str) -> Path:
    """``out`` resolved, checked to be writable and a place stepsal may write."""
    target = _resolve(out)
    check_writable(target, what=what, flag=flag)
    _check_place(out, target, inputs, flag, what)
    return target


def read_marker(folder: str | Path) -> dict[str, Any] | None:
    """The marker of a folder stepsal made (None: not stepsal's, or unreadable)."""
    try:
        doc = json.loads((Path(folder) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("command"), str) else None


def _write_marker(folder: Path, command: str, state: str) -> None:
    doc = {"stepsal": __version__, "command": command, "state": state,
           "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    (folder / MARKER).write_text(json.dumps(doc) + "\n", encoding="utf-8")


def _listing(folder: Path, limit: int = 4) -> str:
    names = sorted(p.name for p in folder.iterdir() if p.name != MARKER)
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_output_dir(out: str | Path, *, overwrite: bool = False, inputs: Inputs = None,
                     flag: str = "--out", what: str = "output folder") -> Path:
    """The checks :func:`output_dir` makes (before the work and again before the swap),
    without creating anything; returns the resolved folder.

    Raises
    ------
    StepSalError
        ``out`` is a file, not writable, a protected place (root, home or the working
        folder or an ancestor of them), holds one of ``inputs``, or holds files: files
        stepsal did not make (never replaced), a resumable run (never replaced), or an
        earlier result without ``overwrite``.
    """
    target = _placed(out, inputs, flag, what)
    if target.is_dir() and any(target.iterdir()):
        marker = read_marker(target)
        if marker is None:
            raise StepSalError(
                f"{what} {str(out)!r} holds files stepsal did not make ({_listing(target)}); "
                f"--overwrite replaces only a folder stepsal made (it holds {MARKER}): "
                f"choose a new or empty {flag}")
        if marker["command"] in RESUMABLE:
            raise StepSalError(
                f"{what} {str(out)!r} is a resumable `stepsal {marker['command'].split('-')[0]}`"
                f" run folder; --overwrite does not replace it: choose another {flag} (or "
                f"delete it yourself)")
        if not overwrite:
            raise StepSalError(
                f"{what} {str(out)!r} already holds files ({_listing(target)}); pass "
                f"--overwrite to replace them (the whole folder), or choose another {flag}")
    check_unlocked(target)
    return target


def check_run_dir(out: str | Path, *, command: str, inputs: Inputs = None, flag: str = "--out",
                  what: str = "run folder") -> Path:
    """The checks of a resumable run folder (``eval``, ``analyze --traces``): writable,
    not a protected place, holding no input, new, empty or a ``command`` run stepsal made,
    and no other process writing it. Returns the resolved folder."""
    target = _placed(out, inputs, flag, what)
    if target.is_dir() and any(target.iterdir()):
        marker = read_marker(target)
        if marker is None:
            raise StepSalError(
                f"{what} {str(out)!r} holds files that are not a stepsal run "
                f"({_listing(target)}; no {MARKER} marker: made by hand or by stepsal < 0.2); "
                f"choose a new or empty {flag}")
        if marker["command"] != command:
            raise StepSalError(
                f"{what} {str(out)!r} holds the results of `stepsal {marker['command']}`, not "
                f"a `stepsal {command}` run; choose another {flag}")
    check_unlocked(target)
    return target


def check_new_file(path: str | Path, *, overwrite: bool = False, inputs: Inputs = None,
                   flag: str = "--out", what: str = "output file") -> Path:
    """Refuse a folder, an existing file (unless ``overwrite``), one of the command's
    ``inputs`` (also through a symlink or a hard link) or an unwritable place; returns
    the resolved path."""
    target = _resolve(path)
    if target.is_dir():
        raise StepSalError(f"{what} {str(path)!r} is a folder; pass a file path to {flag} "
                           f"(e.g. {Path(path) / 'out.json'})")
    for name, given in (inputs or {}).items():
        if given is not None and target.exists() and Path(given).exists() \
                and os.path.samefile(target, given):
            raise StepSalError(f"{flag} {str(path)!r} is the command's own input {name} "
                               f"{str(given)!r} (or a link to it); write it elsewhere")
    if target.exists() and not overwrite:
        raise StepSalError(f"{what} {str(path)!r} already exists; pass --overwrite to replace "
                           f"it, or choose another {flag}")
    check_writable(target.parent, what=f"folder of the {what}", flag=flag)
    check_unlocked(target)
    return target


# ---- locks ---------------------------------------------------------------------------------

_HELD: dict[str, tuple[int, int]] = {}  # lock files this process holds -> (fd, depth)


def _lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}.{_TAG}lock"


def _read_info(fd: int) -> dict[str, Any]:
    try:
        doc = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _in_use(target: Path, holder: dict[str, Any]) -> StepSalError:
    who = f"process {holder['pid']}" if isinstance(holder.get("pid"), int) else "another process"
    if holder.get("host") not in (None, socket.gethostname()):
        who += f" on {holder['host']}"
    since = f" ({holder.get('command', '?')!r}, since {holder.get('started', '?')})" \
        if holder else ""
    return StepSalError(f"{str(target)!r} is in use by {who}{since}; wait for it to finish or "
                        f"stop it, then run again")


def lock_holder(target: str | Path) -> dict[str, Any] | None:
    """What the live writer of ``target`` recorded (pid, host, command, start), or None
    when no other process holds its lock."""
    lock = _lock_path(_resolve(target))
    if str(lock) in _HELD:
        return None
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_info(fd)
    finally:
        os.close(fd)
    return None


def check_unlocked(target: str | Path) -> None:
    """Refuse an output another live process is writing (cheap; call before loading)."""
    holder = lock_holder(target)
    if holder is not None:
        raise _in_use(_resolve(target), holder)


def _acquire(lock: Path, target: Path) -> int:
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(["stepsal", *sys.argv[1:]]) if sys.argv else "stepsal"}
    for _ in range(100):
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as err:
            raise StepSalError(f"cannot create the lock {str(lock)!r}: {err.strerror or err}; "
                               f"pass a writable --out") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_info(fd)
            os.close(fd)
            raise _in_use(target, holder) from None
        # the holder before us may have unlinked the file while we waited: retry on the new one
        if _identity(lock) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino):
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(info).encode(), 0)
            except OSError as err:
                _release(lock, fd)
                raise StepSalError(f"cannot write the lock {str(lock)!r}: "
                                   f"{err.strerror or err}; free some space (or pass another "
                                   f"--out) and run again") from None
            return fd
        os.close(fd)
    raise StepSalError(f"could not take the lock {str(lock)!r} (other processes keep taking "
                       f"it); run again")


def _release(lock: Path, fd: int) -> None:
    try:
        lock.unlink()  # while still holding it: a waiter then sees another inode and retries
    except FileNotFoundError:
        pass
    os.close(fd)


@contextmanager
def run_lock(target: str | Path) -> Iterator[Path]:
    """Hold the lock of ``target`` (a folder or a file) for the block: one writer.

    The lock is ``.NAME.stepsal-lock`` beside ``target``, removed on release; the kernel
    releases it if the process dies. The same process may nest it (the CLI takes it
    before loading the model, :func:`~stepsal_lens.eval.runs.evaluate` again).
    """
    target = _resolve(target)
    lock = _lock_path(target)
    key = str(lock)
    if key in _HELD:
        fd, depth = _HELD[key]
        _HELD[key] = (fd, depth + 1)
        try:
            yield lock
        finally:
            _HELD[key] = (fd, _HELD[key][1] - 1)
        return
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StepSalError(f"cannot create {str(target.parent)!r}: {err.strerror or err}; "
                           f"pass a writable --out") from None
    fd = _acquire(lock, target)
    _HELD[key] = (fd, 1)
    try:
        yield lock
    finally:
        del _HELD[key]
        _release(lock, fd)


# ---- atomic swaps ----------------------------------------------------------------------------

_RENAME_NOREPLACE, _RENAME_EXCHANGE, _AT_FDCWD = 1, 2, -100


@functools.cache
def _libc_renameat2():
    """libc's ``renameat2`` (None where the C library lacks it), looked up once."""
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                       ctypes.c_uint]
    return fn


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)``; False where the system or filesystem lacks it."""
    fn = _libc_renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename, raising FileExistsError rather than replacing anything at ``dst``."""
    if not _renameat2(src, dst, _RENAME_NOREPLACE):
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, "exists", str(dst))
        os.rename(src, dst)


def _keep_beside(tmp: Path, target: Path) -> Path:
    """Move finished results to the first free visible name ``target-N``."""
    for n in range(2, 1000):
        keep = target.with_name(f"{target.name}-{n}")
        try:
            _rename_noreplace(tmp, keep)
            return keep
        except FileExistsError:
            continue
    raise StepSalError(f"no free name beside {str(target)!r} to keep this run's results")


def _moved_meanwhile(tmp: Path, target: Path, out: str | Path, what: str) -> StepSalError:
    keep = _keep_beside(tmp, target)
    return StepSalError(f"{what} {str(out)!r} was made or changed by another program while "
                        f"this run worked; it is left as it is, and this run's results are in "
                        f"{str(keep)!r}")


def _swap_in(tmp: Path, target: Path, before: tuple[int, int] | None, out: str | Path,
             what: str) -> None:
    """Put the finished ``tmp`` at ``target``, replacing only the very folder or file
    (``before``: its device and inode; None: nothing) that was checked."""
    if before is None:
        try:
            _rename_noreplace(tmp, target)
        except FileExistsError:
            raise _moved_meanwhile(tmp, target, out, what) from None
        return
    if _identity(target) != before:
        raise _moved_meanwhile(tmp, target, out, what)
    if tmp.is_file():
        os.replace(tmp, target)
        return
    if _renameat2(tmp, target, _RENAME_EXCHANGE):
        if _identity(tmp) != before:  # something slipped in between the check and the swap
            _renameat2(tmp, target, _RENAME_EXCHANGE)
            raise _moved_meanwhile(tmp, target, out, what)
        shutil.rmtree(tmp)  # now the old folder
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.{_TAG}old-", dir=target.parent))
    old.rmdir()
    os.rename(target, old)
    os.rename(tmp, target)
    shutil.rmtree(old)


def _recover(target: Path) -> None:
    """Clean up after a killed run on ``target`` (the caller holds its lock): restore old
    results moved aside by a cut-short replacement, remove unfinished temporaries."""
    prefix = f".{target.name}.{_TAG}"
    if not target.parent.is_dir():
        return
    for p in sorted(target.parent.iterdir()):
        name = p.name
        if not name.startswith(prefix) or name == _lock_path(target).name:
            continue
        rest = name[len(prefix):]
        if p.is_dir() and not p.is_symlink() and (read_marker(p) is not None
                                                   or not any(p.iterdir())):
            if rest.startswith("old-") and not os.path.lexists(target):
                os.rename(p, target)
                print(f"stepsal: note: restored {str(target)!r}, whose replacement was cut "
                      f"short", file=sys.stderr)
            elif rest.startswith(("old-", "partial-")):
                shutil.rmtree(p, ignore_errors=True)
        elif p.is_file() and not p.is_symlink() and rest.startswith("partial-"):
            p.unlink(missing_ok=True)


def clean_leftovers(folder: str | Path) -> None:
    """Recover every output in ``folder`` that a killed run left unfinished (the caller
    holds a lock that covers the folder, e.g. its batch run's)."""
    folder = Path(folder)
    names = {p.name[1:].split(f".{_TAG}")[0] for p in folder.glob(f".*.{_TAG}*")}
    for name in sorted(names):
        _recover(folder / name)
    for lock in folder.glob(f".*.{_TAG}lock"):  # of killed writers: held by nobody
        if str(lock) in _HELD:
            continue
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        if _identity(lock) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino):
            _release(lock, fd)
        else:
            os.close(fd)


def _no_room(err: OSError, out: str | Path, what: str, then: str) -> StepSalError:
    """A full disk (or quota) while writing, as one clear error."""
    return StepSalError(f"no space left to write {what} {str(out)!r} ({err.strerror}); {then}")


# ---- what commands use -----------------------------------------------------------------------

@contextmanager
def output_dir(out: str | Path, *, command: str, overwrite: bool = False,
               inputs: Inputs = None, flag: str = "--out",
               what: str = "output folder") -> Iterator[Path]:
    """Write a run's files into a temporary sibling of ``out`` and swap it into place.

    Checks on entry (:func:`check_output_dir`; so call it before loading a model), holds
    ``out``'s lock until the swap, and on success puts the folder in place atomically
    with its :data:`MARKER`; on any error or Ctrl-C the temporary folder is removed and
    ``out`` is left as it was.

    Parameters
    ----------
    out
        The folder to make (new or empty; with ``overwrite`` also a finished stepsal
        result, replaced as a whole).
    command
        Recorded in the marker (``"analyze"``, ``"demo"``, ``"effects"``).
    inputs
        The command's input paths by flag (``{"--trace": path}``): never inside ``out``.

    Yields
    ------
    pathlib.Path
        The temporary folder to write into.
    """
    target = _placed(out, inputs, flag, what)
    with run_lock(out):
        _recover(target)  # first: a killed run's old results are back before the checks
        check_output_dir(out, overwrite=overwrite, inputs=inputs, flag=flag, what=what)
        before = _identity(target)
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{_TAG}partial-",
                                        dir=target.parent))
            _write_marker(tmp, command, "partial")
        except OSError as err:
            raise StepSalError(f"cannot write {what} {str(out)!r}: {err.strerror or err}; "
                               f"pass a writable {flag}") from None
        try:
            yield tmp
            _write_marker(tmp, command, "complete")
            tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private
            _swap_in(tmp, target, before, out, what)
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            if err.errno in _NO_ROOM:
                raise _no_room(err, out, what, f"nothing was changed: free some space (or "
                               f"pass another {flag}) and run again") from err
            raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


@contextmanager
def output_file(path: str | Path, *, overwrite: bool = False, inputs: Inputs = None,
                flag: str = "--out", what: str = "output file") -> Iterator[Path]:
    """Write one file atomically: yields a temporary sibling to write, renamed over
    ``path`` on success (:func:`check_new_file` before and again at the end; the lock
    held in between)."""
    target = _resolve(path)
    if target.is_dir() or not target.parent.is_dir():
        check_new_file(path, overwrite=overwrite, inputs=inputs, flag=flag, what=what)
    with run_lock(path):
        _recover(target)
        check_new_file(path, overwrite=overwrite, inputs=inputs, flag=flag, what=what)
        before = _identity(target)
        try:
            fd, name = tempfile.mkstemp(prefix=f".{target.name}.{_TAG}partial-",
                                        dir=target.parent)
            os.close(fd)
        except OSError as err:
            raise StepSalError(f"cannot write {what} {str(path)!r}: {err.strerror or err}; "
                               f"pass a writable {flag}") from None
        tmp = Path(name)
        try:
            yield tmp
            tmp.chmod(0o666 & ~_umask())
            _swap_in(tmp, target, before, path, what)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            if err.errno in _NO_ROOM:
                raise _no_room(err, path, what, f"nothing was changed: free some space (or "
                               f"pass another {flag}) and run again") from err
            raise
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


@contextmanager
def run_folder(out: str | Path, *, command: str, inputs: Inputs = None, flag: str = "--out",
               what: str = "run folder") -> Iterator[Path]:
    """Hold a resumable run folder (``eval``, ``analyze --traces``) for the block.

    Checks it (:func:`check_run_dir`), takes its lock, creates it with its marker if
    new, and removes files a killed writer left half-written. A run refused before it
    wrote anything leaves no folder behind. The same process may nest it.

    Yields
    ------
    pathlib.Path
        The resolved folder.
    """
    check_run_dir(out, command=command, inputs=inputs, flag=flag, what=what)
    with run_lock(out):
        target = check_run_dir(out, command=command, inputs=inputs, flag=flag, what=what)
        created = not target.exists()
        try:
            target.mkdir(parents=True, exist_ok=True)
            if read_marker(target) is None:
                _write_marker(target, command, "run")
        except OSError as err:
            raise StepSalError(f"cannot create {what} {str(out)!r}: {err.strerror or err}; "
                               f"pass a writable {flag}") from None
        clean_leftovers(target)
        try:
            yield target
        except OSError as err:
            if err.errno in _NO_ROOM:
                raise _no_room(err, out, what, "the records written so far are kept: free "
                               "some space and run the same command to resume") from err
            raise
        finally:
            if created and [p.name for p in target.iterdir()] == [MARKER]:
                (target / MARKER).unlink()
                target.rmdir()


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to a sibling temporary file and rename it over ``path`` (a file of a
    folder the run holds)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_TAG}partial-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
