"""Writing an output file safely: never over an input, atomically, with the ordinary file mode.

The file is written to a temporary file in the output's own folder, then moved over the output with
``os.replace`` (atomic on POSIX and Windows): a failed or interrupted write leaves the old file (or
none), never a half-written one. The temporary file is created with mode ``0o666`` minus the umask
(``0o644`` under the usual umask 022), as ``open()`` would create the output, not ``0o600`` as
``tempfile`` does. An output that resolves to one of the inputs (the same path, a symlink or a hard
link to it) is refused before anything is read or written. A folder of several files is written
the same way (:func:`write_files_atomically`): all its files or none.
"""

from __future__ import annotations

import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Optional, Union

PathLike = Union[str, "os.PathLike[str]"]


class OutputError(OSError):
    """An output that cannot or must not be written; the message is one line naming it."""


def same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` are the same file: one path resolved, a symlink, or a hard link."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist: compare where they would resolve
        return a.resolve() == b.resolve()


def check_not_input(output: Path, inputs: Iterable[Path], *, name: str = "output") -> None:
    """An :class:`OutputError` when ``output`` is (or links to) one of ``inputs``."""
    for source in inputs:
        if same_file(output, source):
            how = "" if output.absolute() == Path(source).absolute() else f" (it resolves to {str(source)!r})"
            raise OutputError(
                f"{name} {str(output)!r} is an input file{how}: writing it would destroy the input; "
                "choose another output file"
            )


def target_path(output: Path, *, name: str = "output") -> Path:
    """Where ``output`` is written: the file a symlink points to (as ``open()`` writes through a
    link), which must be a regular file if it exists (a device, a FIFO or a folder is refused)."""
    target = output.resolve() if output.is_symlink() else output
    if target.exists() and not target.is_file():
        kind = "a folder" if target.is_dir() else "not a regular file"
        raise OutputError(f"{name} {str(output)!r} is {kind}: give the path of a file to write")
    return target


def check_writable(output: Path, *, name: str = "output") -> Path:
    """Before any work: an :class:`OutputError` when ``output`` cannot be written (a folder,
    a device, a path under a file, a folder without write permission); returns the target path."""
    target = target_path(output, name=name)
    ancestor = next((p for p in target.absolute().parents if p.exists()), None)
    if ancestor is None or not ancestor.is_dir():
        raise OutputError(f"{name} {str(output)!r} could not be written: {str(ancestor)!r} is not a folder")
    reason = cannot_create_in(ancestor)
    if reason:
        raise OutputError(f"{name} {str(output)!r} could not be written: {str(ancestor)!r} takes no new file ({reason})")
    return target


def cannot_create_in(folder: Path) -> Optional[str]:
    """Why no file can be created in ``folder`` (the OS's reason), or None. Tried for real, with a
    probe file created and removed at once: ``os.access`` reads the permission bits, which root
    ignores and a read-only or virtual file system (``/proc``, ``/sys``) overrides."""
    probe = folder / f".dualview-probe.{secrets.token_hex(4)}.tmp"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as e:
        return e.strerror or type(e).__name__
    probe.unlink()
    return None


def write_atomically(output: PathLike, write: Callable[[Path], None], *, name: str = "output") -> Path:
    """Call ``write(temporary_path)`` and move the result over ``output`` atomically; returns the
    path written. Parent folders are created. An OSError of the write becomes one
    :class:`OutputError` naming ``output`` (``name`` says how the user gave it, e.g. ``-o``)."""
    output = Path(output)
    target = target_path(output, name=name)
    tmp = target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp"
    with _as_output_error(f"{name} {str(output)!r}"):
        target.parent.mkdir(parents=True, exist_ok=True)
        # O_EXCL: never someone else's file; 0o666 & ~umask: the mode open() gives a new file
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        try:
            write(tmp)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                tmp.unlink()
    return target


@contextmanager
def _as_output_error(what: str) -> Iterator[None]:
    """An OSError inside becomes one :class:`OutputError`: "``what`` could not be written: <reason>"."""
    try:
        yield
    except OutputError:
        raise
    except OSError as e:
        reason = e.strerror or str(e) or type(e).__name__
        raise OutputError(f"{what} could not be written: {reason}") from None


def _write_new_file(path: Path, write: Callable[[Path], None]) -> None:
    """``write(path)`` of a new ``path`` (never someone else's file: O_EXCL), which keeps the mode
    ``open()`` gives a new file: a writer that replaces the file (safetensors writes ``0o600``) does not
    choose it."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    mode = path.stat().st_mode & 0o777
    write(path)
    os.chmod(path, mode)


def write_files_atomically(
    folder: PathLike, files: Mapping[str, Optional[Callable[[Path], None]]], *, name: str = "folder"
) -> Path:
    """Write the files of ``folder`` that ``files`` names (file name -> ``write(path)``; None: remove
    that file of an existing folder, once the others are in place) all or none; returns the folder. They are written in a new temporary folder (beside ``folder``, or inside it
    when it exists), which is then renamed to ``folder``, or whose files replace (``os.replace``)
    those of the same names in it; other files of an existing folder are kept. A failed or
    interrupted write leaves no half folder and the old files. Every file gets the mode ``open()``
    gives a new file, the folder the mode ``mkdir`` gives. An OSError is one :class:`OutputError`
    naming ``folder`` (``name`` says what it is)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{name} {str(folder)!r} is an existing file, not a folder: give the path of a folder to write")
    targets = {file: target_path(folder / file, name=f"{name} {str(folder)!r}: the file") for file in files}
    exists = folder.is_dir()
    tmp = (folder if exists else folder.absolute().parent) / f".{folder.name or 'folder'}.{secrets.token_hex(4)}.tmp"
    with _as_output_error(f"{name} {str(folder)!r}"):
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        try:
            writes = {file: write for file, write in files.items() if write is not None}
            for file, write in writes.items():
                _write_new_file(tmp / file, write)
            if not exists:
                try:
                    tmp.rename(folder)
                except OSError:
                    if not folder.is_dir():
                        raise
                    exists = True  # another writer (a second rank of the same job) made it first: join it
            if exists:
                for file in writes:
                    os.replace(tmp / file, targets[file])
                for file in files.keys() - writes.keys():
                    targets[file].unlink(missing_ok=True)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
    return folder
