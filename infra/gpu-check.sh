#!/usr/bin/env bash
# Checks a GPU machine for batch-worker: ONNX Runtime's CUDA provider against its CPU one, and
# the time a 3B-shaped model takes per chat reply on this GPU.
#
#   1. classify: 200,000 items of the intent test texts on CUDA and on CPU; the intents must
#      agree everywhere (confidences within 1e-4); on CUDA again with --threads 2 (featurizing
#      on the reading and model threads alone, not on the machine's cores), the same lines;
#   2. generate with the test model (models/lm/, greedy): 64 chat prompts, batch 8, on CUDA and
#      on CPU; every reply must be the same text and token count;
#   3. generate with a random-weight model of Qwen2.5-3B's shapes, int4
#      (models/lm/make_bench_model.py): chat prompts with the worker's system prompt, replies of
#      exactly REPLY_TOKENS tokens, at batch 1 and at batch 8 on the device under test, and
#      replies of 16 tokens at batch 1 (the two batch-1 runs give the time of one decoding
#      step and of the rest: prefill, first token, start); batch 1 on the CPU for comparison
#      (fewer prompts and tokens).
# Prints a table and writes it, with every run's log and summary, under OUT_DIR.
#
# Usage: infra/gpu-check.sh [OUT_DIR]       (default: ./gpu-check)
# Environment:
#   BATCH_WORKER   the binary (default: batch-worker on PATH)
#   ORT_DYLIB_PATH ONNX Runtime's GPU build, its CUDA provider beside it (read by batch-worker)
#   REPO           checkout holding models/ (default: this script's repository)
#   PYTHON         a Python with numpy and onnx (default: python3)
#   CUDA_LIBS      folders with the CUDA 13 / cuDNN 9 libraries, ':'-separated (default: found
#                  in PYTHON's `nvidia` packages when LD_LIBRARY_PATH does not already hold them)
#   CHECK_DEVICE   the device under test (default: cuda; `cpu` runs the same steps on the CPU,
#                  to try the script on a machine without a GPU)
#   BENCH_SHAPE    qwen2.5-3b (default) or small
#   REPLY_TOKENS   tokens per timed reply (default: 150, the cost model's reply)
set -euo pipefail

OUT_DIR="${1:-gpu-check}"
REPO="${REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
BATCH_WORKER="${BATCH_WORKER:-batch-worker}"
PYTHON="${PYTHON:-python3}"
CHECK_DEVICE="${CHECK_DEVICE:-cuda}"
BENCH_SHAPE="${BENCH_SHAPE:-qwen2.5-3b}"
REPLY_TOKENS="${REPLY_TOKENS:-150}"
SYSTEM_PROMPT="너는 아동급식카드로 식사하는 어린이에게 근처 식당을 추천하는 친절한 도우미야. 어린이가 이해하기 쉬운 말로 짧고 안전하게 답해. 사용자가 영어로 말하면 영어로 답해."

log() { echo "gpu-check: $*" >&2; }
die() { log "$*"; exit 1; }

mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
WORK="$OUT_DIR/work"
mkdir -p "$WORK"
command -v "$BATCH_WORKER" >/dev/null || die "batch-worker not found (set BATCH_WORKER)"
[ -d "$REPO/models/lm" ] || die "no models/lm under $REPO (set REPO)"
"$PYTHON" -c 'import numpy, onnx' 2>/dev/null || die "$PYTHON lacks numpy or onnx (set PYTHON)"

if [ "$CHECK_DEVICE" = cuda ]; then
    if [ -z "${CUDA_LIBS:-}" ]; then
        CUDA_LIBS="$("$PYTHON" -c '
import glob, os
try:
    import nvidia
except ImportError:
    raise SystemExit(0)
wanted = ("libcudart.so.13", "libcublas.so.13", "libcublasLt.so.13", "libcufft.so.12",
          "libcurand.so.10", "libcudnn.so.9", "libnvrtc.so.13")
dirs = []
for root in nvidia.__path__:
    for name in wanted:
        for hit in glob.glob(os.path.join(root, "**", name), recursive=True):
            if os.path.dirname(hit) not in dirs:
                dirs.append(os.path.dirname(hit))
print(":".join(dirs))
')"
    fi
    export LD_LIBRARY_PATH="${CUDA_LIBS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    provider="$(dirname "${ORT_DYLIB_PATH:-.}")/libonnxruntime_providers_cuda.so"
    if [ -f "$provider" ]; then
        missing="$(ldd "$provider" | grep 'not found' || true)"
        [ -z "$missing" ] || die "the CUDA provider misses libraries (LD_LIBRARY_PATH=$LD_LIBRARY_PATH): $missing"
    fi
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$OUT_DIR/gpu.txt"
    fi
fi
log "device under test: $CHECK_DEVICE; ONNX Runtime: ${ORT_DYLIB_PATH:-the worker default}"

