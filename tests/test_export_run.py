"""An export reproduces its own card: what a Hub user does with it gives the card's numbers.

A small training run on the generated shapes (3 classes) at 64 px / crop 0.9 with its own mean and
std, laid out as train.py leaves it (checkpoint, args.yaml, summary.csv with the validation top-1
computed as train.py computes it), is exported; the folder is then evaluated exactly as the card's
usage code does (``resolve_model_data_config`` + ``create_transform``, class names from the config).
Also: preprocessing options, and card facts derived from the model and the run.
"""
import json
import re

import pytest
import torch
from PIL import Image

import timm
import timm_gsop  # noqa: F401
from timm.data import create_dataset, create_loader, create_transform, resolve_data_config, resolve_model_data_config
from timm_gsop import cli
from timm_gsop.launcher.demo_data import make_demo_dataset
from timm_gsop.hub import card

from export_helpers import assert_publishable, make_model, write_run

MODEL_KWARGS = dict(layers=[1, 1, 1, 1], attn_dim=16)
RUN_ARGS = dict(  # as train.py writes args.yaml (data_dir filled in by the fixture)
    model='gsop_resnet50', model_kwargs=MODEL_KWARGS, num_classes=3, dataset='', train_split='train',
    val_split='validation', class_map='', img_size=64, input_size=None, crop_pct=0.9, interpolation='',
    mean=[0.5, 0.45, 0.4], std=[0.25, 0.25, 0.25], epochs=2, batch_size=12, opt='adamw', lr=2e-3)


def _tuples(config):  # config.json gives lists
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}


def _top1(model, files, transform, names) -> float:
    with torch.no_grad():
        preds = model(torch.stack([transform(Image.open(f).convert('RGB')) for f in files])).argmax(-1)
    return 100.0 * sum(names[p] == f.parent.name for p, f in zip(preds.tolist(), files)) / len(files)


@pytest.fixture(scope='module')
def shapes_run(tmp_path_factory):
    root = tmp_path_factory.mktemp('shapes')
    data = make_demo_dataset(str(root / 'data'), train_per_class=8, val_per_class=10, num_classes=3, size=80)
    args = dict(RUN_ARGS, data_dir=data)
    torch.manual_seed(0)
    model = timm.create_model('gsop_resnet50', num_classes=3, **MODEL_KWARGS).eval()
    data_config = resolve_data_config(args, model=model)  # what train.py does with its arguments
    train = create_loader(create_dataset('', root=data, split='train'), batch_size=24, is_training=False,
                          use_prefetcher=False, num_workers=0, **{k: data_config[k] for k in ('input_size', 'mean', 'std')})
    x, y = next(iter(train))
    with torch.no_grad():
        features = model.forward_head(model.forward_features(x), pre_logits=True)
    optimizer = torch.optim.AdamW(model.fc.parameters(), lr=args['lr'])
    for _ in range(200):  # a linear probe is training enough: predictions that depend on the image
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model.fc(features), y).backward()
        optimizer.step()
    val = create_loader(create_dataset('', root=data, split='validation'), batch_size=30, is_training=False,
                        use_prefetcher=False, num_workers=0, input_size=data_config['input_size'],
                        interpolation=data_config['interpolation'], mean=data_config['mean'], std=data_config['std'],
                        crop_pct=data_config['crop_pct'])  # train.py's validation loader
    with torch.no_grad():
        correct = sum(int((model(x).argmax(-1) == y).sum()) for x, y in val)
    top1 = 100.0 * correct / len(val.dataset)
    summary = f'epoch,train_loss,eval_loss,eval_top1,eval_top5\n0,1.1,1.0,40.0,100.0\n1,0.9,0.8,{top1},100.0\n'
    checkpoint = write_run(root / 'run', model, args, summary=summary, epoch=1, metric=top1)
    files = sorted((root / 'data' / 'validation').glob('*/*.png'))
    return dict(checkpoint=checkpoint, model=model, top1=top1, files=files, args=args)


