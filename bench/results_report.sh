#!/usr/bin/env bash
# Regenerates docs/results.md end to end (issue 6): for quora-dev, cranfield and cisi it trains DSSM
# by the recipe of 59d8fe5 (quora-dev: pre-training + fine-tuning; others: `dssm train`, no flags; today's default
# recipe is bench/quality_table.py's), indexes the corpus, runs `dssm eval`
# with every system and a --report, and on quora-dev `dssm thresholds`; then assembles the page.
#
#   bench/results_report.sh [DATASETS_DIR] [WORKDIR]
#
# DATASETS_DIR defaults to ../shared/datasets, WORKDIR to work/results (both relative to the project
# root). Artifacts and full reports (TREC runs etc.) stay in WORKDIR; docs/results/ receives the
# metrics JSON and the PNGs that docs/results.md embeds. About 9 minutes on 2 shared CPU cores.
#
# In a tree other people are editing, run it from a clean checkout of the commit you report on, e.g.
#   git worktree add --detach /tmp/wt HEAD && cd /tmp/wt && PYTHONPATH=$PWD DSSM=$OLDPWD/.venv/bin/dssm \
#     PY=$OLDPWD/.venv/bin/python bench/results_report.sh $OLDPWD/../shared/datasets $OLDPWD/work/results
# and copy docs/results.md and docs/results/ back.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/datasets}
WORK=${2:-work/results}
DSSM=${DSSM:-.venv/bin/dssm}
PY=${PY:-.venv/bin/python}
DOCS=docs/results
mkdir -p "$WORK" "$DOCS"
START=$(date +%s)

run() { echo "+ $*" >&2; "$@"; }

# quora-dev, the default recipe: label-free pre-training on BM25-neighbour pairs of the corpus, then
# fine-tuning on the duplicate pairs of 80% of the questions for a fixed 10 epochs (so the held-out 20%,
# the pairs' validation split, choose nothing), evaluated on the held-out 20%.
q="$WORK/quora"
rm -rf "$q"
run "$DSSM" pairs --input "$DATA/quora-dev/corpus.jsonl" --format neighbours --output "$q/neighbours" \
    --validation-fraction 0.05
run "$DSSM" train --pairs "$q/neighbours" --output "$q/pretrained" --verbose 2
run "$DSSM" pairs --input "$DATA/quora-dev/pairs.tsv" --format quora --output "$q/pairs" --validation-fraction 0.2
run "$DSSM" train --pairs "$q/pairs" --output "$q/model" --verbose 2 --init-from "$q/pretrained" \
    --epochs 10 --early-stopping-patience 0 --no-keep-best
run "$DSSM" index --model "$q/model" --corpus "$DATA/quora-dev/corpus.jsonl" --output "$q/index"
run "$DSSM" eval --index "$q/index" --data "$DATA/quora-dev" --skip-self --holdout "$q/pairs" \
    --report "$q/report" --json "$q/eval.json" --save-weight
run "$DSSM" thresholds --index "$q/index" --pairs "$DATA/quora-dev/pairs.tsv" --holdout "$q/pairs" \
    --json "$q/thresholds.json" --plot "$q/report/thresholds.png" --save

# cranfield and cisi: label-free, on (title -> body / sentence -> rest) pairs cut from the corpus.
for name in cranfield cisi; do
    w="$WORK/$name"
    rm -rf "$w"
    run "$DSSM" pairs --input "$DATA/$name" --format corpus --output "$w/pairs"
    run "$DSSM" train --pairs "$w/pairs" --output "$w/model" --verbose 2
    run "$DSSM" index --model "$w/model" --corpus "$DATA/$name/corpus.jsonl" --output "$w/index"
    run "$DSSM" eval --index "$w/index" --data "$DATA/$name" --report "$w/report" --json "$w/eval.json" --save-weight
done

for name in quora cranfield cisi; do
    mkdir -p "$DOCS/$name"
    cp "$WORK/$name/report/"*.png "$WORK/$name/report/metrics.json" "$DOCS/$name/"
done
cp "$WORK/quora/thresholds.json" "$DOCS/quora/thresholds.json"
SECONDS_TOTAL=$(( $(date +%s) - START ))
run "$PY" -c "from bench.results_md import main; raise SystemExit(main())" --work "$WORK" --out docs/results.md \
    --seconds "$SECONDS_TOTAL"
echo "wrote docs/results.md in ${SECONDS_TOTAL} s" >&2
