#!/usr/bin/env bash
# llama.cpp as a peer: builds llama-bench and llama-batched-bench from the llama.cpp tree vendored
# in the PyPI sdist llama-cpp-python==0.3.36 (CPU only, Release, -DGGML_NATIVE=ON), converts a
# Hugging Face model to GGUF with that tree's converter, and measures it.
#
#   benches/scripts/peer_llamacpp.sh build                  # ~5-6 CPU-minutes, once
#   benches/scripts/peer_llamacpp.sh convert MODEL_DIR [TYPES] # MODEL_DIR/gguf/{bf16,f16,q8_0}.gguf
#   benches/scripts/peer_llamacpp.sh run MODEL_DIR [TYPES]  # TYPES: comma list, default bf16,f16,q8_0
#   benches/scripts/peer_llamacpp.sh all MODEL_DIR          # build + convert + run
#
# `run` prints one JSON object per line (fields: peer, type, prefill_128_tok_s,
# prefill_512_tok_s, decode_tok_s, decode_agg_tok_s_{1,4,16}) and a table on stderr.
# Environment: LLAMA_CPP_WORK (work folder, default benches/.work/llama.cpp, git-ignored),
# THREADS (default 2), REPS (default 3), GEN (decode tokens, default 64), LLAMA_BENCH_EXTRA
# (extra llama-bench arguments, e.g. '--repack 0'), LLAMA_BATCHED_EXTRA (extra
# llama-batched-bench arguments, e.g. '--no-repack': its Q8_0 run crashed on a Sapphire Rapids
# Xeon without it). A tool that crashes is reported on stderr and its figures are left out.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
work="${LLAMA_CPP_WORK:-$root/benches/.work/llama.cpp}"
version=0.3.36
threads="${THREADS:-2}"
reps="${REPS:-3}"
gen="${GEN:-64}"
tree="$work/src/vendor/llama.cpp"
bin="$work/build/bin"

build() {
  if [[ -x "$bin/llama-bench" && -x "$bin/llama-batched-bench" ]]; then
    echo "llama.cpp already built in $bin" >&2
    return
  fi
  if ! command -v cmake >/dev/null || ! command -v ninja >/dev/null; then
    local sudo=""
    [[ $(id -u) -ne 0 ]] && sudo=sudo
    $sudo apt-get update -q && $sudo apt-get install -y -q cmake ninja-build
  fi
  mkdir -p "$work/dl"
  if [[ ! -d "$tree" ]]; then
    python3 -m pip download --disable-pip-version-check --no-deps --no-binary llama-cpp-python \
      "llama-cpp-python==$version" -d "$work/dl"
    rm -rf "$work/src" && mkdir -p "$work/src"
    tar -xzf "$work/dl/llama_cpp_python-$version.tar.gz" -C "$work/src" --strip-components=1
  fi
  cmake -S "$tree" -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DGGML_CUDA=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF
  cmake --build "$work/build" -j "$(nproc)" --target llama-bench llama-batched-bench
}

