#!/usr/bin/env bash
# Builds .venv-hpsv3: the official hpsv3 package under the transformers it pins (requirements/hpsv3-official.txt),
# for tests/test_fidelity.py::test_hpsv3_matches_the_official_package. Run with mmalign's venv active.
set -euo pipefail
cd "$(dirname "$0")/.."
main_site=$(python -c "import site; print(site.getsitepackages()[0])")
rm -rf .venv-hpsv3
python -m venv .venv-hpsv3
.venv-hpsv3/bin/pip install -q -r requirements/hpsv3-official.txt
.venv-hpsv3/bin/pip install -q --no-deps hpsv3==1.0.0   # its other pins (DeepSpeed, TRL, ...) are trainer-only
site=$(.venv-hpsv3/bin/python -c "import site; print(site.getsitepackages()[0])")
echo "$main_site" > "$site/zz-mmalign-main.pth"   # appended after its own site-packages: 4.45.2 wins
.venv-hpsv3/bin/python -c "import transformers; assert transformers.__version__ == '4.45.2'"
