from .gsop_resnet import GSoPBottleneck, GSoPResNet, checkpoint_filter_fn
from .gsop_resnet_cifar import GSoPPreActBottleneck, GSoPResNetCifar
