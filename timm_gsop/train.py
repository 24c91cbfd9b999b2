"""timm's reference train.py with the GSoP models registered.

    python -m timm_gsop.train --model gsop_resnet50 --data-dir /data/imagenet ...

takes exactly train.py's arguments (``--help`` lists them). ``timm_gsop.launcher.timm_scripts`` finds the
script; under torchrun each process runs this module.
"""
from .launcher.timm_scripts import run_script

if __name__ == '__main__':
    run_script('train.py')