def test_the_card_snippet_reproduces_the_cards_top1(shapes_run, tmp_path):
    out = tmp_path / 'shapes-export'
    assert cli.main(['export', str(shapes_run['checkpoint']), str(out), '--model', 'gsop_resnet50', '-q']) == 0
    assert_publishable(out)
    readme = (out / 'README.md').read_text()
    card_top1 = float(re.search(r'\| this checkpoint \| 1 \| ([\d.]+) \|', readme).group(1))

    # the Hub user, with the card's own code
    model = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    data_config = resolve_model_data_config(model)
    transform = create_transform(**data_config, is_training=False)
    names = model.pretrained_cfg['label_names']
    top1 = _top1(model, shapes_run['files'], transform, names)
    assert f'{top1:.2f}' == f'{card_top1:.2f}' == f'{shapes_run["top1"]:.2f}'

    assert _tuples(data_config) == dict(input_size=(3, 64, 64), interpolation='bilinear', mean=(0.5, 0.45, 0.4),
                                        std=(0.25, 0.25, 0.25), crop_pct=0.9, crop_mode='center')
    assert names == ['circle', 'ring', 'square']  # the class folders, in timm's order
    assert 'test_input_size' not in model.pretrained_cfg  # validated at the training size
    # what an export with the architecture's defaults (224 px, crop 0.875, ImageNet mean/std) gives instead
    defaults = timm.models.get_pretrained_cfg('gsop_resnet50').to_dict()
    default = create_transform(**resolve_data_config({}, pretrained_cfg=defaults), is_training=False)
    assert _top1(model, shapes_run['files'], default, names) != top1

    assert 'at 64x64 px, resize + center crop with crop_pct 0.9, bilinear interpolation' in readme
    assert 'usage code below reproduces these numbers' in readme
    assert '**Training data:** the image folder `data`' in readme and 'split `validation`' in readme
    assert '**Classes:** 3: circle, ring, square' in readme
    assert "print([model.pretrained_cfg['label_names'][i] for i in top_classes[0]])" in readme
    arch = 'GSoP-Net1 on a ResNet-14 (1, 1, 1, 1 bottlenecks per stage); a GSoP block (attn_mode `channel`, ' \
           'attn_dim 16: 16x16 channel covariance) after bn3 of the last bottleneck of stages 1, 2, 3, 4'
    assert arch in readme and 'output stride 16' in readme and '4x4 at 64x64' in readme
    macs = card.measure('gsop_resnet50', json.loads((out / 'config.json').read_text())['model_args'], (3, 64, 64))[0]
    assert f'**GMACs (64x64):** {macs / 1e9:.2f}' in readme
    assert f'**Params (M):** {sum(p.numel() for p in model.parameters()) / 1e6:.2f}' in readme
    assert 'license: unknown' in readme and '**License:** none given by the publisher' in readme
    assert 'license' not in model.pretrained_cfg and 'mit' not in (out / 'config.json').read_text()


def test_preprocessing_class_names_dataset_and_licence_options(shapes_run, tmp_path):
    labels = tmp_path / 'labels.txt'
    labels.write_text('round\nhollow\nboxy\n')
    out = tmp_path / 'export'
    assert cli.main([
        'export', str(shapes_run['checkpoint']), str(out), '--model', 'gsop_resnet50', '-q',
        '--img-size', '72', '--crop-pct', '1.0', '--interpolation', 'bicubic', '--crop-mode', 'squash',
        '--mean', '0.5', '--std', '0.2', '--test-img-size', '96', '80', '--test-crop-pct', '0.95',
        '--label-names', str(labels), '--dataset-name', 'Shapes-3', '--license', 'cc-by-4.0']) == 0
    model = timm.create_model(f'local-dir:{out}', pretrained=True)
    assert _tuples(resolve_model_data_config(model)) == dict(
        input_size=(3, 72, 72), interpolation='bicubic', mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2), crop_pct=1.0,
        crop_mode='squash')
    test = resolve_model_data_config(model, use_test_size=True)
    assert tuple(test['input_size']) == (3, 96, 80) and test['crop_pct'] == 0.95
    assert model.pretrained_cfg['label_names'] == ['round', 'hollow', 'boxy']
    assert model.pretrained_cfg['license'] == 'cc-by-4.0'
    readme = (out / 'README.md').read_text()
    assert 'license: cc-by-4.0' in readme and '**License:** `cc-by-4.0`' in readme
    assert '**Training data:** Shapes-3' in readme and '3: round, hollow, boxy' in readme
    assert 'preprocessing was set differently at export' in readme  # the top-1 was measured at 64 px
    assert 'recommended at test time: 96x80, crop_pct 0.95' in readme and '**GMACs (72x72):**' in readme


