#!/usr/bin/env bash
# Build a self-contained GPU test bundle under target/gpu-bundle: the stripped CLI, the
# stripped GPU test executables, the golden files they need, and run.sh. Copy the folder to
# a GPU host (no Rust needed there) and run `bash run.sh LOGDIR`.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-$(bash scripts/install-nvcc.sh | tail -n 1)}
export NVCC
out=target/gpu-bundle
rm -rf "$out"
mkdir -p "$out/bin" "$out/golden/public"
cargo build --release --features cuda --bin checkergen
cp target/release/checkergen "$out/bin/"
# Test executables of the GPU tests, from cargo's JSON artifact list.
cargo test --release --features cuda --no-run --message-format=json 2>/dev/null \
    | python3 -c '
import json, sys
for line in sys.stdin:
    try: m = json.loads(line)
    except ValueError: continue
    name = m.get("target", {}).get("name", "")
    # batching: its GPU test (bitwise equal images at different batch sizes) runs there too;
    # gpu_ledger runs on the host emulator by design (its audit reruns launches on host
    # memory), so it stays here.
    gpu = name.startswith("gpu_") and name != "gpu_ledger"
    # cfg_interval: its GPU test (dropping the unconditional rows changes no logit).
    if m.get("reason") == "compiler-artifact" and m.get("executable") and (gpu or name in ("batching", "cfg_interval")):
        print(m["target"]["name"], m["executable"])
