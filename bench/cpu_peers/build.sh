#!/usr/bin/env bash
# Builds the peers of the same-run CPU benchmark from the ignored folder peers/ at the repo root,
# each with its own cmake (CPU backend only, -march=native, Release), then compiles
# ggml_matmul.c against each:
#   peers/bin/ggml_matmul        ggml (upstream) : TQ2_0
#   peers/bin/ggml_matmul_bitnet bitnet.cpp      : I2_S, TL2 (its own kernels; needs clang)
# and lays out TL2 weights for the benchmark shapes (peers/tl2/).
#
# peers/ holds unmodified public sources, never committed (see .gitignore):
#   peers/ggml   = github.com/ggml-org/ggml (the ggml of llama.cpp), any recent commit
#   peers/bitnet = github.com/microsoft/BitNet at c82b5e6 (2024-10-18), with its submodule
#                  3rdparty/llama.cpp = github.com/Eddie-Wang1120/llama.cpp at 406a503 (merge-dev),
#                  the pair of bitnet.cpp's first release (later BitNet commits pin fork commits
#                  this machine could not obtain)
# Each folder's PEER_COMMIT names what was unpacked. bitnet.cpp's TL2 kernels are generated per
# weight shape by its own code generator (tl2_prep.py runs it for the benchmark's shapes).
#
# Usage: bench/cpu_peers/build.sh   (env: JOBS, default 2; NICE, default 10; PYTHON)
# Without a system clang, zig's (pip install ziglang) does: put `clang` / `clang++` scripts that
# run `python -m ziglang cc` / `c++` first on PATH. Clang 16+ makes the incompatible pointer
# types in bitnet.cpp's ggml.c an error by default; they are kept warnings, as the clang 14 of
# its release compiled them.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
P=$ROOT/peers
JOBS=${JOBS:-2}
NICE=${NICE:-10}
PYTHON=${PYTHON:-$(command -v /tmp/interop-venv/bin/python || command -v python3)}
CMAKE=$(command -v cmake || command -v /tmp/interop-venv/bin/cmake || true)
[ -n "$CMAKE" ] || { echo "cmake not found (pip install cmake ninja)" >&2; exit 1; }
GEN=()
if command -v ninja >/dev/null || [ -x /tmp/interop-venv/bin/ninja ]; then
    GEN=(-G Ninja)
    export PATH=$PATH:/tmp/interop-venv/bin
fi
mkdir -p "$P/bin"
CFLAGS_H=(-O3 -march=native -std=c11 -Wall -Wextra -Wno-unused-parameter)

# --- ggml (TQ2_0) ---
if [ -f "$P/ggml/CMakeLists.txt" ]; then
    "$CMAKE" -S "$P/ggml" -B "$P/ggml/build" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release \
        -DGGML_NATIVE=ON -DGGML_OPENMP=OFF -DBUILD_SHARED_LIBS=OFF \
        -DGGML_BUILD_TESTS=OFF -DGGML_BUILD_EXAMPLES=OFF >/dev/null
    nice -n "$NICE" "$CMAKE" --build "$P/ggml/build" -j "$JOBS" >/dev/null
    L=$P/ggml/build/src
    nice -n "$NICE" cc "${CFLAGS_H[@]}" -I"$P/ggml/include" bench/cpu_peers/ggml_matmul.c \
        -o "$P/bin/ggml_matmul" "$L/libggml.a" "$L/libggml-cpu.a" "$L/libggml-base.a" \
        -lstdc++ -lpthread -lm
    echo "built peers/bin/ggml_matmul ($(cat "$P/ggml/PEER_COMMIT" 2>/dev/null || echo 'ggml, commit unknown'))"
else
    echo "peers/ggml missing: unpack github.com/ggml-org/ggml there" >&2
fi

# --- bitnet.cpp (I2_S, TL2) ---
if [ -f "$P/bitnet/CMakeLists.txt" ] && [ -f "$P/bitnet/3rdparty/llama.cpp/CMakeLists.txt" ]; then
    if ! command -v clang >/dev/null; then
        echo "bitnet.cpp not built: its CMakeLists requires clang (apt-get install clang)" >&2
    else
        "$PYTHON" bench/cpu_peers/tl2_prep.py kernels
        "$CMAKE" -S "$P/bitnet" -B "$P/bitnet/build" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release \
            -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++ -DBITNET_X86_TL2=ON \
            -DCMAKE_C_FLAGS=-Wno-error=incompatible-pointer-types \
            -DGGML_NATIVE=ON -DGGML_OPENMP=OFF -DBUILD_SHARED_LIBS=OFF \
            -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF >/dev/null
        nice -n "$NICE" "$CMAKE" --build "$P/bitnet/build" -j "$JOBS" --target ggml >/dev/null
        nice -n "$NICE" clang "${CFLAGS_H[@]}" -DPEER_BITNET -I"$P/bitnet/3rdparty/llama.cpp/ggml/include" -I"$P/bitnet/include" \
            bench/cpu_peers/ggml_matmul.c -o "$P/bin/ggml_matmul_bitnet" \
            "$P/bitnet/build/3rdparty/llama.cpp/ggml/src/libggml.a" -lstdc++ -lpthread -lm
        "$PYTHON" bench/cpu_peers/tl2_prep.py weights "$P/tl2"
        echo "built peers/bin/ggml_matmul_bitnet ($(cat "$P/bitnet/PEER_COMMIT" 2>/dev/null || echo 'bitnet.cpp, commit unknown'))"
    fi
else
    echo "peers/bitnet missing: unpack github.com/microsoft/BitNet and its llama.cpp submodule there" >&2
fi