@pytest.mark.parametrize('option,message', [
    (['--crop-pct', '1.5'], 'crop_pct must be a number in (0, 1]'),
    (['--crop-mode', 'zoom'], 'crop_mode must be one of center, squash, border'),
    (['--img-size', '16'], 'img_size must be one or two integers from 64 to 4096 (px), got 16'),
    (['--img-size', '30000'], 'img_size must be one or two integers from 64 to 4096 (px), got 30000'),
    (['--std', '0.2', '0', '0.2'], 'std needs 1 or 3 finite numbers > 0'),
    (['--std', 'inf'], 'std needs 1 or 3 finite numbers > 0, got [inf]'),  # config.json must stay JSON
    (['--mean', 'nan', '0.5', '0.5'], 'mean needs 1 or 3 finite numbers, got [nan, 0.5, 0.5]'),
    (['--label-names', 'LABELS'], '2 label names given for a classifier of 3 classes'),
    (['--label-names', 'LATIN1'], 'cannot read the label names file'),
    (['--license', 'mit\nfoo: bar'], "--license 'mit\\nfoo: bar' is not a Hub licence id; choose one of apache-2.0, "),
    (['--license', 'my-licence'], "--license 'my-licence' is not a Hub licence id; choose one of apache-2.0, "),
    (['--dataset-name', 'a\nb'], '--dataset-name must be one line of printable text'),
    (['--model-kwargs', 'pretrained=True'], 'pretrained cannot be given as model kwargs'),
    (['--model-kwargs', 'checkpoint_path="x"'], 'checkpoint_path cannot be given as model kwargs'),
    # sizes the weights do not have: refused (by the constructor's bounds, or as not fitting the weights on the
    # meta device) before anything of that size is allocated; the fit explanation takes several lines
    (['--model-kwargs', 'attn_dim=30000'], 'attn_dim must be an integer in [1, 2048]'),
    (['--model-kwargs', 'num_classes=1e11'], 'num_classes'),
    (['--model-kwargs', 'num_classes=100000000000'], 'num_classes must be an integer in [0, 1000000]'),
    (['--model-kwargs', 'layers=[1000000, 1, 1, 1]'], 'layers'),
])
def test_bad_export_options_are_clear_errors(shapes_run, tmp_path, capsys, option, message):
    (tmp_path / 'labels.txt').write_text('a\nb\n')
    (tmp_path / 'latin1.txt').write_bytes('r\xf6nd\nhollow\nboxy\n'.encode('latin-1'))
    option = [str(tmp_path / {'LABELS': 'labels.txt', 'LATIN1': 'latin1.txt'}[o]) if o in ('LABELS', 'LATIN1') else o
              for o in option]
    assert cli.main(['export', str(shapes_run['checkpoint']), str(tmp_path / 'out'), '--model', 'gsop_resnet50',
                     '-q', *option]) == 1
    err = capsys.readouterr().err
    assert err.startswith('timm-gsop export: error: ') and message in err and 'Traceback' not in err, err
    assert len(err.strip().splitlines()) == 1 or 'does not fit this gsop_resnet50 model' in err, err
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('bad,message', [
    (dict(mean='x'), "args.yaml: mean needs 1 or 3 finite numbers, got 'x'"),
    (dict(std=[0.2, float('inf'), 0.2]), 'args.yaml: std needs 1 or 3 finite numbers > 0'),
    (dict(crop_pct=7), 'args.yaml: crop_pct must be a number in (0, 1], got 7'),
    (dict(interpolation='foo'), "args.yaml: interpolation must be one of nearest, bilinear, bicubic, box, hamming, "
                                "lanczos; got 'foo'"),
    (dict(img_size='abc'), "args.yaml: img_size must be one or two integers from 64 to 4096 (px), got 'abc'"),
    (dict(img_size=30000), 'args.yaml: img_size must be one or two integers from 64 to 4096 (px), got 30000'),
    (dict(input_size=[3, 64]), 'args.yaml: input_size must be one or two integers from 64 to 4096 (px) after 3'),
    (dict(model_kwargs=dict(MODEL_KWARGS, attn_dim=30000)), 'attn_dim must be an integer in [1, 2048]'),
    (dict(model_kwargs=dict(MODEL_KWARGS, pretrained=True)), 'pretrained cannot be given as model kwargs'),
    (dict(model=None), 'no --model given, and no args.yaml beside'),
])
def test_bad_values_in_args_yaml_are_refused_as_options_are(shapes_run, tmp_path, capsys, bad, message):
    checkpoint = write_run(tmp_path / 'run', shapes_run['model'], dict(shapes_run['args'], **bad))
    assert cli.main(['export', str(checkpoint), str(tmp_path / 'out'), '-q']) == 1
    err = capsys.readouterr().err
    assert err.startswith('timm-gsop export: error: ') and message in err and 'Traceback' not in err, err
    assert len(err.strip().splitlines()) == 1 or 'does not fit this gsop_resnet50 model' in err, err
    assert not (tmp_path / 'out').exists()


