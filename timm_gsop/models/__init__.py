from ._checkpoint import checkpoint_filter_fn
from .gsop_resnet import GSoPBottleneck, GSoPResNet
from .gsop_resnet_cifar import GSoPPreActBottleneck, GSoPResNetCifar

__all__ = ['GSoPBottleneck', 'GSoPResNet', 'checkpoint_filter_fn', 'GSoPPreActBottleneck', 'GSoPResNetCifar']
