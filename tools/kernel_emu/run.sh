#!/usr/bin/env bash
# Build and run the host emulation of kernels/attention.cu (no GPU needed), with AddressSanitizer
# so any out-of-bounds access of the kernels' global buffers aborts. `run.sh quick` runs fewer cases.
set -euo pipefail
cd "$(dirname "$0")"
out=${TMPDIR:-/tmp}/checkergen_attention_emu
g++ -std=c++20 -O1 -g -fno-strict-aliasing -fsanitize=address,undefined -fno-sanitize-recover=undefined \
    -Wall -Wno-sign-compare -Wno-unknown-pragmas -Wno-unused-function -Iinclude -I../../kernels \
    attention_emu.cpp -o "$out" -pthread
"$out" "$@"
