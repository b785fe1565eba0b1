#!/usr/bin/env bash
# Build and run the host emulation of kernels/decoder.cu (no GPU needed; see emu.hpp).
# Needs g++ (C++20) and the CUDA headers of scripts/install-nvcc.sh.
set -euo pipefail
cd "$(dirname "$0")"
nvcc=${NVCC:-$(bash ../../scripts/install-nvcc.sh | tail -n1)}
inc=$(dirname "$(dirname "$nvcc")")/include
out=${TMPDIR:-/tmp}/checkergen-decoder-emu
g++ -std=c++20 -O2 -pthread -I"$inc" -I../../kernels -o "$out" decoder_emu.cpp
"$out"
