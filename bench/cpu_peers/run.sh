#!/usr/bin/env bash
# The same-run CPU peer benchmark: ggml's TQ2_0, bitnet.cpp's I2_S and TL2, bitlinear's
# packed_matmul under every CPU kernel this machine supports, and candle's f32 matmul, all with
# the same protocol (see ggml_matmul.c) and thread count, contenders alternated shape by shape,
# PASSES times with the contender order rotated each pass. Prints the CPU, the load, and one
# markdown table; the raw lines go to LOG.
#
# Needs: bench/cpu_peers/build.sh (peers/bin/*) and
#   CARGO_TARGET_DIR=/work/target cargo build --release -p bitlinear --example cpu_bench
# Env: PASSES (3), THREADS (2), SHAPES ("MxNxK ..."), CPU_BENCH (path of the cpu_bench binary),
#      LOG (bench/cpu_peers-latest.log), KERNELS (cpu_bench kernel names; default: all supported),
#      ROTATE_MB (0: every call reuses one weight, which then sits in L2/L3; MB > 0: calls cycle
#      through copies of the weight filling MB, so weights stream from DRAM as in decode).
set -euo pipefail
cd "$(dirname "$0")/../.."
PASSES=${PASSES:-3}
THREADS=${THREADS:-2}
SHAPES=${SHAPES:-"1x512x4096 1x4096x4096 1x2560x6912 128x512x4096 128x4096x4096"}
CPU_BENCH=${CPU_BENCH:-${CARGO_TARGET_DIR:-/work/target}/release/examples/cpu_bench}
LOG=${LOG:-bench/cpu_peers-latest.log}
P=peers/bin
[ -x "$CPU_BENCH" ] || { echo "no $CPU_BENCH: build the cpu_bench example first" >&2; exit 1; }
KERNELS=${KERNELS:-$("$CPU_BENCH" --list | tr '\n' ' ')}
ROTATE_MB=${ROTATE_MB:-0}

# One command line per contender (the shape is appended).
CONTENDERS=()
[ -x $P/ggml_matmul ] && CONTENDERS+=("$P/ggml_matmul tq2_0 @ $THREADS")
if [ -x $P/ggml_matmul_bitnet ]; then
    CONTENDERS+=("$P/ggml_matmul_bitnet i2_s @ $THREADS")
    CONTENDERS+=("$P/ggml_matmul_bitnet tl2 @ $THREADS peers/tl2")
fi
for k in $KERNELS; do CONTENDERS+=("$CPU_BENCH @ --kernel $k --threads $THREADS"); done
CONTENDERS+=("$CPU_BENCH @ --candle --threads $THREADS")

# Waits (up to 30 s) until the CPUs were at least 90% idle over half a second: ggml's
# threads spin while they wait, so a busy neighbour can cost it a scheduler slice a call.
busy_pct() {
    local a b
    read -r _ a1 a2 a3 a4 a5 a6 a7 _ < /proc/stat
    sleep 0.5
    read -r _ b1 b2 b3 b4 b5 b6 b7 _ < /proc/stat
    local busy=$(( (b1+b2+b3+b6+b7) - (a1+a2+a3+a6+a7) )) total=$(( (b1+b2+b3+b4+b5+b6+b7) - (a1+a2+a3+a4+a5+a6+a7) ))
    echo $(( 100 * busy / (total > 0 ? total : 1) ))
}
wait_quiet() {
    local t=0 b
    while b=$(busy_pct) && [ "$b" -gt 10 ] && [ $t -lt 30 ]; do sleep 4; t=$((t + 5)); done
    echo "# quiet check: ${b}% busy (waited ${t}s) load $(cut -d' ' -f1-3 /proc/loadavg)" >> "$LOG"
}

{
    echo "# $(date -u '+%Y-%m-%d %H:%M UTC') $(git rev-parse --short HEAD) passes=$PASSES threads=$THREADS rotate_mb=$ROTATE_MB"
    echo "# CPU: $(lscpu | sed -n 's/^Model name: *//p') (family $(lscpu | sed -n 's/^CPU family: *//p'), model $(lscpu | sed -n 's/^Model: *//p')), $(nproc) CPUs, L2 $(lscpu | sed -n 's/^L2 cache: *//p'), L3 $(lscpu | sed -n 's/^L3 cache: *//p')"
    echo "# flags: $(grep -o -w -E 'avx2|fma|avx512f|avx512bw|avx512vl|avx512_vnni|avx_vnni|avx512_bf16|avx512_fp16|amx_int8' /proc/cpuinfo | sort -u | tr '\n' ' ')"
    echo "# peers: $(cat peers/ggml/PEER_COMMIT 2>/dev/null); $(cat peers/bitnet/PEER_COMMIT 2>/dev/null)"
    echo "# load before: $(cut -d' ' -f1-3 /proc/loadavg)"
} > "$LOG"
n=${#CONTENDERS[@]}
for pass in $(seq 0 $((PASSES - 1))); do
    for shape in $SHAPES; do
        for i in $(seq 0 $((n - 1))); do
            c=${CONTENDERS[$(( (i + pass) % n ))]}
            # TL2 here is bitnet.cpp's M = 1 kernel: at M > 1 its output fails the check.
            if [[ $c == *" tl2 "* && $shape != 1x* ]]; then continue; fi
            wait_quiet
            echo "PASS $pass" >> "$LOG"
            ${c/@/$shape} --rotate-mb "$ROTATE_MB" >> "$LOG" 2>&1 || echo "FAILED ${c/@/$shape}" >> "$LOG"
        done
    done
done
echo "# load after: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$LOG"
grep '^#' "$LOG"
python3 bench/cpu_peers/table.py "$LOG" "$("$CPU_BENCH" --list | head -1)"