convert() {
  local model="$1" out="$1/gguf" types="${2:-bf16,f16,q8_0}"
  [[ -f "$tree/convert_hf_to_gguf.py" ]] || build
  "$root/models/setup_venv.sh" >/dev/null
  local py="$root/models/.venv/bin/python"
  "$py" -c "import gguf" 2>/dev/null || "$py" -m pip install -q --disable-pip-version-check \
    "$tree/gguf-py" sentencepiece protobuf
  mkdir -p "$out"
  for t in ${types//,/ }; do
    [[ -f "$out/$t.gguf" ]] && continue
    # The fixtures' tokenizer has a pre-tokenizer hash the converter does not know: gpt-2.
    "$py" - "$tree" "$model" "$out/$t.gguf.part" "$t" <<'PY'
import sys
tree, model, out, outtype = sys.argv[1:5]
sys.path[:0] = [tree, tree + "/gguf-py"]
import convert_hf_to_gguf as c
for name, module in list(sys.modules.items()):
    if name == "convert_hf_to_gguf" or name.split(".")[0] == "conversion":
        for obj in list(vars(module).values()):
            if isinstance(obj, type) and "get_vocab_base_pre" in vars(obj):
                obj.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv = ["convert_hf_to_gguf.py", model, "--outfile", out, "--outtype", outtype]
c.main()
PY
    mv "$out/$t.gguf.part" "$out/$t.gguf"
  done
}

run() {
  local model="$1" types="${2:-bf16,f16,q8_0}"
  build >&2
  convert "$model" "$types" >&2
  local t
  for t in ${types//,/ }; do
    local gguf="$model/gguf/$t.gguf"
    local lb bb
    # A crash of one tool (llama.cpp's Q8_0 weight repacking segfaults on some AVX-512 CPUs)
    # is reported and leaves its figures out instead of ending the run.
    # shellcheck disable=SC2086
    lb=$("$bin/llama-bench" -m "$gguf" -t "$threads" -p 128,512 -n "$gen" -r "$reps" \
      ${LLAMA_BENCH_EXTRA:-} -o json 2>/dev/null) || {
      echo "llama.cpp $t: llama-bench failed (exit $?); try LLAMA_BENCH_EXTRA='--repack 0'" >&2
      lb='[]'
    }
    # shellcheck disable=SC2086
    bb=$("$bin/llama-batched-bench" -m "$gguf" -t "$threads" -c 4096 -b 2048 -ub 512 \
      -npp 16 -ntg 32 -npl 1,4,16 ${LLAMA_BATCHED_EXTRA:-} 2>/dev/null) || {
      echo "llama.cpp $t: llama-batched-bench failed (exit $?); try LLAMA_BATCHED_EXTRA='--no-repack'" >&2
      bb=''
    }
    python3 - "$t" "$threads" "$lb" "$bb" <<'PY'
import json, re, sys
t, threads, lb, bb = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
out = {"peer": "llama.cpp " + (lb[0].get("build_commit", "?") if lb else "?"), "type": t, "threads": threads}
for r in lb:
    if r["n_prompt"] and not r["n_gen"]:
        out[f"prefill_{r['n_prompt']}_tok_s"] = r["avg_ts"]
        out[f"prefill_{r['n_prompt']}_tok_s_stdev"] = r["stddev_ts"]
    elif r["n_gen"] and not r["n_prompt"]:
        out["decode_tok_s"] = r["avg_ts"]
        out["decode_tok_s_stdev"] = r["stddev_ts"]
# llama-batched-bench table: |PP|TG|B|N_KV|T_PP s|S_PP t/s|T_TG s|S_TG t/s|T s|S t/s|
for line in bb.splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if len(cells) >= 8 and re.fullmatch(r"\d+", cells[0]) and re.fullmatch(r"\d+", cells[2]):
        out[f"decode_agg_tok_s_{cells[2]}"] = float(cells[7])
print(json.dumps(out))
print(f"llama.cpp {t:>5}: pp128 {out.get('prefill_128_tok_s', 0):7.1f}  pp512 {out.get('prefill_512_tok_s', 0):7.1f}  "
      f"tg {out.get('decode_tok_s', 0):7.2f}  agg@1/4/16 " +
      " ".join(f"{out.get(f'decode_agg_tok_s_{n}', 0):.1f}" for n in (1, 4, 16)), file=sys.stderr)
PY
  done
}

cmd="${1:-}"
shift || true
case "$cmd" in
  build) build ;;
  convert) convert "${1:?MODEL_DIR}" "${2:-}" ;;
  run) run "${1:?MODEL_DIR}" "${2:-}" ;;
  all) build; convert "${1:?MODEL_DIR}"; run "${1:?MODEL_DIR}" "${2:-}" ;;
  *) sed -n '2,16p' "$0"; exit 2 ;;
esac
