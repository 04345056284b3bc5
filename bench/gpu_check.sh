#!/usr/bin/env bash
# GPU checks, one command, for a lent CUDA machine (bare image with PyTorch; no network):
#   bash bench/gpu_check.sh            (from the repository root; wheels prepared in .whl/)
# Installs the few pure/compiled packages the index needs from .whl/ (see bench/README.md),
# runs the GPU tests plus the index/search/codec tests (which pick the GPU there), then
# bench/bench_gpu.py. Results land in $OUT (the device tool's output folder) or bench/results.
set -uo pipefail
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site .whl/hnswlib-*.tar.gz
export PYTHONPATH=/tmp/site:$PWD/server:$PWD/registry:$PWD/client PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, zarr, hnswlib; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'zarr', zarr.__version__)"
python3 -c "import triton; print('triton', triton.__version__)" || true
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_fused_maxsim.py tests/test_batched_search.py \
  tests/test_padded_layout.py tests/test_maxsim.py tests/test_codec_format.py \
  tests/test_codec_search.py tests/test_byo_vectors.py tests/test_index_version.py tests/test_index_integrity.py \
  2>&1 | tee "$OUT/gpu-tests.log" | tail -25
python3 bench/bench_gpu.py --documents "${GPU_BENCH_DOCS:-50000}" --out "$OUT/gpu.json"
