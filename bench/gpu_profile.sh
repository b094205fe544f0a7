#!/usr/bin/env bash
# The GPU profile, run on a lent GPU machine from the repository root once onnxruntime-gpu is unpacked in
# /tmp/site (bench/gpu_check.sh explains the set-up): exports the 2 x 1024 LSTM LM, writes its fp16 copy
# with `wmdeploy quantize --mode fp16`, then `wmdeploy profile`s both on the CUDA backend (with and
# without CUDA graphs) and the float file on the CPU backend, side by side.
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
rm -rf /tmp/wm build
python3 -m pip install -q --no-deps --no-build-isolation --no-compile --target /tmp/wm . >"$OUT/pip.log" 2>&1 || { cat "$OUT/pip.log"; exit 1; }
export PYTHONPATH=/tmp/site:/tmp/wm PYTHONUNBUFFERED=1
mkdir -p /tmp/prof && cd /tmp/prof || exit 1
WM="python3 -m wmdeploy"
$WM export wmdeploy.models.lstm_lm:LSTMLanguageModel --config '{"vocab_size":256,"embed_dim":256,"hidden_size":1024,"num_layers":2}' -o lm.onnx --no-verify | tail -1
$WM quantize lm.onnx -o lm.fp16.onnx --mode fp16 2>&1 | tail -2
$WM profile lm.onnx lm.fp16.onnx --device cuda --batch ${BATCHES:-1,8,64,256} --chunk 1,16 --seconds 0.3 \
    --json "$OUT/profile_cuda.json" --csv "$OUT/profile_cuda.csv" --plot "$OUT/profile_cuda.png" 2>&1 | tee "$OUT/profile_cuda.log"
$WM profile lm.onnx --device cpu --batch 1,64 --chunk 1 --seconds 0.3 --json "$OUT/profile_cpu.json" 2>&1 | tail -12
$WM profile lm.onnx --device cuda --cuda-graph --batch 1,64 --chunk 1 --seconds 0.3 --json "$OUT/profile_cuda_graph.json" 2>&1 | tail -12
