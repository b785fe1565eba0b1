#!/usr/bin/env bash
# Install the pinned CUDA 13.0 compiler (nvcc, NVVM, headers) and NVRTC from PyPI wheels into
# .cuda-toolchain/, so kernels compile on a machine with no GPU and no CUDA install (NVRTC:
# tests/kernels_nvrtc.rs; scripts/install-nvrtc.sh prints its root).
# 13.0.x matches the 580 driver of the target GPUs: a newer NVVM emits PTX they cannot load.
# Prints the nvcc path on the last line; `export NVCC=...` it before `cargo build --features cuda`.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.cuda-toolchain
if [ ! -x "$venv/bin/pip" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check \
    nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88
nvcc=$(ls -d "$PWD"/$venv/lib/python3*/site-packages/nvidia/cu13/bin/nvcc | head -n 1)
"$nvcc" --version | tail -n 2 >&2
echo "$nvcc"
