"""An export folder that appears whole or not at all, and never costs anyone a file.

The export is written into a fresh hidden folder beside OUT_DIR, ``.NAME.partial-XXXXXXXX``, then put
in place by renames, so that the operating system decides every race:

* Create-only: ``os.mkdir(OUT_DIR)`` claims the name (it fails if anything is there, an empty folder
  included), then ``os.rename`` swaps the finished folder onto that empty folder of our own; it fails,
  leaving everything, if a file was put into it meanwhile. Of two exports to one OUT_DIR one wins.
* ``force`` replaces an unchanged previous export only: the folder found at the start, holding just
  the files its ``MANIFEST`` lists, with the hashes listed there. Right before the swap it is renamed
  aside and checked again (a file added or edited up to then: it is put back and the export fails);
  after the swap its listed files are deleted, nothing else.
* Each export holds a ``flock`` on its partial folder. The next export to NAME deletes a partial folder
  nobody holds if it holds export files only, and reports anything else (without ``fcntl``: reports).
"""
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

from .run import ExportError

__all__ = ['ALLOWED_FILES', 'MANIFEST', 'StagedFolder']

MANIFEST = '.timm-gsop-export.json'
#: Everything an export folder may hold; anything else (a pickle above all) is an error.
ALLOWED_FILES = ('model.safetensors', 'config.json', 'README.md', MANIFEST)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


def export_problem(folder: Path) -> Optional[str]:
    """None for an unchanged previous export; else what it is instead."""
    if folder.is_symlink() or not folder.is_dir():
        return 'is not a folder'
    try:
        files = json.loads((folder / MANIFEST).read_text())['files']
        others = sorted({p.name for p in folder.iterdir()} - set(files) - {MANIFEST})
    except (OSError, ValueError, KeyError, TypeError):
        return f'is not a timm-gsop export (no readable {MANIFEST})'
    if others:
        return f'holds files an export does not write ({", ".join(others[:5])})'
    changed = [n for n, digest in files.items() if not (folder / n).is_file() or _sha256(folder / n) != digest]
    return f'holds export files changed since the export ({", ".join(changed)})' if changed else None


def _remove_export_files(folder: Path) -> bool:
    """Delete the files an export writes, then the folder; False if anything else keeps it."""
    for name in ALLOWED_FILES:
        (folder / name).unlink(missing_ok=True)
    try:
        folder.rmdir()
        return True
    except OSError:
        return False


def _lock(path: Path, blocking: bool = False) -> Optional[int]:
    """A descriptor holding an exclusive flock on ``path``; None if another process holds one."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        return fd
    except BlockingIOError:
        os.close(fd)
        return None


def _rename_create_only(src: Path, dst: Path) -> None:
    """Rename the folder ``src`` to ``dst`` if nothing, not even an empty folder, is at ``dst``."""
    os.mkdir(dst)
    try:
        os.rename(src, dst)  # onto our own empty folder; fails if something was put into it
    except OSError:
        if not any(dst.iterdir()):
            dst.rmdir()
        raise


class StagedFolder:
    """``with StagedFolder(out_dir, force) as tmp: write into tmp ...; staged.commit()``.

    ``out_dir`` is checked at construction, before any work; leaving the block without ``commit()``
    deletes the partial folder.
    """

    def __init__(self, out_dir: Path, force: bool = False, report: Callable[[str], None] = print):
        self.out_dir, self.report, self.name = Path(out_dir), report, Path(out_dir).name
        self.path, self._fd, self._replaces = None, None, None
        if not os.path.lexists(self.out_dir):
            return
        if not force:
            raise ExportError(f'{self.out_dir} already exists; use --force to replace a previous export')
        problem = export_problem(self.out_dir)
        if problem:
            raise ExportError(f'{self.out_dir} {problem}; --force replaces an unchanged previous export only. '
                              f'Move it away or export to another folder.')
        self._replaces = os.lstat(self.out_dir).st_ino

    def __enter__(self) -> Path:
        parent = self.out_dir.parent
        parent.mkdir(parents=True, exist_ok=True)
        # Cooperating exports scan for stale folders and make (and lock) their own as one step, so that
        # none takes another's new, not yet locked folder for a stale one.
        parent_fd = _lock(parent, blocking=True) if fcntl else None
        try:
            for entry in sorted(parent.iterdir()):
                if entry.name.startswith((f'.{self.name}.partial-', f'.{self.name}.replaced-')):
                    self._clean_stale(entry)
            self.path = Path(tempfile.mkdtemp(prefix=f'.{self.name}.partial-', dir=parent))
            self._fd = _lock(self.path) if fcntl else None
        finally:
            if parent_fd is not None:
                os.close(parent_fd)
        return self.path

    def __exit__(self, *exc) -> None:
        if self.path.exists():
            shutil.rmtree(self.path, ignore_errors=True)  # our own folder, not put in place
        if self._fd is not None:
            os.close(self._fd)

    def _clean_stale(self, entry: Path) -> None:
        partial = entry.name.startswith(f'.{self.name}.partial-') and entry.is_dir() and not entry.is_symlink()
        fd = _lock(entry) if partial and fcntl else None
        if fd is None:
            self.report(f'another export to {self.out_dir} is running ({entry.name} is in use)' if partial and fcntl
                        else f'left {entry} alone: an interrupted export left it; look inside, then delete it')
            return
        try:
            self.report(f'removed {entry}, the partial folder of an export that was interrupted'
                        if _remove_export_files(entry) else f'left {entry} alone: it holds other files')
        finally:
            os.close(fd)

    def commit(self) -> None:
        """Put the folder at ``out_dir``; ExportError (and nothing touched) if that is no longer safe."""
        files = {p.name: _sha256(p) for p in sorted(self.path.iterdir())}
        (self.path / MANIFEST).write_text(json.dumps({'files': files}, indent=1))
        aside = self._set_aside_previous() if self._replaces is not None else None
        try:
            _rename_create_only(self.path, self.out_dir)
        except OSError as e:
            self._restore(aside)
            raise ExportError(f'{self.out_dir} {"appeared" if isinstance(e, FileExistsError) else "changed"} while '
                              f'this export ran (another export, or another program); it was left as it is and '
                              f'nothing was written.') from None
        if aside is not None and not (_remove_export_files(aside) and _remove_export_files(aside.parent)):
            self.report(f'could not delete all of the previous export, now at {aside}')

    def _set_aside_previous(self) -> Path:
        """Rename the previous export into a hidden folder and check it again there; returns its new path."""
        changed = ExportError(f'{self.out_dir} changed while this export ran (replaced or removed by another '
                              f'export or program); it was left as it is and nothing was written.')
        if not os.path.lexists(self.out_dir) or os.lstat(self.out_dir).st_ino != self._replaces:
            raise changed
        aside = Path(tempfile.mkdtemp(prefix=f'.{self.name}.replaced-', dir=self.out_dir.parent)) / self.name
        os.rename(self.out_dir, aside)
        problem = export_problem(aside)
        if problem:
            self._restore(aside)
            raise ExportError(f'{self.out_dir} {problem} (changed while this export ran); it was left as it is '
                              f'and nothing was written.')
        return aside

    def _restore(self, aside: Optional[Path]) -> None:
        try:
            if aside is not None:
                _rename_create_only(aside, self.out_dir)
                aside.parent.rmdir()
        except OSError:
            self.report(f'the previous export is at {aside}: move it back to {self.out_dir}')
