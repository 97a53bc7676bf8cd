#!/usr/bin/env bash
# Our `patchcore bench` and anomalib 2.7's PatchCore on the same category, the same EfficientNet-Lite0
# ImageNet weights and the same resize 256 / crop 224, one after the other on an otherwise idle machine.
#
#   bash ../shared/peers/setup.sh                       # once: anomalib venv + weights in /tmp/peers
#   bash benchmarks/side_by_side.sh ../shared/data/mvtec_ad/bottle 0.1 results/side_by_side [repeats]
#
# Both sides use every training image for the bank (--calibration-ratio 0 on ours: the peer has no
# held-out threshold), and both time predict from image files (decoding included).
set -euo pipefail
DATA=${1:?category folder}
RATIO=${2:-0.1}
OUT=${3:-results/side_by_side}
REPEATS=${4:-1}
PEERS=${PEERS:-../shared/peers}
PEER_PY=${PEER_PY:-/tmp/peers/venv-anomalib/bin/python}
export OMP_WAIT_POLICY=PASSIVE
mkdir -p "$OUT"
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PATCHCORE=${PATCHCORE:-$HERE/.venv/bin/patchcore}
for rep in $(seq 1 "$REPEATS"); do
  /usr/bin/time -v "$PATCHCORE" bench "$DATA" --backbone efficientnet_lite0 --coreset-ratio "$RATIO" \
      --calibration-ratio 0 --device cpu --quiet -o "$OUT/ours_${RATIO}_$rep.json" 2> "$OUT/ours_${RATIO}_$rep.log"
  "$PEER_PY" "$PEERS/run_peer.py" --impl anomalib --data "$DATA" --backbone effnet-lite0 --coreset "$RATIO" \
      --out "$OUT/anomalib_${RATIO}_$rep.json" > "$OUT/anomalib_${RATIO}_$rep.log" 2>&1
done
"$HERE/.venv/bin/python" "$HERE/benchmarks/compare.py" "$OUT" "$RATIO"
