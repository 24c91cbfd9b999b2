"""A small stand-in for timm's train.py, for the tests of ``timm_gsop.launcher.resume`` where timm's scripts
cannot be had (CI is offline; train.py is not in timm's wheel).

It makes the calls the resume layer relies on, in train.py's order (timm 1.0.28): a module-level ``parser`` and
``_parse_args()`` returning ``(args, args_text)``; ``resume_checkpoint`` with the optimizer, then the EMA from the
same file; ``utils.CheckpointSaver(...)`` looked up at call time, on the primary process only, and ``args.yaml``
written after it; the scheduler stepped to the start epoch; per update ``optimizer.step()``, ``zero_grad``, the EMA,
``saver.save_recovery(epoch, update)`` every ``--recovery-interval`` updates, ``step_update``; per epoch the
evaluation, ``utils.update_summary(..., write_header=best_metric is None)``, ``saver.save_checkpoint(epoch, metric)``
and ``lr_scheduler.step(epoch + 1)``; Ctrl-C ends the loop. The data are generated images of 4 classes (a
DataLoader with a worker, as train.py's), the model any timm model (``test_resnet`` by default).
"""
import argparse
import os
import time

import torch
import torch.nn.functional as F
import yaml
from timm import utils
from timm.models import create_model, resume_checkpoint, load_checkpoint
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.utils import ParseKwargs

parser = argparse.ArgumentParser(description='train.py stand-in')
parser.add_argument('--data-dir', default='synthetic')
parser.add_argument('--model', default='test_resnet')
parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs)
parser.add_argument('--num-classes', type=int, default=4)
parser.add_argument('--img-size', type=int, default=32)
parser.add_argument('--batch-size', type=int, default=16)
parser.add_argument('--train-batches', type=int, default=12, help='updates per epoch')
parser.add_argument('--step-delay', type=float, default=0.0, help='seconds added to each update (a slower GPU)')
parser.add_argument('--opt', default='adamw')
parser.add_argument('--lr', type=float, default=3e-3)
parser.add_argument('--weight-decay', type=float, default=0.05)
parser.add_argument('--momentum', type=float, default=0.9)
parser.add_argument('--sched', default='cosine')
parser.add_argument('--sched-on-updates', action='store_true')
parser.add_argument('--epochs', type=int, default=4)
parser.add_argument('--warmup-epochs', type=int, default=1)
parser.add_argument('--warmup-lr', type=float, default=1e-5)
parser.add_argument('--min-lr', type=float, default=0.0)
parser.add_argument('--cooldown-epochs', type=int, default=0)
parser.add_argument('--decay-milestones', type=int, nargs='+', default=[90, 180, 270])
parser.add_argument('--decay-rate', type=float, default=0.1)
parser.add_argument('--seed', type=int, default=42)
parser.add_argument('--model-ema', action='store_true')
parser.add_argument('--model-ema-decay', type=float, default=0.9)
parser.add_argument('--resume', default='')
parser.add_argument('--start-epoch', type=int, default=None)
parser.add_argument('--output', default='')
parser.add_argument('--experiment', default='')
parser.add_argument('--checkpoint-hist', type=int, default=10)
parser.add_argument('--recovery-interval', type=int, default=0)
parser.add_argument('--workers', type=int, default=1)
parser.add_argument('--device', default='cpu')
parser.add_argument('--log-interval', type=int, default=50)


def _parse_args():
    args = parser.parse_args()
    return args, yaml.safe_dump(args.__dict__, default_flow_style=False)


class _Shapes(torch.utils.data.Dataset):
    """Class k: a bright square in quadrant k, on noise; fixed per index, so every epoch sees the same images."""

    def __init__(self, n, size, seed):
        self.n, self.size, self.seed = n, size, seed

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(self.seed * 100003 + i)
        x = torch.randn(3, self.size, self.size, generator=g) * 0.5
        label = i % 4
        h = self.size // 2
        x[:, (label // 2) * h:(label // 2) * h + h, (label % 2) * h:(label % 2) * h + h] += 1.5
        return x, label


def main():
    args, args_text = _parse_args()
    args.world_size, args.rank, args.distributed = 1, 0, False
    utils.random_seed(args.seed, 0)
    model = create_model(args.model, num_classes=args.num_classes, **args.model_kwargs)
    optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args))
    resume_epoch = resume_checkpoint(model, args.resume, optimizer=optimizer) if args.resume else None
    model_ema = None
    if args.model_ema:
        model_ema = utils.ModelEmaV3(model, decay=args.model_ema_decay)
        if args.resume:
            load_checkpoint(model_ema.module, args.resume, use_ema=True)

    exp = args.experiment or time.strftime('%Y%m%d-%H%M%S')
    output_dir = utils.get_outdir(args.output or './output/train', exp)
    saver = utils.CheckpointSaver(
        model=model, optimizer=optimizer, args=args, model_ema=model_ema, checkpoint_dir=output_dir,
        recovery_dir=output_dir, decreasing=False, max_history=args.checkpoint_hist)
    with open(os.path.join(output_dir, 'args.yaml'), 'w') as f:
        f.write(args_text)

    data = torch.utils.data.DataLoader(
        _Shapes(args.train_batches * args.batch_size, args.img_size, args.seed), batch_size=args.batch_size,
        shuffle=True, num_workers=args.workers, drop_last=True, persistent_workers=False)
    val_data = [_Shapes(64, args.img_size, args.seed + 1)[i] for i in range(64)]
    val_x, val_y = torch.stack([v[0] for v in val_data]), torch.tensor([v[1] for v in val_data])
    updates_per_epoch = len(data)
    lr_scheduler, num_epochs = create_scheduler_v2(
        optimizer, **scheduler_kwargs(args, decreasing_metric=False), updates_per_epoch=updates_per_epoch)
    start_epoch = args.start_epoch if args.start_epoch is not None else (resume_epoch or 0)
    if start_epoch > 0:
        if args.sched_on_updates:
            lr_scheduler.step_update(start_epoch * updates_per_epoch)
        else:
            lr_scheduler.step(start_epoch)

    best_metric = None
    try:
        for epoch in range(start_epoch, num_epochs):
            model.train()
            num_updates = epoch * updates_per_epoch
            losses = []
            for update_idx, (x, y) in enumerate(data):
                if args.step_delay:
                    time.sleep(args.step_delay)
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                num_updates += 1
                optimizer.zero_grad()
                if model_ema is not None:
                    model_ema.update(model, step=num_updates)
                if update_idx % args.log_interval == 0:
                    print(f'Train: {epoch} [{update_idx}/{updates_per_epoch}] loss {loss.item():.3f}', flush=True)
                if saver is not None and args.recovery_interval and (update_idx + 1) % args.recovery_interval == 0:
                    saver.save_recovery(epoch, batch_idx=update_idx)
                lr_scheduler.step_update(num_updates=num_updates)
            eval_model = model_ema.module if model_ema is not None else model
            eval_model.eval()
            with torch.no_grad():
                top1 = (eval_model(val_x).argmax(1) == val_y).float().mean().item() * 100
            lrs = [g['lr'] for g in optimizer.param_groups]
            utils.update_summary(
                epoch, dict(loss=sum(losses) / len(losses)), dict(top1=top1),
                filename=os.path.join(output_dir, 'summary.csv'), lr=sum(lrs) / len(lrs),
                write_header=best_metric is None)
            best_metric, best_epoch = saver.save_checkpoint(epoch, metric=top1)
            lr_scheduler.step(epoch + 1, top1)
    except KeyboardInterrupt:
        pass


if __name__ == '__main__':
    main()
