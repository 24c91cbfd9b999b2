"""timm's benchmark.py with the GSoP models registered.

    python -m timm_gsop.benchmark --model gsop_resnet50 --device cpu --bench inference

takes exactly benchmark.py's arguments (``--help`` lists them); ``timm_gsop.launcher.timm_scripts`` finds it.
"""
from .launcher.timm_scripts import run_script

if __name__ == '__main__':
    run_script('benchmark.py')