def test_model_from_args_yaml_and_odd_epochs(shapes_run, tmp_path, capsys):
    """--model and its kwargs come from args.yaml; summary.csv rows without a whole epoch are skipped; a NaN
    epoch in the checkpoint is a one-line error (the file is damaged)."""
    summary = 'epoch,eval_top1,eval_top5\nnan,10.0,20.0\n0,40.0,100.0\n1.5,45.0,100.0\n1,55.5,100.0\n'
    checkpoint = write_run(tmp_path / 'run', shapes_run['model'], shapes_run['args'], summary=summary,
                           epoch=9, metric=float('nan'))  # an epoch summary.csv does not have
    out = tmp_path / 'out'
    assert cli.main(['export', str(checkpoint), str(out), '-q', '--install', 'pip install timm-gsop==0.1.0']) == 0
    assert json.loads((out / 'config.json').read_text())['architecture'] == 'gsop_resnet50'
    readme = (out / 'README.md').read_text()
    assert '(2 epochs in its summary.csv)' in readme and 'this checkpoint' not in readme
    assert '| best epoch of the run | 1 | 55.50 |' in readme and '| nan' not in readme
    assert '`pip install timm-gsop==0.1.0`; `import timm_gsop` registers' in readme

    no_run = tmp_path / 'bare.pth.tar'  # no args.yaml, no stored arguments: --model is needed
    torch.save({'state_dict': shapes_run['model'].state_dict()}, no_run)
    assert cli.main(['export', str(no_run), str(tmp_path / 'out2'), '-q']) == 1
    err = capsys.readouterr().err
    assert 'no --model given, and no args.yaml beside' in err and 'one of gsop2_resnet101, ' in err

    nan_epoch = write_run(tmp_path / 'nan', shapes_run['model'], shapes_run['args'], epoch=float('nan'))
    assert cli.main(['export', str(nan_epoch), str(tmp_path / 'out3'), '-q']) == 1
    err = capsys.readouterr().err
    assert 'the checkpoint says epoch nan' in err and len(err.strip().splitlines()) == 1


