#!/usr/bin/env bash
# The CUDA checks of issue 14 on one GPU: bf16 LoRA and QLoRA on a SmolLM2-135M-shaped and a ~1B Llama-shaped
# model (random weights: the speed is the same), ftscale against TRL's SFTTrainer with the seed notebook's settings
# (and a plain peft loop on the small model), Liger kernels on and off, peak CUDA memory against ftscale's
# estimate, activation offloading on and off. One JSON line per run in $OUT/gpu_check.jsonl, then the checks:
# ftscale at least 1.5x TRL's real tokens/s, QLoRA's training peak within 20% of the estimate, offloading lowering
# the peak and leaving the losses as they were. Exits non-zero when a run failed or a check did not hold. Each run is capped at RUN_TIMEOUT seconds (the whole at about 5x that); not yet run on a GPU.
#
#   bash bench/gpu_check.sh   # env: STEPS=40 CONVERSATIONS=400 TOKENIZER=<model folder with a tokenizer> RUN_TIMEOUT=240 OUT=...
#
# Needs torch with CUDA, and ftscale's dependencies plus trl and liger-kernel. Where no package registry can be
# reached, WHEELS=<folder of wheels> installs those first into a private folder. Never part of `make test`.
# The set prepared for a machine with torch 2.11 and Python 3.12 (31 MB): transformers 5.24.0, peft 0.21.2,
# trl 1.16.0, datasets 5.2.0 with dill and multiprocess, liger-kernel 0.8.5, regex, pydantic 2.14.4 with
# pydantic-core, annotated-types, typing-inspection and typing-extensions, and bitsandbytes 0.50.2 repacked with
# only its CUDA 13 libraries (3 MB of its 43); TOKENIZER a folder with SmolLM2's config.json and tokenizer files.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-runs/gpu_check}
STEPS=${STEPS:-40}
CONVERSATIONS=${CONVERSATIONS:-400}
TOKENIZER=${TOKENIZER:-.cache/ftscale/models/SmolLM2-135M-Instruct}
MODELS=${MODELS:-/tmp/ftscale-gpu-check}
SMALL_1B=${SMALL_1B:-}  # e.g. "--hidden 64 --layers 2 --intermediate 128 --heads 4 --kv-heads 2": a dry run of this script on CPU
mkdir -p "$OUT" "$MODELS"
LOG=$OUT/gpu_check.jsonl
: >"$LOG"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
if [ -n "${WHEELS:-}" ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ftscale-site "$WHEELS"/*.whl || exit 1
    export PYTHONPATH=/tmp/ftscale-site:$PYTHONPATH
fi

$PY - <<'PY' | tee -a "$LOG"
import importlib.metadata as md, json, time, torch
info = {"bench": "gpu_check_environment", "torch": torch.__version__, "cuda": torch.cuda.is_available()}
for name in ("transformers", "peft", "accelerate", "trl", "bitsandbytes", "liger-kernel", "flash-attn"):
    try:
        info[name] = md.version(name)
    except md.PackageNotFoundError:
        info[name] = None
if torch.cuda.is_available():
    info["device"] = torch.cuda.get_device_name()
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ a
    torch.cuda.synchronize()
    info["bf16_matmul_tflops"] = round(10 * 2 * 8192**3 / (time.perf_counter() - start) / 1e12, 1)
    import bitsandbytes.functional as F
    w = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    q, state = F.quantize_4bit(w, quant_type="nf4")
    info["nf4_roundtrip_max_error"] = round(float((F.dequantize_4bit(q, state) - w).abs().max()), 4)
print(json.dumps(info))
PY

$PY bench/random_model.py --like "$TOKENIZER" --out "$MODELS/smollm2-135m" | tee -a "$LOG"
# ~1B: SmolLM2's vocabulary, TinyLlama's body (2048 wide, 16 layers, grouped-query attention), untied head.
$PY bench/random_model.py --like "$TOKENIZER" --out "$MODELS/llama-1b" --untied \
    ${SMALL_1B:---hidden 2048 --layers 16 --intermediate 5632 --heads 32 --kv-heads 8} | tee -a "$LOG"

run() {  # model method systems [ftscale overrides...]
    local model=$1 method=$2 systems=$3
    shift 3
    timeout "${RUN_TIMEOUT:-240}" $PY bench/train_throughput.py --model "$MODELS/$model" --method "$method" --systems "$systems" \
        --steps "$STEPS" --conversations "$CONVERSATIONS" "${@/#/--set=}" | tee -a "$LOG"
}
run smollm2-135m lora ftscale,peft,trl
run smollm2-135m qlora ftscale,trl
run llama-1b lora ftscale,trl
run llama-1b lora ftscale model.liger_kernels=false
run llama-1b qlora ftscale,trl
if $PY -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then  # refused on CPU: nothing to offload from
    run llama-1b lora ftscale training.activation_offloading=true training.gradient_checkpointing=false
fi

$PY - "$LOG" <<'PY' | tee -a "$LOG"
import json, sys
lines = [json.loads(line) for line in open(sys.argv[1]) if line.startswith('{"bench"')]  # not the libraries' printed dicts
runs = [r for r in lines if r.get("bench") == "train_throughput" and "system" in r]
failed = [f"{r['model']} {r['method']} {r['system']}: {r['error']}" for r in runs if "error" in r]
checks = []
for r in lines:
    if r.get("bench") == "train_throughput" and "ftscale_over_trl_tokens_per_s" in r.get("ratios", {}):
        ratio = r["ratios"]["ftscale_over_trl_tokens_per_s"]
        checks.append({"check": f"{r['model']} {r['method']}: ftscale / TRL real tokens/s >= 1.5", "value": ratio, "ok": ratio >= 1.5})
for r in runs:
    if r["system"] == "ftscale" and r["method"] == "qlora" and r.get("train_peak_cuda_gb"):
        ratio = r["train_peak_cuda_gb"] / r["memory_estimate_gb"]["total"]
        checks.append({"check": f"{r['model']} qlora: training peak / estimate within 20%", "value": round(ratio, 3), "ok": 0.8 <= ratio <= 1.2})
# The comparison needs the run without offloading to have kept its activations too (auto chose no checkpointing).
plain = {
    r["model"]: r
    for r in runs
    if r["system"] == "ftscale" and r["method"] == "lora" and not r.get("settings") and "error" not in r
    and any(c.startswith("training.gradient_checkpointing=false") for c in r.get("auto", []))
}
for r in runs:
    if "training.activation_offloading=true" in r.get("settings", []) and r["model"] in plain and "error" not in r:
        base = plain[r["model"]]
        lower = r["train_peak_cuda_gb"] < base["train_peak_cuda_gb"]
        same = abs(r["final_train_loss"] - base["final_train_loss"]) <= 1e-3 * abs(base["final_train_loss"])
        checks.append({"check": f"{r['model']} lora: offloading lowers the training peak", "value": [r["train_peak_cuda_gb"], base["train_peak_cuda_gb"]], "ok": lower})
        checks.append({"check": f"{r['model']} lora: offloading leaves the final loss", "value": [r["final_train_loss"], base["final_train_loss"]], "ok": same})
print(json.dumps({"bench": "gpu_check", "runs": len(runs), "failed": failed, "checks": checks}))
sys.exit(1 if failed or not runs or not all(c["ok"] for c in checks) else 0)
PY
