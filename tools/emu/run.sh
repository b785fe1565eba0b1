#!/usr/bin/env bash
# Build and run the emulator's self-test (selftest_emu.cpp: barriers, shuffles, launch errors,
# launch timings) and the host emulation checks of kernels/attention.cu and kernels/decoder.cu (no GPU
# and no CUDA toolkit needed: kernels/emu.cuh stands in for both). Each driver is compiled with
# g++ (C++20) and AddressSanitizer + UBSan, so an out-of-bounds access of a kernel's global
# buffers aborts; every other kernels/*.cu is compiled against the emulator too (syntax only).
# `run.sh quick` runs fewer attention cases. Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")"
out=${TMPDIR:-/tmp}/checkergen-emu
mkdir -p "$out"
cxx=${CXX:-g++}
flags=(-std=c++20 -O1 -g -DCHECKERGEN_HOST_EMU -ffp-contract=off -fno-strict-aliasing
       -fsanitize=address,undefined -fno-sanitize-recover=undefined
       -Wall -Wno-sign-compare -Wno-unknown-pragmas -Wno-unused-function -I../../kernels -pthread)
# Every kernel file compiles against the emulator (the drivers below run two of them).
for f in ../../kernels/*.cu; do
    "$cxx" -x c++ -std=c++20 -fsyntax-only -DCHECKERGEN_HOST_EMU -Wall -Wno-sign-compare \
        -Wno-unknown-pragmas -Wno-unused-function -I../../kernels "$f"
done
pids=()
for d in selftest attention decoder; do
    "$cxx" "${flags[@]}" -o "$out/${d}_emu" "${d}_emu.cpp" &
    pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
status=0
for d in selftest attention decoder; do
    echo "== ${d}_emu"
    start=$SECONDS
    if [ "$d" = attention ]; then "$out/${d}_emu" "$@" || status=1; else "$out/${d}_emu" || status=1; fi
    echo "== ${d}_emu: $((SECONDS - start)) s"
done
exit $status
