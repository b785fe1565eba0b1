#!/usr/bin/env bash
# Build and run the emulator's self-test (selftest_emu.cpp: barriers after early exits,
# shuffles in a partial warp, 3-D blocks, every launch error including deadlock and warp
# divergence, and the fast mma model against the PTX-table reference, bitwise), compiled with
# g++ (C++20) and AddressSanitizer + UBSan; first every kernels/*.cu is compiled against the
# emulator (syntax only). No GPU and no CUDA toolkit needed: kernels/emu.cuh stands in for
# both. `run.sh bench` adds launch timings. Run by .ci/run; exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")"
out=${TMPDIR:-/tmp}/checkergen-emu
mkdir -p "$out"
cxx=${CXX:-g++}
flags=(-std=c++20 -O1 -g -DCHECKERGEN_HOST_EMU -ffp-contract=off -fno-strict-aliasing
       -fsanitize=address,undefined -fno-sanitize-recover=undefined
       -Wall -Wno-sign-compare -Wno-unknown-pragmas -Wno-unused-function -I../../kernels -pthread)
for f in ../../kernels/*.cu; do
    "$cxx" -x c++ -std=c++20 -fsyntax-only -DCHECKERGEN_HOST_EMU -Wall -Wno-sign-compare \
        -Wno-unknown-pragmas -Wno-unused-function -I../../kernels "$f"
done
"$cxx" "${flags[@]}" -o "$out/selftest_emu" selftest_emu.cpp
"$out/selftest_emu" "$@"
