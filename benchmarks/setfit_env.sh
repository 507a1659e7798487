#!/usr/bin/env bash
# The SetFit side of benchmarks/text_vs_setfit.py lives in its own virtual environment, so that
# SetFit is never a dependency of kshot. Usage: bash benchmarks/setfit_env.sh [VENV_DIR]
# (default benchmarks/.venv-setfit). Needs network access to PyPI once.
set -euo pipefail
VENV="${1:-$(dirname "$0")/.venv-setfit}"
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q "torch==2.13.0"   # the team's CPU wheel; never another torch version here
"$VENV/bin/pip" install -q "setfit>=1.1" scikit-learn numpy
"$VENV/bin/python" -c "import setfit, sentence_transformers, transformers; print('setfit', setfit.__version__, 'sentence-transformers', sentence_transformers.__version__, 'transformers', transformers.__version__)"
