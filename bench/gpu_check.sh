#!/usr/bin/env bash
# The GPU check, run on the lent machine from the repository root once onnxruntime-gpu is unpacked in
# /tmp/site (see the report of issue 8): installs wmdeploy (non-editable, so wmdeploy.runtimes/.models
# resolve), then runs the GPU tests and the GPU bench from a scratch folder that has no wmdeploy/ in it.
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
REPO=$PWD
rm -rf /tmp/wm build  # pip --target never replaces an existing package: start clean
python3 -m pip install -q --no-deps --no-build-isolation --no-compile --target /tmp/wm . >"$OUT/pip.log" 2>&1 || { cat "$OUT/pip.log"; exit 1; }
rm -rf /tmp/run && mkdir -p /tmp/run && cp -r "$REPO/tests" "$REPO/bench" "$REPO/pyproject.toml" /tmp/run/ && cd /tmp/run || exit 1
export PYTHONPATH=/tmp/site:/tmp/wm PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import onnxruntime as o, wmdeploy; print(o.__version__, o.get_available_providers(), wmdeploy.__file__)"
timeout ${TEST_TIMEOUT:-200} python3 -m pytest -q -rs -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tee "$OUT/pytest.log"
timeout ${BENCH_TIMEOUT:-200} python3 bench/bench_gpu.py --json "$OUT/gpu.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
