#!/usr/bin/env bash
# Static resources of every kernel, from the cubins: compiles each kernels/*.cu for sm_90a and
# sm_80 with the pinned nvcc and the flags of build.rs (kernels/nvcc-flags.txt) plus
# `-Xptxas -v`, and prints per extern "C" entry point and arch: registers per thread, spill
# stores/loads (bytes), static shared memory (bytes), the largest block any launcher uses
# (the entry point's __launch_bounds__(MAX), which the registry records and Gpu::launch
# enforces: no launch uses a larger block), and whether that block fits one SM:
#   - registers: threads x registers, allocated per warp in units of 256 registers, within
#     the 64K-register file (65536 per block and per SM on sm_80 and sm_90), at most 255 each;
#   - shared memory: static + dynamic within 48 KiB (no kernel sets the opt-in attribute
#     CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES; dynamic shared memory is 0 for every
#     kernel: Gpu::launch refuses any);
#   - at most 1024 threads.
# These are compiler figures, not measurements.
#
# Usage: scripts/kernel-resources.sh [--json]
#   default: an aligned table and a summary line; --json: one JSON array of
#   {"kernel","arch","registers","spill_stores","spill_loads","shared_static",
#    "max_block_threads","fits"}.
# Exit status 1 when any kernel spills or does not fit (after printing), 2 on a usage or
# build error. nvcc: $NVCC if set, else scripts/install-nvcc.sh (installs the pinned wheels).
set -euo pipefail
cd "$(dirname "$0")/.."

json=0
case "${1:-}" in
    "") ;;
    --json) json=1 ;;
    -h|--help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "usage: $0 [--json]" >&2; exit 2 ;;
esac

if [ -n "${NVCC:-}" ] && [ -x "$NVCC" ]; then
    nvcc=$NVCC
else
    nvcc=$(bash scripts/install-nvcc.sh | tail -n 1)
fi

mapfile -t flags < <(sed -e 's/^[[:space:]]*//' -e 's/[[:space:]]*$//' kernels/nvcc-flags.txt | grep -v -e '^#' -e '^$')
# The cubin targets of build.rs (its sm90a.cubin and sm80.cubin images).
archs=(sm_90a sm_80)
declare -A gencode=(
    [sm_90a]="-gencode=arch=compute_90a,code=sm_90a"
    [sm_80]="-gencode=arch=compute_80,code=sm_80"
)

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# Compile every file for every arch, two at a time, keeping ptxas's report.
pids=()
logs=()
wait_all() {
    local i
    for i in "${!pids[@]}"; do
        if ! wait "${pids[$i]}"; then
            echo "nvcc failed (${logs[$i]}):" >&2
            cat "${logs[$i]}" >&2
            exit 2
        fi
    done
    pids=()
    logs=()
}
for f in kernels/*.cu; do
    stem=$(basename "$f" .cu)
    for a in "${archs[@]}"; do
        "$nvcc" -cubin "${gencode[$a]}" "${flags[@]}" -Xptxas -v \
            -o "$tmp/$stem.$a.cubin" "$f" >"$tmp/$stem.$a.log" 2>&1 &
        pids+=($!)
        logs+=("$tmp/$stem.$a.log")
        [ "${#pids[@]}" -ge 2 ] && wait_all
    done
done
wait_all

# The entry points and their __launch_bounds__ maxima, read from the sources as build.rs
# reads them (an integer, or a macro #define'd to one in the file or common.cuh):
# "file kernel max" lines; max is "-" when missing or unreadable (build.rs rejects both).
for f in kernels/*.cu; do
    awk -v file="$(basename "$f" .cu)" '
        FNR == 1 { nfile++ }
        $1 == "#define" && $3 ~ /^[0-9]+$/ { def[$2] = $3 }
        nfile == 2 && /^[[:space:]]*extern "C" __global__/ {
            line = $0; bound = "-"
            if (match(line, /__launch_bounds__\([^)]*\)/)) {
                b = substr(line, RSTART + 18, RLENGTH - 19)
                sub(/,.*/, "", b); gsub(/[[:space:]]/, "", b)
                bound = (b ~ /^[0-9]+$/) ? b : ((b in def) ? def[b] : "-")
                line = substr(line, 1, RSTART - 1) substr(line, RSTART + RLENGTH)
            }
            sub(/\(.*/, "", line)
            n = split(line, w, /[[:space:]]+/)
            print file, w[n], bound
        }' kernels/common.cuh "$f"
done >"$tmp/bounds"

