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
cd "$tests"
python -c 'import timm; print("timm", timm.__version__, "from", timm.__file__)'
python -m pytest -q -p no:cacheprovider -W ignore::pytest.PytestUnknownMarkWarning test_models.py -k gsop
