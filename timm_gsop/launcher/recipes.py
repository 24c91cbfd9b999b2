"""Training recipes for timm's train.py, as argument lists.

A recipe is a list of train.py arguments; ``timm-gsop train --recipe NAME`` puts it before the user's
own arguments, and train.py's argparse keeps the last occurrence of an option, so anything the user
passes (``--model``, ``--batch-size``, ``--epochs``, ...) overrides the recipe. Flags that a recipe
switches on (``--model-ema``, ``--amp``) cannot be switched off that way; copy the recipe's
arguments from ``--dry-run`` instead.

``--batch-size`` is per process. The learning rates are given per batch size with ``--lr-base`` /
``--lr-base-size``, so train.py scales them to the global batch (batch size x processes); pass an
explicit ``--lr`` to fix it instead. ``timm-gsop train --list-recipes`` lists them.
"""
from typing import Dict, List

__all__ = ['RECIPES', 'recipe_args', 'recipe_names', 'describe_recipes']

# The official code (ZilinGao/Global-Second-order-Pooling-Convolutional-Networks, main.py) trains with
# SGD, batch 256 and plain RandomResizedCrop + flip; timm's defaults that differ are turned off here
# (warmup, label smoothing, colour jitter, random interpolation). One remaining difference: timm
# applies no weight decay to biases and norm layers, the official code decays every parameter.
_PAPER_COMMON = [
    '--opt', 'sgd', '--momentum', '0.9', '--weight-decay', '1e-4',
    '--lr-base', '0.1', '--lr-base-size', '256', '--lr-base-scale', 'linear',
    '--batch-size', '256',
    '--sched', 'multistep', '--decay-rate', '0.1', '--warmup-epochs', '0', '--cooldown-epochs', '0',
    '--scale', '0.08', '1.0', '--hflip', '0.5', '--color-jitter', '0', '--smoothing', '0',
    '--train-interpolation', 'bilinear', '--img-size', '224', '--crop-pct', '0.875',
]

RECIPES: Dict[str, Dict] = {
    'paper-net1': dict(
        description='GSoP-Net1 as the paper trains it: SGD, lr 0.1 per 256 images, 95 epochs, '
                    'lr x0.1 at 30/60/90, RandomResizedCrop + flip only.',
        args=['--model', 'gsop_resnet50', *_PAPER_COMMON,
              '--epochs', '95', '--decay-milestones', '30', '60', '90'],
    ),
    'paper-net2': dict(
        description='GSoP-Net2 as the paper trains it: as paper-net1, 65 epochs, lr x0.1 at 30/45/60.',
        args=['--model', 'gsop2_resnet50', *_PAPER_COMMON,
              '--epochs', '65', '--decay-milestones', '30', '45', '60'],
    ),
    'rsb-a3': dict(
        description='A modern starting point in the spirit of timm\'s "ResNet strikes back" A3: LAMB, '
                    'cosine, 100 epochs at 160 px, RandAugment, mixup/cutmix, BCE, EMA, AMP. Tuned for '
                    'ResNet-50, not for GSoP-Net: validate at 224 px (validate.py --img-size 224 --crop-pct 0.95).',
        args=['--model', 'gsop_resnet50',
              '--opt', 'lamb', '--weight-decay', '0.02',
              '--lr-base', '8e-3', '--lr-base-size', '2048', '--lr-base-scale', 'linear',
              '--batch-size', '256',
              '--sched', 'cosine', '--epochs', '100', '--warmup-epochs', '5', '--warmup-lr', '1e-6',
              '--img-size', '160', '--crop-pct', '0.95',
              '--aa', 'rand-m6-mstd0.5-inc1', '--mixup', '0.1', '--cutmix', '1.0',
              '--smoothing', '0', '--bce-loss', '--bce-target-thresh', '0.2',
              '--drop-path', '0.05', '--model-ema', '--amp'],
    ),
    # Fine-tuning a GSoP-Net warm-started from a timm ResNet (a backbone tag; --pretrained loads it). The
    # optimiser, weight decay, batch and augmentation are the paper recipe's; the lr, 0.01 per 256 images, is
    # the paper's after its first decay (epoch 30), where its run has a trained backbone as a warm start does;
    # 30 epochs, the length of that phase, on one cosine. The warm-up ramps the lr while the new GSoP blocks are
    # at their initialisation. Input size, crop, interpolation, mean and std are the tag's (the source ResNet's):
    # none is set here. Not tuned: no ImageNet accuracy has been measured with these.
    **{name: dict(
        description=f'Fine-tune {net} warm-started from timm/resnet50.a1_in1k ({model}): SGD, lr 0.01 per 256 '
                    f'images, cosine over 30 epochs, 2 warm-up epochs; preprocessing of the source ResNet.',
        args=['--model', model, '--pretrained',
              '--opt', 'sgd', '--momentum', '0.9', '--weight-decay', '1e-4',
              '--lr-base', '0.01', '--lr-base-size', '256', '--lr-base-scale', 'linear',
              '--batch-size', '256',
              '--sched', 'cosine', '--epochs', '30', '--warmup-epochs', '2', '--warmup-lr', '1e-5',
              '--min-lr', '0', '--cooldown-epochs', '0',
              '--scale', '0.08', '1.0', '--hflip', '0.5', '--color-jitter', '0', '--smoothing', '0'],
    ) for name, net, model in (('warm-net1', 'GSoP-Net1', 'gsop_resnet50.a1_in1k_backbone'),
                               ('warm-net2', 'GSoP-Net2', 'gsop2_resnet50.a1_in1k_backbone'))},
    # CIFAR (the paper's CIFAR-100 setting). timm's train.py has no pad-and-crop transform; 'rkrr'
    # (random rescale, then random crop or reflect-pad) with this scale range shifts by up to ~4 px
    # at 32 px, the closest it has to "pad 4 + random 32 px crop".
    'cifar100': dict(
        description='CIFAR-100: SGD, lr 0.1, batch 128, wd 1e-4, 164 epochs, lr x0.1 at 81/122, '
                    '32 px random crop (~4 px shift) + flip; downloads torch/cifar100 to --data-dir.',
        args=['--model', 'gsop_resnet164_cifar',
              '--dataset', 'torch/cifar100', '--dataset-download', '--val-split', 'test',
              '--num-classes', '100',
              '--opt', 'sgd', '--momentum', '0.9', '--weight-decay', '1e-4',
              '--lr', '0.1', '--batch-size', '128',
              '--sched', 'multistep', '--epochs', '164', '--decay-milestones', '81', '122', '--decay-rate', '0.1',
              '--warmup-epochs', '0', '--cooldown-epochs', '0',
              '--img-size', '32', '--crop-pct', '1.0', '--mean', '0.5071', '0.4865', '0.4409',
              '--std', '0.2673', '0.2564', '0.2762',
              '--train-crop-mode', 'rkrr', '--scale', '0.766', '1.266', '--ratio', '1', '1',
              '--hflip', '0.5', '--color-jitter', '0', '--smoothing', '0', '--train-interpolation', 'bilinear'],
    ),
}


def recipe_names() -> List[str]:
    return list(RECIPES)


def recipe_args(name: str) -> List[str]:
    """train.py arguments of recipe ``name``; a KeyError that lists the recipes for another name."""
    if name not in RECIPES:
        raise KeyError(f'Unknown recipe {name!r}; recipes: {", ".join(RECIPES)}')
    return list(RECIPES[name]['args'])


def describe_recipes() -> str:
    width = max(map(len, RECIPES))
    return '\n'.join(f'  {name:<{width}}  {r["description"]}' for name, r in RECIPES.items())
