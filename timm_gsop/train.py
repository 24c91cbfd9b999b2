"""timm's reference train.py with the GSoP models registered.

    python -m timm_gsop.train --model gsop_resnet50 --data-dir /data/imagenet --experiment NAME ...

takes train.py's arguments (``--help`` lists them), and ``--continue-with-changes``. ``timm_gsop.launcher`` finds
the script; under torchrun each process runs this module. With ``--experiment NAME`` the same command continues a
stopped run, and SIGTERM / SIGUSR1 / Ctrl-C stop it with a checkpoint and exit status 75
(``timm_gsop.launcher.resume``).
"""
from .launcher.timm_scripts import run_script

if __name__ == '__main__':
    run_script('train.py')
