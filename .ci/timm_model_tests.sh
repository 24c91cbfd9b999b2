#!/usr/bin/env bash
# timm's own model test-suite (tests/test_models.py of timm's sdist) on every GSoP model.
#   .ci/timm_model_tests.sh [TIMM_VERSION]   (default: the installed timm)
# For a version other than the installed one, the sdist's own timm source goes ahead of the installed
# timm on PYTHONPATH (the installed torch is reused). Run in an environment with timm_gsop installed.
set -euo pipefail
installed=$(python -c 'import timm; print(timm.__version__)')
version=${1:-$installed}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
pip download -q --no-binary :all: --no-deps "timm==$version" -d "$work" 2>&1 | grep -v '^WARNING: Location' || true
tar -xzf "$work/timm-$version.tar.gz" -C "$work"
tests="$work/timm-$version/tests"
cat >> "$tests/conftest.py" <<'PY'

import timm
import timm_gsop  # noqa: F401  registers the GSoP-Net models
from timm.models import _registry

# timm runs its forward_intermediates, features-getter and pruning tests only for the model modules it
# lists (FEAT_INTER_FILTERS, its own files, 'resnet' among them): list the GSoP models there too.
_registry._module_to_models['resnet'].update(timm.list_models('gsop*'))
PY
if [ "$version" != "$installed" ]; then
    export PYTHONPATH="$work/timm-$version${PYTHONPATH:+:$PYTHONPATH}"
fi
# The GSoP backbone tags are pretrained models to timm (list_models(pretrained=True)): its load tests fetch their
# source ResNets from the Hub. Offline, a cache holds random ones under the same names: the load path is the real one.
export HF_HUB_CACHE="$work/hub" HF_HUB_OFFLINE=1
python - <<'PY'
import os, safetensors.torch, timm, timm_gsop
for name in {timm.get_pretrained_cfg(m).hf_hub_id for m in timm.list_pretrained('gsop*')}:
    repo = os.path.join(os.environ['HF_HUB_CACHE'], 'models--' + name.replace('/', '--'))
    os.makedirs(os.path.join(repo, 'snapshots', '0' * 40)); os.makedirs(os.path.join(repo, 'refs'))
    open(os.path.join(repo, 'refs', 'main'), 'w').write('0' * 40)
    model = timm.create_model(name.split('/')[1].split('.')[0])
    safetensors.torch.save_file(model.state_dict(), os.path.join(repo, 'snapshots', '0' * 40, 'model.safetensors'))
PY
cd "$tests"
python -c 'import timm; print("timm", timm.__version__, "from", timm.__file__)'
python -m pytest -q -p no:cacheprovider -W ignore::pytest.PytestUnknownMarkWarning test_models.py -k gsop