# run NAME ARGS...: one `batch-worker run`, its log in OUT_DIR/NAME.log, its output in WORK.
run() {
    local name="$1"
    shift
    rm -f "$WORK/$name.jsonl" "$WORK/$name.jsonl.ckpt" "$WORK/$name.jsonl.partial"
    log "$name"
    if ! "$BATCH_WORKER" run --output "$WORK/$name.jsonl" "$@" >"$OUT_DIR/$name.log" 2>&1; then
        tail -n 20 "$OUT_DIR/$name.log" >&2
        die "$name failed (log: $OUT_DIR/$name.log)"
    fi
    tail -n 1 "$OUT_DIR/$name.log" >&2
}

# Inputs: the intent test texts, repeated to 200,000 classify items; 64 chat prompts of them;
# restaurant requests as the 3B model's chat prompts.
"$PYTHON" - "$REPO" "$WORK" <<'EOF'
import json, sys
repo, work = sys.argv[1], sys.argv[2]
texts = [json.loads(l)["text"] for l in open(f"{repo}/models/intent/data/test.jsonl", encoding="utf-8")]
with open(f"{work}/classify.in.jsonl", "w", encoding="utf-8") as f:
    for i in range(200_000):
        f.write(json.dumps({"custom_id": f"c{i}", "input": texts[i % len(texts)]}, ensure_ascii=False) + "\n")
with open(f"{work}/chat.in.jsonl", "w", encoding="utf-8") as f:
    for i in range(64):
        f.write(json.dumps({"custom_id": f"g{i}", "input": texts[(i * 89) % len(texts)]}, ensure_ascii=False) + "\n")
asks = ["근처에 아동급식카드로 먹을 수 있는 김밥집 알려줘", "오늘 저녁에 갈 만한 분식집 있어?",
        "급식카드 되는 중국집 추천해줘", "학교 앞에서 떡볶이 먹고 싶어", "Which restaurants near me take the meal card?",
        "돈가스 파는 곳 중에 카드 되는 데 있어?", "비 오는 날 먹기 좋은 국수집 알려줘", "혼자 가도 되는 식당 추천해 줘"]
with open(f"{work}/bench.in.jsonl", "w", encoding="utf-8") as f:
    for i in range(32):
        f.write(json.dumps({"custom_id": f"b{i}", "input": asks[i % len(asks)]}, ensure_ascii=False) + "\n")
EOF
head -n 4 "$WORK/bench.in.jsonl" >"$WORK/bench-cpu.in.jsonl"
head -n 8 "$WORK/bench.in.jsonl" >"$WORK/bench-b1.in.jsonl"

run classify-"$CHECK_DEVICE" --task classify --device "$CHECK_DEVICE" --model-dir "$REPO/models" --input "$WORK/classify.in.jsonl"
run classify-"$CHECK_DEVICE"-2threads --task classify --device "$CHECK_DEVICE" --threads 2 --model-dir "$REPO/models" --input "$WORK/classify.in.jsonl"
run classify-ref-cpu --task classify --device cpu --model-dir "$REPO/models" --input "$WORK/classify.in.jsonl"
LM=(--task generate --lm-dir "$REPO/models/lm" --generate-batch-size 8 --max-new-tokens 32 --input "$WORK/chat.in.jsonl")
run lm-"$CHECK_DEVICE" --device "$CHECK_DEVICE" "${LM[@]}"
run lm-ref-cpu --device cpu "${LM[@]}"

BENCH_LM="$WORK/bench-lm"
if [ ! -f "$BENCH_LM/model.onnx" ]; then
    log "building the $BENCH_SHAPE-shaped model"
    "$PYTHON" "$REPO/models/lm/make_bench_model.py" "$BENCH_LM" --shape "$BENCH_SHAPE" 2>&1 | tee "$OUT_DIR/bench-model.log" >&2
fi
BENCH=(--task generate --lm-dir "$BENCH_LM" --ignore-stop-tokens --system-prompt "$SYSTEM_PROMPT")
run bench-b1-short-"$CHECK_DEVICE" --device "$CHECK_DEVICE" "${BENCH[@]}" --generate-batch-size 1 --max-new-tokens 16 --input "$WORK/bench-b1.in.jsonl"
run bench-b1-"$CHECK_DEVICE" --device "$CHECK_DEVICE" "${BENCH[@]}" --generate-batch-size 1 --max-new-tokens "$REPLY_TOKENS" --input "$WORK/bench-b1.in.jsonl"
run bench-b8-"$CHECK_DEVICE" --device "$CHECK_DEVICE" "${BENCH[@]}" --generate-batch-size 8 --max-new-tokens "$REPLY_TOKENS" --input "$WORK/bench.in.jsonl"
run bench-ref-cpu --device cpu "${BENCH[@]}" --generate-batch-size 1 --max-new-tokens 16 --input "$WORK/bench-cpu.in.jsonl"

# The comparisons and the table.
"$PYTHON" - "$OUT_DIR" "$WORK" "$CHECK_DEVICE" "$BENCH_SHAPE" "$SYSTEM_PROMPT" <<'EOF' | tee "$OUT_DIR/gpu-check.md"
import json, re, sys
out, work, dev, shape, system = sys.argv[1:6]
failed = []

