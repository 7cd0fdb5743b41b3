#!/usr/bin/env bash
# The held-out sweeps every GHN-Q checkpoint is judged by (issue 6), in one command:
#
#   benchmarks/heldout_sweeps.sh CHECKPOINT TAG [OUTDIR]      # default OUTDIR: runs/eval
#
# - cifar:   the 100 cifar held-out specs + specs/*.yaml + benchmarks/specs-torchvision/*.yaml, two shards side
#            by side (one core each), concatenated into OUTDIR/TAG-100.jsonl
# - deep, grammar, modern: the first 30 held-out specs of each space → OUTDIR/<space>-TAG-30.jsonl
# All at float / W8A8 / W4A8 / W4A4 on 1,000 class-interleaved CIFAR-10 test images with the train loop's
# fake-quant engine (BN statistics and ranges fixed as calibration fixes them). Resumable: rerun the same
# command after a stop and only the missing specs are evaluated. Compare two checkpoints with
#
#   python benchmarks/bench_ghnq_eval.py --heldout-only --paired "A"=OUTDIR/A-100.jsonl "B"=OUTDIR/B-100.jsonl
#
# SPACES="deep grammar" limits the 30-spec sweeps; SKIP_CIFAR=1 skips the cifar sweep.
# (Sessions 10-21 ran these same commands from a git-ignored runs/ script, lost with each fresh checkout.)
set -euo pipefail
if [[ $# -lt 2 ]]; then
    sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
ckpt=$1 tag=$2 out=${3:-runs/eval}
[[ -f $ckpt ]] || { echo "heldout_sweeps.sh: checkpoint not found: $ckpt" >&2; exit 2; }
ckpt=$(realpath "$ckpt")
cd "$(dirname "$0")/.."  # OUTDIR is relative to the project root
py=${PYTHON:-.venv/bin/python}
mkdir -p "$out"
common=(--bits float,8,4,4a4 --images 1000 --engine fakequant --threads 1 --resume --checkpoint "$ckpt")

if [[ -z ${SKIP_CIFAR:-} ]]; then
    for k in 0 1; do
        "$py" -m ghnq.evaluate --arch specs/*.yaml benchmarks/specs-torchvision/*.yaml --heldout 100 "${common[@]}" \
            --shard "$k/2" --out "$out/$tag-100.shard$k.jsonl" > /dev/null &
    done
    wait
    cat "$out/$tag-100.shard0.jsonl" "$out/$tag-100.shard1.jsonl" > "$out/$tag-100.jsonl.tmp"
    mv "$out/$tag-100.jsonl.tmp" "$out/$tag-100.jsonl"
fi
# two at a time, one core each
running=0
for space in ${SPACES:-deep grammar modern}; do
    "$py" -m ghnq.evaluate --heldout 30 --heldout-space "$space" "${common[@]}" \
        --out "$out/$space-$tag-30.jsonl" > /dev/null &
    running=$((running + 1))
    if (( running == 2 )); then wait -n; running=1; fi
done
wait
ls -l "$out"/*"$tag"*.jsonl
