#!/usr/bin/env bash
# GPU check of opd.py's CUDA path on a pair of real size, built locally (no hub, no network):
# Qwen2 configuration, a 151,936-token byte-level BPE tokenizer with a chat template (the same
# for both), student with Qwen2.5-0.5B's shapes, teacher with Qwen2.5-1.5B's, random weights.
# Then one plain OPD run (batch 8, 1,024-token budget, --chunk-size 256) and, if time is left,
# one resumed step from its checkpoint. Prints tokens/s per phase and peak GPU memory.
#
#   bash gpu/check.sh                      # on the GPU machine, from the repository root
#   OPD_CHECK_TINY=1 bash gpu/check.sh     # every size shrunk, on the CPU: a dry run of this script
#
# Writes at most 6 files into $OUT: build.log, run.log, resume.log, metrics.jsonl, summary.json, summary.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu/out}
WORK=${WORK:-/tmp/opd-gpu-check}
PY=${PY:-python3}
TINY=${OPD_CHECK_TINY:-0}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
mkdir -p "$OUT"; rm -rf "$WORK"; mkdir -p "$WORK"
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }

# ---------------------------------------------------------------- 1. build the pair and the prompts
WORK="$WORK" TINY="$TINY" timeout 120 "$PY" - <<'EOF' 2>&1 | tee "$OUT/build.log"
import json, os, random, sys, time
import torch, transformers, tokenizers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config

work, tiny = os.environ["WORK"], os.environ["TINY"] == "1"
dev = "cpu" if tiny else "cuda"
t0 = time.time()
print(f"torch {torch.__version__}, transformers {transformers.__version__}, tokenizers {tokenizers.__version__}, "
      f"device {torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'}", flush=True)

