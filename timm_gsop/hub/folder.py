"""An export folder that appears whole or not at all, and never costs anyone a file.

The folder is written under a hidden sibling name, ``.NAME.partial-XXXXXXXX``, and put in place by
one atomic rename at the end:

* Without ``force`` the rename never replaces anything (Linux ``renameat2(RENAME_NOREPLACE)``): if
  something appeared at NAME while the export ran, the export fails and leaves it alone, so of two
  concurrent exports to one NAME exactly one succeeds.
* With ``force`` only a previous export (a folder of export files, nothing else) can be replaced,
  and only the very folder that was there when the export began: the new and old folders swap in
  one step (``RENAME_EXCHANGE``), so NAME never goes missing, then the old one is deleted.
* Each export holds an advisory lock on its partial folder. A partial folder nobody holds was left
  by an export that was killed: the next export to NAME deletes it if it holds export files only,
  and reports it otherwise.

Where ``renameat2`` is missing (not Linux, or a file system without it) a check and a plain rename
do the same under a lock that cooperating exports share. Without ``fcntl`` (Windows) leftovers are
only reported.
"""
import ctypes
import errno
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Tuple

from .messages import ExportError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

__all__ = ['ALLOWED_FILES', 'StagedFolder']

#: Everything an exported folder may hold; anything else (a pickle above all) is an error.
ALLOWED_FILES = ('model.safetensors', 'config.json', 'README.md', 'training_curves.png')

_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)``; False where the system has no such call or flag."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL):  # EINVAL: the file system does not support the flag
        return False
    raise OSError(err, os.strerror(err), str(dst))


def _identity(path: Path) -> Optional[Tuple[int, int]]:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _is_export(path: Path) -> bool:
    """A real folder holding export files only (what an export may replace or clean up)."""
    if path.is_symlink() or not path.is_dir():
        return False
    return all(p.name in ALLOWED_FILES and p.is_file() and not p.is_symlink() for p in path.iterdir())


def _try_lock(path: Path) -> Optional[int]:
    """An open descriptor holding an exclusive lock on the folder ``path``, or None if another process holds it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


@contextmanager
def _exports_locked(parent: Path) -> Iterator[None]:
    """Serialises the short steps of exports into one parent folder (scan, create, final rename)."""
    if fcntl is None:
        yield
        return
    fd = os.open(parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class StagedFolder:
    """``with StagedFolder(out_dir, force) as tmp: write into tmp ...; staged.commit()``.

    The checks of ``out_dir`` happen at construction (before any work); leaving the block without
    ``commit()`` deletes the partial folder, and only it.
    """

    def __init__(self, out_dir: Path, force: bool = False, keep: Sequence[Path] = (),
                 report: Callable[[str], None] = lambda msg: None):
        self.out_dir = Path(out_dir)
        self.parent, self.name = self.out_dir.parent, self.out_dir.name
        self.report = report
        self.path: Optional[Path] = None
        self._fd: Optional[int] = None
        self._committed = False
        self._replaces = _identity(self.out_dir)  # what --force may replace: the folder there now, if any
        if self._replaces is None:
            return
        if not force:
            raise ExportError(f'{self.out_dir} already exists; use --force to replace a previous export')
        if self.out_dir.is_symlink() or not self.out_dir.is_dir():
            raise ExportError(f'{self.out_dir} exists and is not a folder; not replacing it')
        resolved = self.out_dir.resolve()
        if any(resolved == k.resolve() or resolved in k.resolve().parents for k in keep):
            raise ExportError(f'{self.out_dir} holds the checkpoint; export to another folder')
        if not _is_export(self.out_dir):
            others = sorted(p.name for p in self.out_dir.iterdir() if p.name not in ALLOWED_FILES or not p.is_file())
            raise ExportError(
                f'{self.out_dir} holds files an export does not write ({", ".join(others[:5])}'
                f'{", ..." if len(others) > 5 else ""}); --force replaces previous exports only. '
                f'Move those files away or export to another folder.')

    def __enter__(self) -> Path:
        self.parent.mkdir(parents=True, exist_ok=True)
        with _exports_locked(self.parent):
            self._clean_stale()
            self.path = Path(tempfile.mkdtemp(prefix=f'.{self.name}.partial-', dir=self.parent))
            if fcntl is not None:
                self._fd = _try_lock(self.path)
        return self.path

    def __exit__(self, *exc) -> None:
        try:
            if not self._committed and self.path is not None:
                shutil.rmtree(self.path, ignore_errors=True)
        finally:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def _clean_stale(self) -> None:
        """Delete the partial folders of killed exports to this name (export files only); report the rest."""
        prefix = f'.{self.name}.partial-'
        for entry in sorted(self.parent.iterdir()):
            if not entry.name.startswith((prefix, f'.{self.name}.replaced-')) or entry.is_symlink():
                continue
            if entry.name.startswith(prefix) and entry.is_dir() and fcntl is not None:
                fd = _try_lock(entry)
                if fd is None:
                    self.report(f'another export to {self.out_dir} is running ({entry.name} is in use)')
                    continue
                try:
                    if _is_export(entry):
                        shutil.rmtree(entry)
                        self.report(f'removed {entry}, the partial folder of an export that was interrupted')
                        continue
                finally:
                    os.close(fd)
            self.report(f'left {entry} alone: an interrupted export left it, but it holds other files or '
                        f'an earlier {self.name}; look inside, then delete it or move it back')

    def commit(self) -> None:
        """Put the folder at ``out_dir`` (see the module docstring); ExportError if that is no longer safe."""
        with _exports_locked(self.parent):
            if self._replaces is None:
                self._rename_into_place()
                old = None
            else:
                old = self._exchange_with_previous()
            self._committed = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
            if old.exists():
                self.report(f'could not delete the previous export, now at {old}')

    def _rename_into_place(self) -> None:
        appeared = ExportError(
            f'{self.out_dir} appeared while this export ran (another export, or another program); it was left '
            f'as it is and nothing was written. Export again to another folder, or with --force to replace '
            f'a previous export.')
        try:
            if not _renameat2(self.path, self.out_dir, _RENAME_NOREPLACE):
                if os.path.lexists(self.out_dir):
                    raise appeared
                os.rename(self.path, self.out_dir)
        except OSError as e:
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                raise appeared from e
            raise

    def _exchange_with_previous(self) -> Path:
        """Swap the new folder in; returns where the previous one now is."""
        changed = ExportError(
            f'{self.out_dir} changed while this export ran (replaced or removed by another export or program); '
            f'it was left as it is and nothing was written.')
        if _identity(self.out_dir) != self._replaces:
            raise changed
        if _renameat2(self.path, self.out_dir, _RENAME_EXCHANGE):
            if _identity(self.path) != self._replaces:  # replaced in the instant between check and swap
                _renameat2(self.path, self.out_dir, _RENAME_EXCHANGE)
                raise changed
            return self.path
        # No atomic exchange here: move the previous folder aside (reported, never deleted, if a
        # kill comes between the two renames), then rename the new one into place.
        aside = Path(tempfile.mkdtemp(prefix=f'.{self.name}.replaced-', dir=self.parent))
        os.rename(self.out_dir, aside / self.name)
        try:
            os.rename(self.path, self.out_dir)
        except OSError:
            os.rename(aside / self.name, self.out_dir)
            os.rmdir(aside)
            raise
        return aside

