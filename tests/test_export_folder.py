"""The export never destroys what it did not make: OUT_DIR existing, appearing or changing during an
export, two exports racing for one OUT_DIR, --force over previous exports and over anything else, a
killed export (a real SIGKILL: its folder is reported by the next), OS errors.

A small checkpoint (one bottleneck per stage) keeps each export to a few seconds.
"""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import timm_gsop  # noqa: F401
from timm_gsop import cli
from timm_gsop.hub import MANIFEST, export

from export_helpers import assert_publishable, leftovers, make_model

SMALL = dict(layers=(1, 1, 1, 1), attn_dim=16, num_classes=5)


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp('ckpt') / 'small.pth.tar'
    torch.save({'state_dict': make_model('gsop_resnet50', 21, **SMALL).state_dict()}, path)
    return path


def _export(checkpoint, out, *extra) -> int:
    return cli.main(['export', str(checkpoint), str(out), '--model', 'gsop_resnet50', '-q',
                     '--model-kwargs', 'layers=(1, 1, 1, 1)', *extra])


def _during_export(monkeypatch, action):
    """Run ``action()`` while an export is under way: after its folder is written, before it is put in place."""
    verify = export._verify

    def verify_then_act(*args, **kwargs):
        verify(*args, **kwargs)
        action()
    monkeypatch.setattr(export, '_verify', verify_then_act)


def _files(path):
    return {p.name: p.read_bytes() for p in path.iterdir()}


def test_existing_out_dir_is_never_touched_without_force(checkpoint, tmp_path, capsys):
    for make in (lambda p: p.mkdir(), lambda p: p.write_text('mine')):  # an empty folder, a file
        out = tmp_path / f'out{len(list(tmp_path.iterdir()))}'
        make(out)
        before = sorted(os.listdir(out)) if out.is_dir() else out.read_text()
        assert _export(checkpoint, out) == 1
        assert 'already exists; use --force' in capsys.readouterr().err
        assert (sorted(os.listdir(out)) if out.is_dir() else out.read_text()) == before
        assert not leftovers(out)


def test_force_replaces_an_unchanged_previous_export_and_nothing_else(checkpoint, tmp_path, capsys):
    out = tmp_path / 'export'
    assert _export(checkpoint, out) == 0
    first = out.stat().st_ino
    assert _export(checkpoint, out, '--force') == 0
    assert out.stat().st_ino != first and not leftovers(out)
    assert_publishable(out)

    def refused(folder, message):
        before = _files(folder) if folder.is_dir() and not folder.is_symlink() else None
        assert _export(checkpoint, folder, '--force') == 1
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert before is None or _files(folder) == before
        assert not leftovers(folder)

    (out / 'README.md').write_text('my own card')  # an edited export file is the user's now
    refused(out, 'holds export files changed since the export (README.md)')
    (out / 'README.md').unlink()
    refused(out, 'holds export files changed since the export (README.md)')  # a deleted one too

    other = tmp_path / 'other'
    assert _export(checkpoint, other) == 0
    (other / 'notes.txt').write_text('mine')
    refused(other, 'holds files an export does not write (notes.txt)')

    readme_only = tmp_path / 'readme_only'  # named like an export file, but never an export
    readme_only.mkdir()
    (readme_only / 'README.md').write_text('# my project')
    refused(readme_only, f'is not a timm-gsop export (no readable {MANIFEST})')

    link = tmp_path / 'link'
    link.symlink_to(other, target_is_directory=True)
    refused(link, 'is not a folder')
    assert (other / 'notes.txt').read_text() == 'mine'


