#!/usr/bin/env bash
# After the segmentation bundle changes (new weights, new post-processing, another
# backend), the fusion heads must see the new bundle's findings:
#
#   bash bench/refit_fusion.sh [--bundle DIR]
#
# 1. bench/fusion_network_cases.py on the test seeds (700000-700319) and, in a second
#    process, on the training seeds (710000-710399), into $WORK (default var/refit;
#    a stopped run resumes there, and records of another bundle are refused);
# 2. the first 50 test records become the report bench's records;
# 3. bench/fusion_ablation.py refits the shipped fusion weights
#    (models/fusion_weights/fusion.json) and writes bench/results/fusion_ablation.json;
# 4. bench/report_quality.py writes bench/results/report_quality.json with them.
# The three record files in bench/results are replaced only once every record is in.
# About an hour on a 2-core CPU. CASES_TEST, CASES_TRAIN and CASES_REPORT change the
# counts, RESULTS (default bench/results) and WEIGHTS (default
# models/fusion_weights/fusion.json) where the results go: for a quick check of the
# script (tests/test_fusion.py); committed results use the defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
WORK=${WORK:-var/refit}
CASES_TEST=${CASES_TEST:-320}
CASES_TRAIN=${CASES_TRAIN:-400}
CASES_REPORT=${CASES_REPORT:-50}
RESULTS=${RESULTS:-bench/results}
WEIGHTS=${WEIGHTS:-models/fusion_weights/fusion.json}
BUNDLE=()
if [[ "${1:-}" == "--bundle" ]]; then
  BUNDLE=(--bundle "${2:?--bundle needs a directory}")
elif [[ $# -gt 0 ]]; then
  echo "usage: bash bench/refit_fusion.sh [--bundle DIR]" >&2
  exit 2
fi
mkdir -p "$WORK"
echo "[refit] network records into $WORK ($CASES_TEST test, $CASES_TRAIN training cases)"
"$PY" bench/fusion_network_cases.py "${BUNDLE[@]}" --cases "$CASES_TEST" \
  --first-seed 700000 --out "$WORK/test.jsonl" > "$WORK/test.log" 2>&1 &
test_pid=$!
"$PY" bench/fusion_network_cases.py "${BUNDLE[@]}" --cases "$CASES_TRAIN" \
  --first-seed 710000 --out "$WORK/train.jsonl" > "$WORK/train.log" 2>&1 &
train_pid=$!
status=0
wait "$test_pid" || { status=$?; echo "[refit] test cases failed: $WORK/test.log" >&2; }
wait "$train_pid" || { status=$?; echo "[refit] training cases failed: $WORK/train.log" >&2; }
[[ $status -eq 0 ]] || exit "$status"
"$PY" - "$WORK" "$CASES_REPORT" <<'EOF'
import json
import sys
from pathlib import Path

sys.path.insert(0, "bench")
from fusion_network_cases import load_cases

work, n = Path(sys.argv[1]), int(sys.argv[2])
rows = load_cases(work / "test.jsonl")[:n]
lines = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rows)
(work / "report.jsonl").write_text(lines, encoding="utf-8")
print(f"[refit] {len(rows)} report records ({rows[0]['model']})")
EOF
mkdir -p "$RESULTS"
cp "$WORK/test.jsonl" "$RESULTS/fusion_network_cases.jsonl"
cp "$WORK/train.jsonl" "$RESULTS/fusion_train_network_cases.jsonl"
cp "$WORK/report.jsonl" "$RESULTS/report_network_cases.jsonl"
echo "[refit] fusion heads and ablation"
"$PY" bench/fusion_ablation.py --network-cases "$RESULTS/fusion_network_cases.jsonl" \
  --network-train "$RESULTS/fusion_train_network_cases.jsonl" \
  --out "$RESULTS/fusion_ablation.json" --weights "$WEIGHTS"
echo "[refit] report quality"
"$PY" bench/report_quality.py --network-cases "$RESULTS/report_network_cases.jsonl" \
  --cases "$CASES_REPORT" --out "$RESULTS/report_quality.json" --weights "$WEIGHTS"
echo "[refit] done: commit $RESULTS and $WEIGHTS together with the bundle"
