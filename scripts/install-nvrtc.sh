#!/usr/bin/env bash
# Make sure the pinned CUDA 13.0 NVRTC library (nvidia-cuda-nvrtc, the same 13.0 as nvcc) and
# the CUDA headers it compiles against (nvidia-cuda-runtime: cuda_bf16.h, cuda_fp16.h; NVRTC
# carries neither) are in .cuda-toolchain/ (scripts/install-nvcc.sh installs them).
# NVRTC needs no GPU: tests/kernels_nvrtc.rs compiles every kernel file with it, with the
# runtime's options, which is the only check of the NVRTC fallback a CPU-only machine can make.
# Prints the toolkit root (nvidia/cu13: include/, lib/libnvrtc.so.13) on the last line; the
# test finds it there by itself, or through CHECKERGEN_CUDA_ROOT.
set -euo pipefail
cd "$(dirname "$0")/.."
# One pinned set of wheels: install-nvcc.sh installs NVRTC and the headers with nvcc.
bash scripts/install-nvcc.sh > /dev/null
root=$(ls -d "$PWD"/.cuda-toolchain/lib/python3*/site-packages/nvidia/cu13 | head -n 1)
ls "$root/lib/libnvrtc.so.13" "$root/include/cuda_bf16.h" >&2
echo "$root"
