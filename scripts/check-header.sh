#!/usr/bin/env bash
# Regenerate include/checkergen.h from src/capi.rs with cbindgen (cbindgen.toml) and fail if
# the committed header differs. CBINDGEN names the binary (default: cbindgen on PATH).
#   scripts/check-header.sh          check (CI)
#   scripts/check-header.sh --write  regenerate the committed header
set -euo pipefail
cd "$(dirname "$0")/.."
cbindgen=${CBINDGEN:-cbindgen}
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
"$cbindgen" --quiet --config cbindgen.toml --output "$tmp"
if [ "${1:-}" = "--write" ]; then
    cp "$tmp" include/checkergen.h
    echo "wrote include/checkergen.h"
elif ! diff -u include/checkergen.h "$tmp"; then
    echo "include/checkergen.h is out of date: run scripts/check-header.sh --write" >&2
    exit 1
else
    echo "include/checkergen.h is up to date"
fi
