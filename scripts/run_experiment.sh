#!/usr/bin/env bash
# One row of docs/experiments.md: train with the given options into a scratch registry, then run the
# generalisation checks on the new version. Usage: scripts/run_experiment.sh TAG [train options...]
# Env: DATA (default ../shared/data/chest_xray/train), REG (default /tmp/xray-experiments), PY (python).
set -euo pipefail
cd "$(dirname "$0")/.."
TAG=$1; shift
DATA=${DATA:-../shared/data/chest_xray/train}
REG=${REG:-/tmp/xray-experiments}
PY=${PY:-.venv/bin/python}
mkdir -p "$REG/results"
$PY -m xray train "$DATA" --registry "$REG" --run-dir "$REG/runs/$TAG" --tag "$TAG" "$@" 2> "$REG/results/$TAG.train.log"
VERSION=$(ls -t "$REG/versions" | grep -- "-$TAG\$" | head -1)
$PY -m xray.train.robustness --registry "$REG" --model "$VERSION" --json "$REG/results/$TAG.json" > /dev/null
echo "$TAG $VERSION"