@pytest.mark.parametrize('change', ['add a file', 'edit a file'])
def test_force_never_loses_a_change_made_while_the_export_runs(checkpoint, tmp_path, capsys, monkeypatch, change):
    out = tmp_path / 'export'
    assert _export(checkpoint, out) == 0

    def user_change():
        if change == 'add a file':
            (out / 'notes.txt').write_text('mine')
        else:
            (out / 'README.md').write_text('my own card')
    _during_export(monkeypatch, user_change)
    before = None
    assert _export(checkpoint, out, '--force') == 1
    err = capsys.readouterr().err
    assert '(changed while this export ran)' in err and len(err.strip().splitlines()) == 1
    before = _files(out)
    assert (before.get('notes.txt') == b'mine') if change == 'add a file' else before['README.md'] == b'my own card'
    assert 'model.safetensors' in before and not leftovers(out)


@pytest.mark.parametrize('what', ['a folder with a file', 'an empty folder'])
def test_out_dir_appearing_during_the_export_is_left_alone(checkpoint, tmp_path, capsys, monkeypatch, what):
    out = tmp_path / 'export'

    def appear():  # an empty folder is what a plain rename would silently replace
        out.mkdir()
        if what == 'a folder with a file':
            (out / 'mine.txt').write_text('mine')
    _during_export(monkeypatch, appear)
    assert _export(checkpoint, out) == 1
    assert 'appeared while this export ran' in capsys.readouterr().err
    assert os.listdir(out) == (['mine.txt'] if what == 'a folder with a file' else [])
    assert not leftovers(out)


def test_of_two_racing_exports_exactly_one_wins(checkpoint, tmp_path, capsys, monkeypatch):
    """A second export runs to the end while the first is between writing and renaming its folder."""
    out, results = tmp_path / 'export', []
    _during_export(monkeypatch, lambda: (monkeypatch.undo(), results.append(_export(checkpoint, out))))
    results.insert(0, _export(checkpoint, out))
    assert results == [1, 0]  # [first, second]
    assert 'appeared while this export ran' in capsys.readouterr().err
    assert_publishable(out)

    # both with --force over that export: the second replaces it first, so the first must not replace the second's
    results.clear()
    second = []
    _during_export(monkeypatch, lambda: (monkeypatch.undo(), results.append(_export(checkpoint, out, '--force')),
                                         second.append(out.stat().st_ino)))
    results.insert(0, _export(checkpoint, out, '--force'))
    assert results == [1, 0]
    assert 'changed while this export ran' in capsys.readouterr().err
    assert out.stat().st_ino == second[0] and not leftovers(out)


def test_two_export_processes_to_one_out_dir(checkpoint, tmp_path):
    """The same, for real: two processes started together; whichever comes second fails, at the start or at the end."""
    out = tmp_path / 'export'
    cmd = [sys.executable, '-m', 'timm_gsop', 'export', str(checkpoint), str(out), '--model', 'gsop_resnet50', '-q',
           '--model-kwargs', 'layers=(1, 1, 1, 1)']
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.communicate()[1]) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 1], results
    loser = next(err for rc, err in results if rc == 1)
    assert 'already exists' in loser or 'appeared while this export ran' in loser
    assert_publishable(out)


def test_killed_export_leaves_out_dir_whole_and_its_folder_is_reported_next_time(checkpoint, tmp_path, capsys):
    """SIGKILL in the middle of --force over a previous export (a full-size model: the export takes seconds)."""
    full = tmp_path / 'full.pth.tar'
    torch.save({'state_dict': make_model('gsop_resnet50', 22, attn_dim=16, num_classes=5).state_dict()}, full)
    out = tmp_path / 'export'
    assert _export(checkpoint, out) == 0
    previous = _files(out)

    proc = subprocess.Popen(
        [sys.executable, '-m', 'timm_gsop', 'export', str(full), str(out), '--model', 'gsop_resnet50',
         '--force', '-q'], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    try:
        while not any((p / 'config.json').exists() for p in leftovers(out)):  # the weights are written
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.005)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert _files(out) == previous  # untouched
    stale = leftovers(out)
    assert len(stale) == 1 and (stale[0] / 'model.safetensors').exists()

    assert cli.main(['export', str(full), str(out), '--model', 'gsop_resnet50', '--force', '-q']) == 0
    err = capsys.readouterr().err
    assert f'{stale[0]} is left from an export to {out} that was interrupted' in err
    assert 'delete it if you do not need it' in err and len(err.strip().splitlines()) == 1
    assert leftovers(out) == stale and (stale[0] / 'model.safetensors').exists()  # reported, never deleted
    shutil.rmtree(stale[0])
    assert_publishable(out)
    assert json.loads((out / 'config.json').read_text())['model_args']['attn_dim'] == 16