# ptxas's report per entry point: "Compiling entry function 'NAME' for 'ARCH'", then
# "Function properties for NAME" with "N bytes spill stores, N bytes spill loads", then
# "Used N registers, ..., N bytes smem, ..." (smem absent when 0). Properties of non-entry
# functions (called, not inlined) are skipped: only extern "C" entry points matter.
for a in "${archs[@]}"; do
    for log in "$tmp"/*."$a".log; do
        awk -v arch="$a" '
            /Compiling entry function/ {
                entry = $0; sub(/.*Compiling entry function \047/, "", entry); sub(/\047.*/, "", entry)
                props = 0; st = "?"; ld = "?"
            }
            /Function properties for / {
                name = $0; sub(/.*Function properties for /, "", name); sub(/[[:space:]]*$/, "", name)
                props = (name == entry)
            }
            props && /bytes spill stores/ {
                if (match($0, /[0-9]+ bytes spill stores/)) { st = substr($0, RSTART, RLENGTH); sub(/ .*/, "", st) }
                if (match($0, /[0-9]+ bytes spill loads/)) { ld = substr($0, RSTART, RLENGTH); sub(/ .*/, "", ld) }
            }
            entry != "" && /Used [0-9]+ registers/ {
                match($0, /Used [0-9]+ registers/); r = substr($0, RSTART + 5, RLENGTH - 15)
                s = 0
                if (match($0, /[0-9]+ bytes smem/)) { s = substr($0, RSTART, RLENGTH); sub(/ .*/, "", s) }
                print entry, arch, r, st, ld, s
                entry = ""; props = 0
            }' "$log"
    done
done >"$tmp/usage"

# Join (sources order, each arch) and judge.
awk -v json="$json" -v archlist="${archs[*]}" '
    FILENAME == ARGV[1] { use[$1 " " $2] = $3 " " $4 " " $5 " " $6; next }
    { order[++n] = $2; file[$2] = $1; bound[$2] = $3 }
    END {
        na = split(archlist, archs, " ")
        bad = 0; rows = 0
        if (json) printf "["
        else printf "%-28s %-7s %5s %8s %8s %8s %7s %10s %s\n", "kernel", "arch", "regs", "spill_st", "spill_ld", "smem", "threads", "regs/block", "fits"
        for (i = 1; i <= n; i++) {
            k = order[i]
            for (j = 1; j <= na; j++) {
                a = archs[j]
                why = ""
                if (!((k " " a) in use)) {
                    r = "null"; st = "null"; ld = "null"; s = "null"; fits = 0; why = "no ptxas report"; rb = "-"
                } else {
                    split(use[k " " a], u, " "); r = u[1]; st = u[2]; ld = u[3]; s = u[4]
                    fits = 1
                    if (st == "?" || ld == "?") { fits = 0; why = why " no-spill-figures"; st = (st == "?") ? "null" : st; ld = (ld == "?") ? "null" : ld }
                    t = bound[k]
                    if (t == "-") { fits = 0; why = why " no-__launch_bounds__"; rb = "-" }
                    else {
                        warps = int((t + 31) / 32)
                        per_warp = int((r * 32 + 255) / 256) * 256
                        rb = warps * per_warp
                        if (rb > 65536) { fits = 0; why = why " registers" }
                        if (t > 1024) { fits = 0; why = why " threads" }
                    }
                    if (r > 255) { fits = 0; why = why " registers>255" }
                    if (s + 0 > 49152) { fits = 0; why = why " shared-memory" }
                    if (st != "null" && st > 0 || ld != "null" && ld > 0) { spill = 1 } else { spill = 0 }
                    if (spill) why = why " spills"
                }
                if (!fits || spill) bad++
                mt = (bound[k] == "-") ? "null" : bound[k]
                if (json) {
                    printf "%s\n  {\"kernel\":\"%s\",\"arch\":\"%s\",\"registers\":%s,\"spill_stores\":%s,\"spill_loads\":%s,\"shared_static\":%s,\"max_block_threads\":%s,\"fits\":%s}", (rows ? "," : ""), k, a, r, st, ld, s, mt, (fits ? "true" : "false")
                } else {
                    printf "%-28s %-7s %5s %8s %8s %8s %7s %10s %s%s\n", k, a, r, st, ld, s, bound[k], rb, (fits ? "yes" : "NO"), (why != "" ? "  (" substr(why, 2) ")" : "")
                }
                rows++
            }
        }
        if (json) printf "\n]\n"
        else printf "%d kernels x %d archs: %d with a spill or a misfit (registers: per warp in units of 256, 65536 per block/SM; shared: static, 48 KiB)\n", n, na, bad
        exit (bad ? 1 : 0)
    }' "$tmp/usage" "$tmp/bounds"
