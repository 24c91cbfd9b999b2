from .gsop_resnet import GSoPBottleneck, GSoPResNet, checkpoint_filter_fn
