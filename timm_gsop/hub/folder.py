"""An export folder that appears whole or not at all, and never costs anyone a file.

The export is written into a hidden folder beside OUT_DIR, ``.NAME.partial-XXXXXXXX``, then put in place
by renames, so that the operating system decides every race:

* Create-only: ``os.mkdir(OUT_DIR)`` claims the name (it fails if anything is there, an empty folder
  included), then ``os.rename`` moves the finished folder onto that empty folder of our own; it fails,
  leaving everything, if a file was put into it meanwhile. Of two exports to one OUT_DIR one wins.
* ``force`` replaces an unchanged previous export only: a folder holding just the files its ``MANIFEST``
  lists, with the hashes listed there, checked again right before the swap (a file added or edited up to
  then fails the export). It is renamed aside, and after the swap its listed files are deleted, nothing else.
* A killed export leaves its hidden folder behind; the next export to OUT_DIR reports it, never deletes it.
"""
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Callable, Optional

from huggingface_hub.utils.sha import sha_fileobj

from .run import ExportError

__all__ = ['ALLOWED_FILES', 'MANIFEST', 'StagedFolder']

MANIFEST = '.timm-gsop-export.json'
#: Everything an export folder may hold; anything else (a pickle above all) is an error.
ALLOWED_FILES = ('model.safetensors', 'config.json', 'README.md', MANIFEST)


def _sha256(path: Path) -> str:
    with open(path, 'rb') as f:
        return sha_fileobj(f).hex()


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
    deletes the hidden folder.
    """

    def __init__(self, out_dir: Path, force: bool = False, report: Callable[[str], None] = print):
        self.out_dir, self.report, self.path, self._replaces = Path(out_dir), report, None, None
        if not os.path.lexists(self.out_dir):
            return
        if not force:
            raise ExportError(f'{self.out_dir} already exists; use --force to replace a previous export')
        problem = export_problem(self.out_dir)
        if problem:
            raise ExportError(f'{self.out_dir} {problem}; --force replaces an unchanged previous export only. '
                              f'Move it away or export to another folder.')
        self._replaces = os.lstat(self.out_dir).st_ino

    def _hidden(self, kind: str) -> Path:
        return self.out_dir.parent / f'.{self.out_dir.name}.{kind}-{secrets.token_hex(4)}'

    def __enter__(self) -> Path:
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        for entry in sorted(self.out_dir.parent.iterdir()):
            if entry.name.startswith((f'.{self.out_dir.name}.partial-', f'.{self.out_dir.name}.replaced-')):
                self.report(f'{entry} is left from an export to {self.out_dir} that was interrupted (or is still '
                            f'running); delete it if you do not need it')
        self.path = self._hidden('partial')
        self.path.mkdir()
        return self.path

    def __exit__(self, *exc) -> None:
        if self.path.exists():
            shutil.rmtree(self.path, ignore_errors=True)  # our own folder, not put in place

    def commit(self) -> None:
        """Put the folder at ``out_dir``; ExportError (and nothing touched) if that is no longer safe."""
        files = {p.name: _sha256(p) for p in sorted(self.path.iterdir())}
        (self.path / MANIFEST).write_text(json.dumps({'files': files}, indent=1))
        aside = None
        if self._replaces is not None:  # checked again: a file added or edited since the start is the user's
            same = os.path.lexists(self.out_dir) and os.lstat(self.out_dir).st_ino == self._replaces
            problem = export_problem(self.out_dir) if same else 'was replaced or removed'
            if problem:
                raise ExportError(f'{self.out_dir} {problem} (changed while this export ran); it was left as it is '
                                  f'and nothing was written.')
            aside = self._hidden('replaced')
            os.rename(self.out_dir, aside)
        try:
            _rename_create_only(self.path, self.out_dir)
        except OSError as e:
            try:
                if aside is not None:
                    _rename_create_only(aside, self.out_dir)
            except OSError:
                self.report(f'the previous export is at {aside}: move it back to {self.out_dir}')
            raise ExportError(f'{self.out_dir} {"appeared" if isinstance(e, FileExistsError) else "changed"} while '
                              f'this export ran (another export, or another program); it was left as it is and '
                              f'nothing was written.') from None
        if aside is not None:
            for name in ALLOWED_FILES:
                (aside / name).unlink(missing_ok=True)
            try:
                aside.rmdir()
            except OSError:
                self.report(f'the previous export, now at {aside}, holds other files; they were kept there')
