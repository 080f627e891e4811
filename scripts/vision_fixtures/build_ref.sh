#!/usr/bin/env bash
# Build mtmd_ref (the llama.cpp reference dumper) against an existing llama.cpp build.
#
#   scripts/vision_fixtures/build_ref.sh [OUTPUT]            (default OUTPUT: $LLAMA_CPP_BUILD/bin/mtmd_ref)
#
# Environment:
#   LLAMA_CPP_DIR    llama.cpp source tree (default /tmp/llsrc)
#   LLAMA_CPP_BUILD  its cmake build dir, holding bin/libmtmd.so, libllama.so, libggml*.so
#                    (default $LLAMA_CPP_DIR/build; build them with
#                     cmake -B build -DBUILD_SHARED_LIBS=ON && cmake --build build --target mtmd llama-mtmd-cli)
#   CXX              compiler (default g++)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LLAMA_CPP_DIR="${LLAMA_CPP_DIR:-/tmp/llsrc}"
LLAMA_CPP_BUILD="${LLAMA_CPP_BUILD:-$LLAMA_CPP_DIR/build}"
OUT="${1:-$LLAMA_CPP_BUILD/bin/mtmd_ref}"
LIBDIR="$LLAMA_CPP_BUILD/bin"
[ -f "$LIBDIR/libmtmd.so" ] || { echo "no $LIBDIR/libmtmd.so (set LLAMA_CPP_BUILD)" >&2; exit 1; }
nice "${CXX:-g++}" -O2 -std=c++17 -Wall \
    -I"$LLAMA_CPP_DIR/include" -I"$LLAMA_CPP_DIR/ggml/include" -I"$LLAMA_CPP_DIR/tools/mtmd" \
    "$HERE/mtmd_ref.cpp" -o "$OUT" \
    -L"$LIBDIR" -lmtmd -lllama -lggml -lggml-base -Wl,-rpath,"$LIBDIR"
echo "built $OUT"
