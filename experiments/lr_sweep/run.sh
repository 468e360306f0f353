#!/usr/bin/env bash
# The learning-rate sweep of issue 12 (experiments/lr_sweep/protocol.md), at the pilot's chosen
# setting (experiments/pilot/choice.json), into experiments/lr_sweep/runs/lr<rate>/.
#   1. selection: prenorm and block at 0.0015, 0.003, 0.006, seeds 0-2;
#   2. extension: while a variant's best rate is on the edge, the next rate out (x2), both variants,
#      at most two steps beyond the grid on each side;
#   3. more seeds: prenorm and block at prenorm's best rate, and block at its own best rate, up to
#      the pilot's seed count.
# A run whose training loss becomes NaN/inf stops its compare; the (variant, rate) is then marked
# with runs/lr<rate>/<variant>.diverged and never retried or chosen.
#
# Resumable like the pilot: rerun it and finished runs are reused. Commit as runs finish:
# git add experiments/lr_sweep && git commit.
#
# Environment: ATTNRES_PYTHON, SWEEP_JOBS (default 2), SWEEP_OUT (default experiments/lr_sweep/runs),
# SWEEP_SMOKE=1 (5 steps, 2 selection seeds and 3 in stage 3, into a temporary folder; SWEEP_SMOKE_GRID
# replaces the grid there).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
source "$HERE/../env.sh"
JOBS="${SWEEP_JOBS:-2}"
GRID=(0.0015 0.003 0.006)
SELECT_SEEDS=3
CHOICE="$ROOT/experiments/pilot/choice.json"
EXTRA=()
if [ "${SWEEP_SMOKE:-0}" = 1 ]; then
    SELECT_SEEDS=2
    EXTRA=(--train.steps=5 --train.eval_every=5 --train.eval_tokens=1024 --train.checkpoint_every=0)
    OUT="${SWEEP_OUT:-$(mktemp -d "${TMPDIR:-/tmp}/sweep-smoke.XXXXXX")/runs}"
    SETTING=A SEEDS=3
    read -r -a GRID <<<"${SWEEP_SMOKE_GRID:-${GRID[*]}}"  # e.g. "0.003 1e3" to see a divergence marked
else
    OUT="${SWEEP_OUT:-$HERE/runs}"
    [ -f "$CHOICE" ] || { echo "no $CHOICE: run and analyze the pilot first" >&2; exit 1; }
    read -r SETTING SEEDS < <("$PY" -c 'import json, sys
c = json.load(open(sys.argv[1]))
print(c["setting"] or "-", c["seeds"] or "-")' "$CHOICE")
    [ "$SETTING" != "-" ] || { echo "the pilot has not chosen a setting yet ($CHOICE)" >&2; exit 1; }
fi
CONFIG="$ROOT/experiments/pilot/settings/$SETTING.json"
SWEEP="$(dirname "$OUT")"
mkdir -p "$OUT"
say "lr sweep: setting $SETTING ($CONFIG), selection seeds 0-$((SELECT_SEEDS - 1)), then $SEEDS seeds at the best rates"

compare() {  # compare LR SEEDS VARIANTS
    "$PY" -m attnres compare --config "$CONFIG" "--optim.lr=$1" --seeds "$2" --variants "$3" \
        --jobs "$JOBS" --out "$OUT/lr$1" "${EXTRA[@]}"
}

train() {  # train LR SEEDS VARIANT...: the variants not marked diverged at LR, to SEEDS seeds
    local lr=$1 seeds=$2 todo=() v log
    shift 2
    for v in "$@"; do [ -e "$OUT/lr$lr/$v.diverged" ] || todo+=("$v"); done
    [ ${#todo[@]} -gt 0 ] || return 0
    say "lr $lr: ${todo[*]}, seeds 0-$((seeds - 1))"
    compare "$lr" "$seeds" "$(IFS=,; echo "${todo[*]}")" && return 0
    for v in "${todo[@]}"; do  # which one failed, and was it a divergence?
        log="$(mktemp)"
        if ! compare "$lr" "$seeds" "$v" >"$log" 2>&1; then
            if grep -q "training loss became" "$log"; then
                "$PY" -c 'import json, sys; print(json.dumps({"variant": sys.argv[1], "lr": float(sys.argv[2]), "error": sys.argv[3]}))' \
                    "$v" "$lr" "$(grep "training loss became" "$log" | tail -1)" >"$OUT/lr$lr/$v.diverged"
                say "lr $lr: $v diverged (marked $OUT/lr$lr/$v.diverged)"
            else
                cat "$log" >&2
                echo "lr $lr: $v failed, not by divergence (log above); fix it and rerun" >&2
                exit 1
            fi
        fi
        rm -f "$log"
    done
}

analysis() { "$PY" -m attnres.analysis.experiments lr-sweep "$SWEEP" "$@"; }

for lr in "${GRID[@]}"; do train "$lr" "$SELECT_SEEDS" prenorm block; done
for _ in 1 2 3 4; do  # at most two steps beyond the grid on each side
    next="$(analysis --next "$(IFS=,; echo "${GRID[*]}")")"
    [ -n "$next" ] || break
    for lr in $next; do train "$lr" "$SELECT_SEEDS" prenorm block; done
done
best_pre="$(analysis --best | awk '$1 == "prenorm" {print $2}')"
best_blk="$(analysis --best | awk '$1 == "block" {print $2}')"
say "best rates (seeds 0-$((SELECT_SEEDS - 1))): prenorm $best_pre, block $best_blk"
[ "$best_pre" != none ] && train "$best_pre" "$SEEDS" prenorm block
[ "$best_blk" != none ] && [ "$best_blk" != "$best_pre" ] && train "$best_blk" "$SEEDS" block
say "lr sweep runs done"
analysis
