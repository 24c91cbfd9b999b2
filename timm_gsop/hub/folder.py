"""An export folder that appears whole or not at all, and never costs anyone a file.

The export is written into a fresh hidden folder beside OUT_DIR, ``.NAME.partial-XXXXXXXX``, and put
in place by renames, so the operating system decides every race:

* Create-only: ``os.mkdir(OUT_DIR)`` claims the name (it fails if anything is there, an empty folder
  included), then ``os.rename`` swaps the finished folder onto that empty folder of our own. Of two
  concurrent exports only one can make OUT_DIR; the other fails and leaves it alone. If a file appears
  in the claimed folder meanwhile, the rename fails and the file stays.
* ``force`` replaces a previous export only: a folder holding just the files listed in its
  ``MANIFEST``, each with the hash recorded there, and the very folder found at the start. Right before
  the swap it is renamed aside and checked again there (a file added or edited up to that instant makes
  the export put it back and refuse); then the new folder is put in place as above, and the old one's
  listed files are deleted, never anything else.
* Each export holds a ``flock`` on its partial folder. The next export to NAME deletes a partial folder
  nobody holds if it holds export files only, and reports anything else it finds (a folder set aside by a
  killed ``--force``). Without ``fcntl`` (Windows) they are only reported.
"""
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Dict, Optional

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


def write_manifest(folder: Path) -> None:
    files = {p.name: _sha256(p) for p in sorted(folder.iterdir()) if p.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({'files': files}, indent=1))


def export_problem(folder: Path) -> Optional[str]:
    """None for an unchanged previous export (its manifest's files, hashes matching); else what is not."""
    if folder.is_symlink() or not folder.is_dir():
        return 'is not a folder'
    try:
        files = json.loads((folder / MANIFEST).read_text())['files']
        names = {p.name for p in folder.iterdir()}
    except (OSError, ValueError, KeyError, TypeError):
        return f'is not a timm-gsop export (no readable {MANIFEST})'
    others = sorted(names - set(files) - {MANIFEST})
    if others:
        return f'holds files an export does not write ({", ".join(others[:5])})'
    changed = [n for n, digest in files.items() if not (folder / n).is_file() or _sha256(folder / n) != digest]
    return f'holds export files changed since the export ({", ".join(changed)})' if changed else None


def _remove_export_files(folder: Path) -> bool:
    """Delete the files an export writes, then the folder if that empties it; False if anything else remains."""
    for name in ALLOWED_FILES:
        try:
            (folder / name).unlink()
        except FileNotFoundError:
            pass
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
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _identity(path: Path):
    st = path.lstat()
    return st.st_dev, st.st_ino


def _rename_create_only(src: Path, dst: Path) -> None:
    """Rename the folder ``src`` to ``dst`` only if nothing is at ``dst``, an empty folder included.

    ``mkdir`` claims the name (FileExistsError if taken); a rename onto one's own empty folder replaces
    it, and fails if something was put into it meanwhile (that is then left where it is).
    """
    os.mkdir(dst)
    try:
        os.rename(src, dst)
    except OSError:
        try:
            dst.rmdir()
        except OSError:
            pass
        raise


class StagedFolder:
    """``with StagedFolder(out_dir, force) as tmp: write into tmp ...; staged.commit()``.

    ``out_dir`` is checked at construction, before any work; leaving the block without ``commit()``
    deletes the partial folder.
    """

    def __init__(self, out_dir: Path, force: bool = False, report: Callable[[str], None] = print):
        self.out_dir, self.report = Path(out_dir), report
        self.parent, self.name = self.out_dir.parent, self.out_dir.name
        self.path: Optional[Path] = None
        self._fd: Optional[int] = None
        self._replaces = None
        if not os.path.lexists(self.out_dir):
            return
        if not force:
            raise ExportError(f'{self.out_dir} already exists; use --force to replace a previous export')
        problem = export_problem(self.out_dir)
        if problem:
            raise ExportError(f'{self.out_dir} {problem}; --force replaces an unchanged previous export only. '
                              f'Move it away or export to another folder.')
        self._replaces = _identity(self.out_dir)

    def __enter__(self) -> Path:
        self.parent.mkdir(parents=True, exist_ok=True)
        # Scanning for stale folders and making (and locking) ours is one step for cooperating exports,
        # so that none takes another's new, not yet locked folder for a stale one.
        parent_fd = _lock(self.parent, blocking=True) if fcntl is not None else None
        try:
            self._clean_stale()
            self.path = Path(tempfile.mkdtemp(prefix=f'.{self.name}.partial-', dir=self.parent))
            self._fd = _lock(self.path) if fcntl is not None else None
        finally:
            if parent_fd is not None:
                os.close(parent_fd)
        return self.path

    def __exit__(self, *exc) -> None:
        if self.path is not None and self.path.exists():
            shutil.rmtree(self.path, ignore_errors=True)  # our own mkdtemp folder, never renamed into place
        if self._fd is not None:
            os.close(self._fd)

    def _clean_stale(self) -> None:
        for entry in sorted(self.parent.iterdir()):
            partial = entry.name.startswith(f'.{self.name}.partial-')
            if not partial and not entry.name.startswith(f'.{self.name}.replaced-'):
                continue
            if not partial or fcntl is None or entry.is_symlink() or not entry.is_dir():
                self.report(f'left {entry} alone: an interrupted export left it; look inside, then delete it '
                            f'or move it back')
                continue
            fd = _lock(entry)
            if fd is None:
                self.report(f'another export to {self.out_dir} is running ({entry.name} is in use)')
                continue
            try:
                if _remove_export_files(entry):
                    self.report(f'removed {entry}, the partial folder of an export that was interrupted')
                else:
                    self.report(f'left {entry} alone: it holds files an export does not write')
            finally:
                os.close(fd)

    def commit(self) -> None:
        """Put the folder at ``out_dir``; ExportError (and nothing touched) if that is no longer safe."""
        write_manifest(self.path)
        aside = self._set_aside_previous() if self._replaces is not None else None
        try:
            _rename_create_only(self.path, self.out_dir)
        except OSError as e:
            self._restore(aside)
            what = 'appeared' if isinstance(e, FileExistsError) else 'changed'
            raise ExportError(f'{self.out_dir} {what} while this export ran (another export, or another program); '
                              f'it was left as it is and nothing was written.') from None
        if aside is not None and not (_remove_export_files(aside) and _remove_export_files(aside.parent)):
            self.report(f'could not delete all of the previous export, now at {aside}')

    def _set_aside_previous(self) -> Path:
        """Rename the previous export into a hidden folder and check it there; returns its new path."""
        if not os.path.lexists(self.out_dir) or _identity(self.out_dir) != self._replaces:
            raise ExportError(f'{self.out_dir} changed while this export ran (replaced or removed by another export '
                              f'or program); it was left as it is and nothing was written.')
        aside = Path(tempfile.mkdtemp(prefix=f'.{self.name}.replaced-', dir=self.parent)) / self.name
        os.rename(self.out_dir, aside)
        problem = export_problem(aside)
        if problem:
            self._restore(aside)
            raise ExportError(f'{self.out_dir} {problem} (changed while this export ran); it was left as it is '
                              f'and nothing was written.')
        return aside

    def _restore(self, aside: Optional[Path]) -> None:
        if aside is None:
            return
        try:
            _rename_create_only(aside, self.out_dir)
            aside.parent.rmdir()
        except OSError:
            self.report(f'the previous export is at {aside}: move it back to {self.out_dir}')