def lines(name):
    rows = {}
    for l in open(f"{work}/{name}.jsonl", encoding="utf-8"):
        r = json.loads(l)
        rows[r["custom_id"]] = r
    return rows

def summary(name):
    text = open(f"{out}/{name}.log", encoding="utf-8").read().strip().splitlines()[-1]
    m = re.search(r"; (\d+) items in ([\d.]+) s \(.*model loaded in ([\d.]+) s\)", text)
    if not m:
        raise SystemExit(f"unexpected summary in {name}.log: {text}")
    return int(m.group(1)), float(m.group(2)), float(m.group(3))

def provider(name):
    for l in open(f"{out}/{name}.log", encoding="utf-8"):
        m = re.search(r'"provider":"(\w+)"', l)
        if m:
            return m.group(1)
    return "?"

a, b = lines(f"classify-{dev}"), lines("classify-ref-cpu")
errors = sum("error" in r for r in a.values()) + sum("error" in r for r in b.values())
differ = sum(a[k]["output"]["intent"] != b[k]["output"]["intent"] for k in a if "output" in a[k])
conf = max(abs(a[k]["output"]["confidence"] - b[k]["output"]["confidence"]) for k in a if "output" in a[k])
if len(a) != 200_000 or a.keys() != b.keys() or errors or differ or conf > 1e-4:
    failed.append(f"classify: {len(a)} lines, {errors} errors, {differ} intents differ, max confidence difference {conf:.2e}")
print(f"classify, 200,000 items: intents differ on {differ}, max confidence difference {conf:.1e}")
if lines(f"classify-{dev}-2threads") != a:
    failed.append("classify: --threads 2 wrote other lines than the default threads")

a, b = lines(f"lm-{dev}"), lines("lm-ref-cpu")
same = sum(a[k] == b[k] for k in a)
if len(a) != 64 or a.keys() != b.keys() or same != len(a):
    failed.append(f"test model: {same} of {len(a)} replies equal on {dev} and cpu")
print(f"test model, 64 greedy chat replies: {same} of {len(a)} equal to the CPU's")
print()

from tokenizers import Tokenizer
tok = Tokenizer.from_file(f"{work}/bench-lm/tokenizer.json")
prompts = [json.loads(l)["input"] for l in open(f"{work}/bench.in.jsonl", encoding="utf-8")]
lengths = [len(tok.encode(f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False).ids) for p in prompts]
print(f"{shape}-shaped model (random int4 weights); prompts of {min(lengths)}-{max(lengths)} tokens (system prompt included)")
print()
print("| run | provider | replies | tokens each | wall s (model load excluded) | s per reply | tokens/s | model load s |")
print("|---|---|---|---|---|---|---|---|")
rows = [("classify", f"classify-{dev}"), ("classify, --threads 2", f"classify-{dev}-2threads"), ("classify", "classify-ref-cpu"), ("test model, batch 8", f"lm-{dev}"), ("test model, batch 8", "lm-ref-cpu"),
        ("3B-shaped, batch 1", f"bench-b1-short-{dev}"), ("3B-shaped, batch 1", f"bench-b1-{dev}"), ("3B-shaped, batch 8", f"bench-b8-{dev}"),
        ("3B-shaped, batch 1", "bench-ref-cpu")]
for label, name in rows:
    n, wall, load = summary(name)
    outs = lines(name)
    tokens = sum(r["output"].get("tokens", 0) for r in outs.values() if "output" in r)
    bad = sum("error" in r for r in outs.values())
    if bad:
        failed.append(f"{name}: {bad} error lines")
    work_s = wall - load
    each = f"{tokens / n:.0f}" if tokens else "-"
    tps = f"{tokens / work_s:,.0f}" if tokens else "-"
    per = f"{work_s / n:.3f}" if tokens else f"{n / work_s:,.0f} items/s"
    print(f"| {label} | {provider(name)} | {n:,} | {each} | {work_s:.2f} | {per} | {tps} | {load:.2f} |")

# Batch 1, two reply lengths: the slope is one decoding step, the rest is prefill and start.
(n_s, wall_s, load_s), (n_l, wall_l, load_l) = summary(f"bench-b1-short-{dev}"), summary(f"bench-b1-{dev}")
tok_s = sum(r["output"]["tokens"] for r in lines(f"bench-b1-short-{dev}").values()) / n_s
tok_l = sum(r["output"]["tokens"] for r in lines(f"bench-b1-{dev}").values()) / n_l
per_s, per_l = (wall_s - load_s) / n_s, (wall_l - load_l) / n_l
step = (per_l - per_s) / (tok_l - tok_s)
print()
print(f"batch 1 on {dev}: {step * 1000:.1f} ms per decoding step; prefill, first token and the rest {max(per_s - (tok_s - 1) * step, 0) * 1000:.0f} ms per reply")
if failed:
    print()
    for f in failed:
        print(f"FAILED: {f}")
    sys.exit(1)
EOF