def test_card_facts_follow_the_model_net2_at_its_resolution(tmp_path):
    kwargs = dict(layers=[1, 1, 1, 1], attn_dim=16, cov_dim=128, last_stride=2)
    model = make_model('gsop2_resnet50', 31, num_classes=4, **kwargs)
    checkpoint = write_run(tmp_path / 'run', model, dict(
        model='gsop2_resnet50', model_kwargs=kwargs, num_classes=4, img_size=96, dataset='torch/cifar10'))
    out = tmp_path / 'export'
    assert cli.main(['export', str(checkpoint), str(out), '--model', 'gsop2_resnet50', '-q']) == 0
    readme = (out / 'README.md').read_text()
    assert 'GSoP-Net2 on a ResNet-14 (1, 1, 1, 1 bottlenecks per stage)' in readme
    assert 'of stages 1, 2, 3;' in readme
    assert 'iSQRT-COV pooling (1x1 conv 2048->128, 128x128 covariance, 3 Newton-Schulz iterations, ' \
           'upper triangle of 8,256 values)' in readme
    assert 'output stride 32.' in readme and '3x3 at 96x96' in readme  # last_stride=2
    macs = card.measure('gsop2_resnet50', json.loads((out / 'config.json').read_text())['model_args'], (3, 96, 96))[0]
    assert f'**GMACs (96x96):** {macs / 1e9:.2f}' in readme
    assert '**Training data:** `torch/cifar10`' in readme
    assert 'ResNet-50' not in readme and '224x224' not in readme  # nothing left from the defaults
    config = json.loads((out / 'config.json').read_text())
    assert config['model_args']['cov_dim'] == 128 and config['model_args']['last_stride'] == 2


def test_card_facts_follow_the_model_cifar(tmp_path):
    model = make_model('gsop2_resnet164_cifar', 32, layers=(2, 2, 2))  # the card reads the depth off the weights
    torch.save({'state_dict': model.state_dict()}, tmp_path / 'cifar.pth.tar')
    out = tmp_path / 'export'
    assert cli.main(['export', str(tmp_path / 'cifar.pth.tar'), str(out), '--model', 'gsop2_resnet164_cifar',
                     '-q', '--model-kwargs', 'layers=(2, 2, 2)']) == 0
    readme = (out / 'README.md').read_text()
    assert 'GSoP-Net2 on a pre-activation ResNet-20 (2, 2, 2 bottlenecks per stage)' in readme
    assert '64x64 channel covariance) at the end of the residual branch of the last block of stages 1, 2;' in readme
    assert '1x1 conv 256->64, 64x64 covariance' in readme and 'upper triangle of 2,080 values' in readme
    assert 'output stride 4.' in readme and '8x8 at 32x32' in readme and '**GMACs (32x32):**' in readme
    assert 'mean (0.5071, 0.4865, 0.4409)' in readme and 'a linear classifier to 100 classes' in readme


def test_class_names_are_the_class_folders_in_timms_order(tmp_path, monkeypatch):
    from timm.data.readers.reader_image_folder import find_images_and_targets
    from timm_gsop.hub.run import run_label_names
    train = tmp_path / 'data' / 'train'
    for name in ('c10', 'c2', 'C1', 'b'):
        (train / name).mkdir(parents=True)
        (train / name / 'x.png').write_bytes(b'')
    (train / '.ipynb_checkpoints').mkdir()  # no image in it: not a class for timm's reader
    _, class_to_idx = find_images_and_targets(str(train))
    monkeypatch.setattr('os.walk', lambda *a, **k: pytest.fail('the images are walked'))
    names, origin = run_label_names(dict(data_dir=str(tmp_path / 'data'), dataset=''), 4)
    assert names == sorted(class_to_idx, key=class_to_idx.get) == ['b', 'C1', 'c2', 'c10'] and str(train) in origin
    assert run_label_names(dict(data_dir=str(tmp_path / 'data')), 5)[0] is None  # another number of classes
    assert run_label_names(dict(data_dir=str(tmp_path / 'data'), dataset='torch/cifar10'), 4)[0] is None
