#!/usr/bin/env bash
# Install the pinned CUDA 13.0 NVRTC library (nvidia-cuda-nvrtc, the same 13.0 as the nvcc of
# scripts/install-nvcc.sh) and the CUDA headers it compiles against (nvidia-cuda-runtime:
# cuda_bf16.h, cuda_fp16.h; NVRTC carries neither) from PyPI wheels into .cuda-toolchain/.
# NVRTC needs no GPU: tests/kernels_nvrtc.rs compiles every kernel file with it, with the
# runtime's options, which is the only check of the NVRTC fallback a CPU-only machine can make.
# Prints the toolkit root (nvidia/cu13: include/, lib/libnvrtc.so.13) on the last line; the
# test finds it there by itself, or through CHECKERGEN_CUDA_ROOT.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.cuda-toolchain
if [ ! -x "$venv/bin/pip" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check \
    nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-runtime==13.0.96
root=$(ls -d "$PWD"/$venv/lib/python3*/site-packages/nvidia/cu13 | head -n 1)
ls "$root/lib/libnvrtc.so.13" "$root/include/cuda_bf16.h" >&2
echo "$root"
