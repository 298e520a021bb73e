#!/usr/bin/env bash
# Regenerates the committed sample report docs/sample_report/ (README, "Evaluation"):
# four tiny tokenizers trained for 6 steps (debug=smoke: random feature networks, so the
# numbers only check the plumbing), evaluated into a fresh folder, which then replaces
# docs/sample_report. Run from the repository root: bash scripts/sample_report.sh
set -euo pipefail
runs=logs/sample_report
tokenizers=(vqgan fqgan_dual vae flextok)
for t in "${tokenizers[@]}"; do
  rm -rf "${runs:?}/$t"
  python train.py debug=smoke tokenizer="$t" logger=csv hydra.run.dir="$runs/$t"
done
fresh="$runs/report_$(date +%Y%m%d_%H%M%S)"
checkpoints=$(printf "$runs/%s," "${tokenizers[@]}")
python evaluate.py "checkpoints=[${checkpoints%,}]" debug=smoke data=demo limit_batches=null out="$fresh"
rm -rf docs/sample_report
cp -r "$fresh" docs/sample_report
rm -rf docs/sample_report/.hydra docs/sample_report/*.log
echo "docs/sample_report regenerated from $fresh"