' | while read -r name exe; do cp "$exe" "$out/bin/$name"; done
strip "$out"/bin/* 2>/dev/null || true
# Every executable embeds all kernel images (cubins + PTX) and most of the library: one xz
# stream over all of them (a 64 MiB dictionary sees what they share) keeps the bundle far
# under GPU.md's 60 MB (gzip per file was 36 MB of binaries; the device tool carries 64 MiB).
tar -C "$out/bin" -cf - . | xz -9 -T1 > "$out/bin.tar.xz"
rm -rf "$out/bin"
g=../shared/golden
if [ -d "$g" ]; then
    cp "$g/README.md" "$out/golden/"
    cp "$g/public/weights_shared.safetensors" "$g/public/decode_only.safetensors" "$out/golden/public/"
    for c in A_ratio2 B_ratio4 C_ratio3; do
        mkdir -p "$out/golden/public/$c"
        cp "$g/public/$c/config.json" "$g/public/$c/weights_config.safetensors" \
           "$g/public/$c"/greedy_*.safetensors "$out/golden/public/$c/"
    done
    # Scoring (tests/gpu_encoder.rs, tests/gpu_score.rs): photos, codes, losses, encoder.
    mkdir -p "$out/golden/public/score"
    cp "$g/public/score"/*.safetensors "$out/golden/public/score/"
else
    echo "warning: $g not found; the bundle's golden GPU tests will skip" >&2
fi
cat > "$out/run.sh" <<'RUN'
#!/usr/bin/env bash
# Run every GPU test and the benchmark; full logs go to $1 (default ./logs); a summary table
# is printed last.
here=$(cd "$(dirname "$0")" && pwd)
logs=${1:-logs}
mkdir -p "$logs"
bin=$(mktemp -d)
# xz where the host has it, else Python's lzma module.
if command -v xz > /dev/null; then
    xz -dc "$here/bin.tar.xz" | tar -C "$bin" -xf -
else
    python3 -c 'import lzma, sys, tarfile; tarfile.open(fileobj=lzma.open(sys.argv[1])).extractall(sys.argv[2])' \
        "$here/bin.tar.xz" "$bin"
fi
chmod +x "$bin"/*
export CHECKERGEN_GOLDEN="$here/golden"
# The CLI the tests run (tests/common cli(); the build machine's path does not exist here).
export CHECKERGEN_BIN="$bin/checkergen"
# The tests must run on the real GPU here, never fall back to the host emulator.
export CHECKERGEN_DEVICE=cuda
summary=()
failed=0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$logs/gpu.txt" 2>&1
for t in "$bin"/gpu_*; do
    name=$(basename "$t")
    start=$SECONDS
    # Without a GPU these tests run on the host emulator; here CHECKERGEN_DEVICE=cuda makes
    # them fail if the GPU is unusable. --include-ignored also runs the timing-only tests.
    "$t" --include-ignored --nocapture --test-threads=1 > "$logs/$name.log" 2>&1
    rc=$?
    [ "$rc" = 0 ] || failed=1
    secs=$((SECONDS - start))
    res=$(grep -E '^test result' "$logs/$name.log" | tail -n 1)
    summary+=("$(printf '%-16s rc=%-3s %5ss  %s' "$name" "$rc" "$secs" "$res")")
    grep -E 'rel|agreement|chi2|worst' "$logs/$name.log" | tail -n 40 > "$logs/$name.key.txt"
done
# Batch invariance on the real device: tests/batching.rs's GPU test (tokens, pixels and
# statistics bitwise equal at batch sizes 5 and 2, and with the decoder in passes of 2); its CPU
# tests and the CLI memory test are not for this host. The GEMM-level bitwise checks (rows
# vs M, strided entries vs batch count) are in gpu_gemm above.
# The GPU tests (names gpu_*) of a test binary that also holds CPU tests: its log, its
# summary row, and the lines a reader looks for first.
gpu_part() {
    local name=$1 keys=$2 start=$SECONDS rc res
    "$bin/$name" gpu_ --include-ignored --nocapture --test-threads=1 > "$logs/$name.log" 2>&1
    rc=$?
    [ "$rc" = 0 ] || failed=1
    res=$(grep -E '^test result' "$logs/$name.log" | tail -n 1)
    summary+=("$(printf '%-16s rc=%-3s %5ss  %s' "$name" "$rc" "$((SECONDS - start))" "$res")")
    grep -E "$keys" "$logs/$name.log" | tail -n 20 > "$logs/$name.key.txt"
}
gpu_part batching 'equal|differ|running on'
# The guidance interval on the real device: dropping the unconditional rows after
# --cfg-end-step changes no conditional logit (tests/cfg_interval.rs, its GPU test).
gpu_part cfg_interval 'worst|FLOPs|running on'
# Benchmark: random L-2x weights, batch 1, 64, 152 and 256, cfg 1.5, 4 steps per scale (152:
# the old cap, refused before issue 21; 256: the default batch on an 80 GB card, decoded in
# two passes inside the graph); the token loop replayed as a CUDA graph (default) and with
# eager launches (--no-graph).
for mode in graph eager; do
    flag=""
    [ "$mode" = eager ] && flag="--no-graph"
    # shellcheck disable=SC2086
    "$bin/checkergen" bench --preset L-2x --batch 1,64,152,256 --warmup 2 --iters 3 --device cuda \
        $flag --json > "$logs/bench-$mode.jsonl" 2>> "$logs/bench.log"
    while read -r line; do
        summary+=("$(printf 'bench L-2x %-5s %s' "$mode" "$(echo "$line" | cut -c1-160)")")
    done < "$logs/bench-$mode.jsonl"
done
# The traffic ledger's model of the same batches (a model, not a measurement: compulsory
# bytes, FLOPs, launches per step, modelled ms), printed beside the measured times.
"$bin/checkergen" bench --device emu --dry-run --preset L-2x --batch 1,64,152,256 \
    > "$logs/ledger.txt" 2>&1
while read -r line; do
    summary+=("$(printf 'ledger %s' "$(echo "$line" | cut -c1-160)")")
done < "$logs/ledger.txt"
# Decoder benchmark (issue target on H200 at batch 64: >= 3 x 435 images/s).
for prec in fp16 bf16; do
    "$bin/checkergen" bench-decode --batch 64 --precision "$prec" >> "$logs/bench.log" 2>&1
    summary+=("$(printf 'bench-decode %-4s %s' "$prec" "$(grep -E 'images/s' "$logs/bench.log" | tail -n 1)")")
done
# On Hopper (compute capability 9.0) the kernels must come from the sm_90a cubin: the tests
# print "running on NAME (cc X.Y, kernels: KIND)"; any other image (sm_80 cubin, PTX, NVRTC)
# means the ahead-of-time Hopper build was not what ran.
cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' ')
kinds=$(grep -ho 'cc [0-9]*\.[0-9]*, kernels: [^)]*' "$logs"/gpu_*.log | sort | uniq -c)
echo "== kernel images loaded: ${kinds:-none reported}"
if [ "$cc" = "9.0" ]; then
    other=$(grep -ho 'kernels: [^)]*' "$logs"/gpu_*.log | grep -vc 'kernels: sm_90a cubin' || true)
    if [ -z "$kinds" ] || [ "$other" != 0 ]; then
        echo "FAIL: compute capability 9.0 but not every test loaded the sm_90a cubin" | tee "$logs/image.txt"
        failed=1
    fi
fi
echo "== $(cat "$logs/gpu.txt")"
for k in "$logs"/*.key.txt; do echo "-- $(basename "$k" .key.txt)"; tail -n 12 "$k"; done
echo "== summary"
printf '%s\n' "${summary[@]}"
[ "$failed" = 0 ] || { echo "== run.sh: FAILED"; exit 1; }
RUN
chmod +x "$out/run.sh"
du -sh "$out"
