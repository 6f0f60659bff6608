#!/usr/bin/env bash
# The prepared GPU check (see bench/gpu_check.py): one table of generation and evaluation
# throughput, then the GPU-only tests. About 8 minutes on an H100/H200-class GPU.
#
#   bash bench/gpu_check.sh            # on a machine with a CUDA GPU
#   bash bench/gpu_check.sh --smoke    # anywhere, in about a minute: tiny shapes on CPU (CI runs it)
#
# On a GPU machine without a package index, first run bench/gpu_wheels.sh where pip works and
# bring the .whl folder it fills: the packages sdbatch needs beyond a CUDA PyTorch image.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! python3 -c "import diffusers, ray" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/sdbatch-site .whl/*.whl
    export PYTHONPATH=/tmp/sdbatch-site
fi
# The checkout itself, for the driver and for the Ray workers it starts.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python3 bench/gpu_check.py "$@" --json "${OUT:-${TMPDIR:-/tmp}}/gpu_check.json"

if [[ " $* " != *" --smoke "* ]]; then
    # gpu_check.py left random Inception weights where the Inception FID test looks for them.
    python3 -m pytest -p no:cacheprovider -q -m "gpu or not slow" \
        tests/test_gpu.py "tests/test_eval.py::test_inception_features_equal_torchmetrics_fid"
fi
