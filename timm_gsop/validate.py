"""timm's reference validate.py with the GSoP models registered.

    python -m timm_gsop.validate --model gsop_resnet50 --checkpoint model_best.pth.tar --data-dir ...

takes exactly validate.py's arguments (``--help`` lists them); ``timm_gsop.launcher.timm_scripts`` finds it.
"""
from .launcher.timm_scripts import run_script

if __name__ == '__main__':
    run_script('validate.py')