# Byte-level BPE with exactly V entries, built from a vocabulary and merges (no training):
# the 256 byte symbols, all pairs of 53 letters, then letter-triples, then 3 special tokens.
V = 3_000 if tiny else 151_936
special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
letters = [c for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"] + ["\u0120"]   # \u0120: byte-level space
vocab, merges = {c: i for i, c in enumerate(alphabet)}, []
pairs = [(a, b) for a in letters for b in letters] + [(a + b, c) for a in letters for b in letters for c in letters]
for a, b in pairs[:V - len(alphabet) - len(special)]:
    vocab[a + b] = len(vocab)
    merges.append((a, b))
raw = Tokenizer(models.BPE(vocab=vocab, merges=merges))
raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
raw.decoder = decoders.ByteLevel()
raw.add_special_tokens(special)
tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|endoftext|>")
tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                     "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
assert len(tok) == V, len(tok)

shapes = {  # Qwen2.5-0.5B and -1.5B (hidden, intermediate, layers, heads, kv heads); tiny: a CPU dry run
    "student": (64, 128, 2, 4, 2) if tiny else (896, 4864, 24, 14, 2),
    "teacher": (128, 256, 2, 4, 2) if tiny else (1536, 8960, 28, 12, 2)}
for role, (h, inter, layers, heads, kv) in shapes.items():
    torch.manual_seed({"student": 0, "teacher": 1}[role])
    cfg = Qwen2Config(vocab_size=V, hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=32768,
                      rope_theta=1_000_000.0, tie_word_embeddings=True, bos_token_id=None,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(f"{work}/{role}")
    tok.save_pretrained(f"{work}/{role}")
    print(f"{role}: {n / 1e9:.3f}B parameters, hidden {h}, {layers} layers, saved ({time.time() - t0:.0f}s)", flush=True)
    del model
    torch.cuda.empty_cache() if dev == "cuda" else None

# the tokenizer as opd.py will load it: beside a Qwen2 config, AutoTokenizer may rebuild it
back = AutoTokenizer.from_pretrained(f"{work}/student")
text = "What is seventeen times twentythree"
print(f"reloaded tokenizer: {type(back).__name__}, {len(back)} entries, eos {back.eos_token!r} ({back.eos_token_id}), "
      f"pad {back.pad_token!r}; encodes {text!r} to {len(back(text)['input_ids'])} ids (built: {len(tok(text)['input_ids'])})")
if len(back) != V or not back(text)["input_ids"] or back.eos_token_id != tok.eos_token_id or not back.chat_template:
    sys.exit("the reloaded tokenizer is broken (see the line above); the check would measure nothing")

rnd = random.Random(0)
words = ["what", "is", "the", "sum", "of", "seventeen", "and", "twenty", "three", "explain", "why", "prove", "that",
         "every", "prime", "number", "greater", "than", "two", "odd", "write", "a", "short", "story", "about", "cats"]
with open(f"{work}/prompts.jsonl", "w") as f:       # 15 prompts: opd.py holds out 15 // 8 = 1 for evaluation
    for _ in range(15):
        f.write(json.dumps({"prompt": " ".join(rnd.choice(words) for _ in range(rnd.randint(8, 20)))}) + "\n")
print(f"built in {time.time() - t0:.0f}s", flush=True)
EOF
[ "${PIPESTATUS[0]}" = 0 ] || { echo "build failed after $(elapsed)s (see $OUT/build.log)"; exit 1; }

# ---------------------------------------------------------------- 2. the OPD run
if [ "$TINY" = 1 ]; then
  SIZE=(--device cpu --steps 2 --batch-size 4 --max-new-tokens 32 --chunk-size 16 --save-every 2); LAST=2
else
  SIZE=(--device cuda --steps 4 --batch-size 8 --max-new-tokens 1024 --chunk-size 256 --save-every 4); LAST=4
fi
FLAGS=(--teacher "$WORK/teacher" --student "$WORK/student" --prompts "$WORK/prompts.jsonl" --methods opd --seeds 1
       --lr 1e-6 --eval-size 1 --eval-every 100 --log-samples-every 0 --out-dir "$WORK/runs" --plots-dir "$WORK/plots"
       "${SIZE[@]}")
echo "python3 opd.py ${FLAGS[*]}" | tee "$OUT/run.log"
if "$PY" -c "import matplotlib" 2>/dev/null; then RUN=("$PY" opd.py)
else   # only the study's figures need matplotlib: the same flags, in-process, without them
  RUN=("$PY" -c "import sys, opd; c, _, g = opd.parse_config(sys.argv[1:]); opd.run_opd(opd.config_for(c, 'opd', c.seed, g), 'opd')")
  echo "[check] no matplotlib here: running opd.run_opd() with the same flags, without the study's figures" | tee -a "$OUT/run.log"
fi
timeout $(( 330 - $(elapsed) )) "${RUN[@]}" "${FLAGS[@]}" 2>&1 | tee -a "$OUT/run.log"
RC=${PIPESTATUS[0]}
cp "$WORK/runs/opd-s0/metrics.jsonl" "$OUT/metrics.jsonl" 2>/dev/null
cp "$WORK/runs/opd-s0/config.json" "$WORK/config.json" 2>/dev/null
ls -l "$WORK/runs/opd-s0/checkpoint.pt" 2>&1 | tee -a "$OUT/run.log"
echo "OPD run exit code $RC after $(elapsed)s" | tee -a "$OUT/run.log"

# ---------------------------------------------------------------- 3. resume one more step from its checkpoint, if time is left
LEFT=$(( 330 - $(elapsed) ))
if [ "$RC" = 0 ] && [ "$LEFT" -gt 60 ]; then
  timeout "$LEFT" "${RUN[@]}" "${FLAGS[@]}" --steps $((LAST + 1)) --save-every 0 --resume 2>&1 | tee "$OUT/resume.log"
  echo "resume exit code ${PIPESTATUS[0]} after $(elapsed)s" | tee -a "$OUT/resume.log"
else
  echo "resume skipped ($LEFT s left)" | tee "$OUT/resume.log"
fi

# ---------------------------------------------------------------- 4. tokens/s per phase, peak memory
OUT="$OUT" WORK="$WORK" RC="$RC" ELAPSED="$(elapsed)" "$PY" - <<'EOF' | tee "$OUT/summary.txt"
import json, os, re
out, work = os.environ["OUT"], os.environ["WORK"]
rows = [json.loads(l) for l in open(f"{out}/metrics.jsonl")] if os.path.exists(f"{out}/metrics.jsonl") else []
log = open(f"{out}/run.log").read()
cfg = json.load(open(f"{work}/config.json")) if os.path.exists(f"{work}/config.json") else {}
train = [r for r in rows if "time/rollout_s" in r]
per_step = []
for r in train:
    tokens = r["rollout/len_mean"] * cfg.get("batch_size", 0)         # response tokens of the step (EOS included)
    per_step.append({"step": r["step"], "tokens": tokens, "trunc_rate": r["rollout/trunc_rate"],
                     **{f"{k}_s": r.get(f"time/{k}_s", 0.0) for k in ("rollout", "teacher", "update", "eval")},
                     **{f"{k}_tok_per_s": tokens / max(r[f"time/{k}_s"], 1e-9) for k in ("rollout", "teacher", "update")}})
steady = per_step[1:] or per_step                                     # step 0 pays one-off CUDA start-up costs
mean = {k: sum(s[k] for s in steady) / len(steady) for k in ("rollout_tok_per_s", "teacher_tok_per_s", "update_tok_per_s",
                                                              "rollout_s", "teacher_s", "update_s")} if steady else {}
peak = re.findall(r"peak CUDA memory: ([\d.]+) GiB", log)
resume = open(f"{out}/resume.log").read() if os.path.exists(f"{out}/resume.log") else ""
summary = {"exit_code": int(os.environ["RC"]), "elapsed_s": int(os.environ["ELAPSED"]), "steps": per_step,
           "mean_over_steps_after_0": mean, "peak_cuda_gib": float(peak[-1]) if peak else None,
           "build": open(f"{out}/build.log").read().splitlines()[:1],
           "eval_s": [r["time/eval_s"] for r in train if r.get("time/eval_s")],
           "checkpoint_gb": (lambda m: int(m[0]) / 1e9 if m else None)(re.findall(r" (\d+) \w+ +\d+ [\d:]+ \S*checkpoint.pt", log)),
           "resumed": "going on at step" in resume, "resume_ok": "resume exit code 0" in resume}
json.dump(summary, open(f"{out}/summary.json", "w"), indent=1)
print(f"{'step':>4} {'tokens':>7} {'trunc':>5} | {'rollout s':>9} {'tok/s':>8} | {'teacher s':>9} {'tok/s':>8} | {'update s':>8} {'tok/s':>8}")
for s in per_step:
    print(f"{s['step']:>4} {s['tokens']:>7.0f} {s['trunc_rate']:>5.2f} | {s['rollout_s']:>9.2f} {s['rollout_tok_per_s']:>8.0f} | "
          f"{s['teacher_s']:>9.2f} {s['teacher_tok_per_s']:>8.0f} | {s['update_s']:>8.2f} {s['update_tok_per_s']:>8.0f}")
if mean:
    print(f"mean over steps 1+: rollout {mean['rollout_tok_per_s']:.0f} tok/s, teacher {mean['teacher_tok_per_s']:.0f} tok/s, "
          f"update {mean['update_tok_per_s']:.0f} tok/s")
print(f"held-out evaluation (1 prompt, greedy, full budget): {summary['eval_s']} s")
print(f"checkpoint.pt: {summary['checkpoint_gb']} GB")
print(f"peak CUDA memory: {summary['peak_cuda_gib']} GiB; resumed from the checkpoint: {summary['resumed']} "
      f"(ok: {summary['resume_ok']}); exit code {summary['exit_code']}; {summary['elapsed_s']} s in all")
EOF
exit "$RC"