def test_hidden_folders_of_other_exports_are_reported_not_touched(checkpoint, tmp_path, capsys):
    out = tmp_path / 'export'
    partial = tmp_path / '.export.partial-mine'  # a killed export's, or a running one's
    partial.mkdir()
    (partial / 'notes.txt').write_text('mine')
    aside = tmp_path / '.export.replaced-abc'  # a --force killed between its two renames
    aside.mkdir()
    (aside / 'README.md').write_text('the previous export')
    assert _export(checkpoint, out) == 0
    err = capsys.readouterr().err
    assert f'{partial} is left from an export' in err and f'{aside} is left from an export' in err
    assert (partial / 'notes.txt').read_text() == 'mine'
    assert (aside / 'README.md').read_text() == 'the previous export'


def test_os_errors_and_odd_names_are_one_line(checkpoint, tmp_path, capsys, monkeypatch):
    (tmp_path / 'a-file').write_text('')
    assert _export(checkpoint, tmp_path / 'a-file' / 'export') == 1
    err = capsys.readouterr().err
    assert err.startswith('timm-gsop export: error: ') and len(err.strip().splitlines()) == 1
    assert 'a-file' in err and 'Traceback' not in err

    assert _export(checkpoint, tmp_path / os.fsdecode(b'out\xff')) == 1  # not UTF-8: cannot name it on the card
    err = capsys.readouterr().err
    assert 'is not UTF-8 text' in err and len(err.strip().splitlines()) == 1
    assert not leftovers(tmp_path / os.fsdecode(b'out\xff'))

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), 'model.safetensors')
    monkeypatch.setattr('safetensors.torch.save_file', disk_full)
    out = tmp_path / 'export'
    assert _export(checkpoint, out) == 1
    err = capsys.readouterr().err
    assert err.strip() == 'timm-gsop export: error: No space left on device: model.safetensors'
    assert not out.exists() and not leftovers(out)


def test_unusable_weights_are_one_line_errors(tmp_path, capsys):
    """Integer keys; float64 values beyond float32 (inf once in the model); finite weights with non-finite logits."""
    state_dict = make_model('gsop_resnet50', 23, **SMALL).state_dict()
    cases = {
        'int-key': ({0: torch.zeros(1), **state_dict}, 'maps parameter names (strings) to tensors'),
        'float64': (dict(state_dict, **{'fc.bias': torch.full((5,), 1e300, dtype=torch.float64)}),
                    'non-finite values (NaN or inf'),
        'logits': (dict(state_dict, **{'fc.weight': torch.full((5, 2048), 3e38)}), 'give non-finite logits'),
    }
    for name, (weights, message) in cases.items():
        torch.save({'state_dict': weights}, tmp_path / f'{name}.pth')
        assert _export(tmp_path / f'{name}.pth', tmp_path / 'out') == 1, name
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1 and 'Traceback' not in err, (name, err)
        assert not (tmp_path / 'out').exists() and not leftovers(tmp_path / 'out')


def test_a_file_without_weights_is_named_whatever_its_name(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({'fc.weight': 1.0}, 'x')  # its name is a substring of the message ("expected")
    assert _export('x', tmp_path / 'out') == 1
    assert capsys.readouterr().err.strip().startswith('timm-gsop export: error: x: the checkpoint holds no state dict')
