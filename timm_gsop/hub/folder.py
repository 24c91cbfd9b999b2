"""An export folder that appears whole or not at all, and never costs anyone a file: written into a hidden folder
beside OUT_DIR, put in place by renames so that the operating system decides every race. A killed export's hidden
folder is reported by the next export to OUT_DIR, never deleted."""
import json
import os
import secrets
import shutil
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Iterator, Optional

from huggingface_hub.utils.sha import sha_fileobj

from .run import ExportError, report

__all__ = ['ALLOWED_FILES', 'MANIFEST', 'check_out_dir', 'staged_folder']

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


def check_out_dir(out_dir: Path, force: bool) -> Optional[int]:
    """None if ``out_dir`` is free, else the inode of an unchanged previous export that ``force`` may replace."""
    if not os.path.lexists(out_dir):
        return None
    if not force:
        raise ExportError(f'{out_dir} already exists; use --force to replace a previous export')
    problem = export_problem(out_dir)
    if problem:
        raise ExportError(f'{out_dir} {problem}; --force replaces an unchanged previous export only. '
                          f'Move it away or export to another folder.')
    return os.lstat(out_dir).st_ino


def _rename_create_only(src: Path, dst: Path) -> None:
    os.mkdir(dst)  # claims the name: fails if anything, an empty folder included, is there
    try:
        os.rename(src, dst)  # onto our own empty folder; fails if something was put into it
    except OSError:
        with suppress(OSError):
            dst.rmdir()  # only while it is empty
        raise


@contextmanager
def staged_folder(out_dir: Path, replaces: Optional[int]) -> Iterator[Path]:
    """A hidden folder to write into, put at ``out_dir`` when the block ends without error, replacing the export
    ``check_out_dir`` found only if it is still unchanged; ExportError, and nothing touched, if not."""
    hidden = f'.{out_dir.name}.'  # then partial-XXXXXXXX (an export's folder), replaced-XXXXXXXX (the previous one)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    for entry in sorted(out_dir.parent.iterdir()):
        if entry.name.startswith((hidden + 'partial-', hidden + 'replaced-')):
            report(f'warning: {entry} is left from an export to {out_dir} that was interrupted (or is still running); '
                   f'delete it if you do not need it')
    tmp, aside = out_dir.parent / f'{hidden}partial-{secrets.token_hex(4)}', None
    tmp.mkdir()
    try:
        yield tmp
        files = {p.name: _sha256(p) for p in sorted(tmp.iterdir())}
        (tmp / MANIFEST).write_text(json.dumps({'files': files}, indent=1))
        if replaces is not None:  # checked again: a file added or edited since the start is the user's
            same = os.path.lexists(out_dir) and os.lstat(out_dir).st_ino == replaces
            problem = export_problem(out_dir) if same else 'was replaced or removed'
            if problem:
                raise ExportError(f'{out_dir} {problem} (changed while this export ran); it was left as it is '
                                  f'and nothing was written.')
            aside = out_dir.parent / f'{hidden}replaced-{secrets.token_hex(4)}'
            os.rename(out_dir, aside)
        try:
            _rename_create_only(tmp, out_dir)
        except OSError as e:
            if aside is not None:
                with suppress(OSError):
                    _rename_create_only(aside, out_dir)
                if aside.exists():
                    report(f'warning: the previous export is at {aside}: move it back to {out_dir}')
            raise ExportError(f'{out_dir} {"appeared" if isinstance(e, FileExistsError) else "changed"} while this '
                              f'export ran (another export, or another program); it was left as it is and nothing '
                              f'was written.') from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # our own folder, if it was not put in place
    if aside is not None:
        for name in ALLOWED_FILES:
            (aside / name).unlink(missing_ok=True)
        with suppress(OSError):
            aside.rmdir()
        if aside.exists():
            report(f'warning: the previous export, now at {aside}, holds other files; they were kept there')
