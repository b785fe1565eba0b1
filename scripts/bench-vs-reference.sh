#!/usr/bin/env bash
# Side by side on this machine's CPU: checkergen against the authors' PyTorch sampler
# (deigen/checkerboardgen), random weights of the L-2x shapes, cfg 1.5 from step 5, 4 steps
# per scale, f32 both, batch 1 and 4. Prints one table with ratios (PERF.md records it).
#
#   scripts/bench-vs-reference.sh REF_DIR [WORK_DIR]
#
# REF_DIR: a checkout (or `git archive` export) of deigen/checkerboardgen, outside this
#   repository; its code is imported as is and never copied here. Also read from
#   $CHECKERBOARDGEN_DIR.
# WORK_DIR (default /tmp/checkergen-vs-ref, or $BENCH_WORK): outside the repository; holds the
#   throwaway venv (PyPI: torch 2.7.1, the version of the golden files, transformers 4.55.4,
#   omegaconf 2.3.0, einops) and the L-2x model file. PyPI's Linux torch wheel depends on the CUDA
#   runtime wheels (about 5 GB installed in all); the CPU runs load but never use them. A venv
#   that already has torch is reused ($BENCH_VENV names another one).
# Knobs: ITERS (3), WARMUP (1), BATCHES (1,4), THREADS (all cores).
#
# What is timed (medians of ITERS after WARMUP, wall clock; run it on a quiet machine: the
# load average is printed):
#   sample   whole sampler, model load excluded. checkergen: `bench` (token loop + decode of
#            the B conditional images at the last scale). Reference: AR.sample(), which also
#            decodes the image of every smaller scale of the pyramid (1, 2, 4, 8 latent px:
#            about 1.33x the decoder work of the last scale alone); its decode share is
#            timed separately and printed.
#   decoder  the VQ decoder alone on B random 16x16 code maps, per image (checkergen: the
#            cpu_decode_time example; reference: autoenc.decode).
#   load     checkergen: `sample` wall time minus its own step/prefill/decode timings (the
#            model file read from a warm page cache); reference: building the model with
#            random init (the authors' loader would read a .pth on top of that).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
REF=${1:-${CHECKERBOARDGEN_DIR:-}}
WORK=${2:-${BENCH_WORK:-/tmp/checkergen-vs-ref}}
VENV=${BENCH_VENV:-$WORK/venv}
ITERS=${ITERS:-3}
WARMUP=${WARMUP:-1}
BATCHES=${BATCHES:-1,4}
THREADS=${THREADS:-$(nproc)}

die() { echo "bench-vs-reference: $*" >&2; exit 1; }
[ -n "$REF" ] || die "usage: $0 REF_DIR [WORK_DIR] (REF_DIR: a checkout of deigen/checkerboardgen)"
[ -f "$REF/cbgen/ar.py" ] || die "$REF is not a checkerboardgen checkout (no cbgen/ar.py)"
REF=$(cd "$REF" && pwd)
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
for d in "$REF" "$WORK" "$VENV"; do
    case "$d/" in "$REPO"/*) die "$d is inside the repository; keep it outside" ;; esac
done

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import torch, transformers, omegaconf, einops" 2>/dev/null; then
    echo "== setting up $VENV (PyPI)"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q torch==2.7.1 transformers==4.55.4 omegaconf==2.3.0 einops pyyaml numpy
fi

echo "== building checkergen (release)"
(cd "$REPO" && cargo build --release -q && cargo build --release -q --example cpu_decode_time)
BIN=$REPO/target/release/checkergen
DEC=$REPO/target/release/examples/cpu_decode_time
MODEL=$WORK/L2x.safetensors
[ -f "$MODEL" ] || "$BIN" init --preset L-2x --output "$MODEL"

echo "== machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) CPUs; load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "== commit $(git -C "$REPO" rev-parse --short HEAD)$(git -C "$REPO" diff --quiet || echo +), $(date -u +%F)"

echo "== checkergen bench"
RAYON_NUM_THREADS=$THREADS "$BIN" bench --model "$MODEL" --batch "$BATCHES" --device cpu --cfg 1.5 \
    --cfg-start-step 5 --steps-per-scale 4 --warmup "$WARMUP" --iters "$ITERS" --json >"$WORK/ours.jsonl"
echo "== checkergen decoder alone"
: >"$WORK/ours_dec.txt"
for b in ${BATCHES//,/ }; do
    RAYON_NUM_THREADS=$THREADS "$DEC" L-2x "$b" "$ITERS" | sed -n "s/.*median \([0-9.]*\) s per image/$b \1/p" >>"$WORK/ours_dec.txt"
done
echo "== checkergen load"
rm -rf "$WORK/sample-out"
t0=$(date +%s.%N)
RAYON_NUM_THREADS=$THREADS "$BIN" sample --model "$MODEL" --labels 1 --out "$WORK/sample-out" --timings \
    --device cpu >"$WORK/ours_sample.txt" 2>&1
t1=$(date +%s.%N)
echo "$t0 $t1" >"$WORK/ours_sample_wall.txt"

echo "== reference (PyTorch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)'))"
"$VENV/bin/python" "$REPO/scripts/bench_reference.py" --ref "$REF" --batch "$BATCHES" \
    --warmup "$WARMUP" --iters "$ITERS" --threads "$THREADS" >"$WORK/ref.jsonl"

echo "== load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
python3 - "$WORK" <<'EOF'
import json, re, sys
w = sys.argv[1]
ours = {j["batch"]: j for j in map(json.loads, open(f"{w}/ours.jsonl"))}
ref = {j["batch"]: j for j in map(json.loads, open(f"{w}/ref.jsonl"))}
dec = {int(b): float(s) for b, s in (l.split() for l in open(f"{w}/ours_dec.txt"))}
t0, t1 = map(float, open(f"{w}/ours_sample_wall.txt").read().split())
txt = open(f"{w}/ours_sample.txt").read()
m = re.search(r"serial steps: \d+ in ([0-9.]+) ms[^;]*; prefill ([0-9.]+) ms; decode ([0-9.]+) ms", txt)
load = (t1 - t0) - sum(float(x) for x in m.groups()) / 1e3 if m else float("nan")
print()
print("| batch | what | checkergen | PyTorch | ratio (PyTorch / checkergen) |")
print("|---|---|---|---|---|")
for b in sorted(ours):
    o, r = ours[b], ref[b]
    print(f"| {b} | whole sample, s | {o['s_per_batch']:.2f} (decode {o['decode_s']:.2f}) "
          f"| {r['sample_s']:.2f} (decode {r['sample_decode_s']:.2f}, all scales) "
          f"| {r['sample_s'] / o['s_per_batch']:.2f}x |")
    print(f"| {b} | decoder alone, s per image | {dec[b]:.3f} | {r['decode_s_per_image']:.3f} "
          f"| {r['decode_s_per_image'] / dec[b]:.2f}x |")
print(f"| - | load, s | {load:.2f} (model file, sample wall minus its timings) "
      f"| {ref[min(ref)]['load_s']:.2f} (random init, no checkpoint read) | |")
print(f"\npeak RSS (checkergen bench): {max(o['peak_mem_bytes'] for o in ours.values()) / 2**30:.2f} GiB; "
      f"PyTorch {ref[min(ref)]['torch']}, {ref[min(ref)]['threads']} threads")
EOF
