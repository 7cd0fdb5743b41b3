#!/usr/bin/env bash
# Device-layer numbers for one export folder: bundle it, run it here (x86) and on emulated aarch64
# (qemu, neoverse-n1 and the miscomputing default `max`), latency at 1..2 threads, and the sim-vs-device
# report. Usage: benchmarks/bench_devices.sh out/<name>/ [threads, default 1,2]
set -uo pipefail
cd "$(dirname "$0")/.."
export_dir=${1:?usage: benchmarks/bench_devices.sh out/<name>/ [threads]}
threads=${2:-1,2}
py=.venv/bin/python
t() { local s=$SECONDS; "$@"; local rc=$?; echo "[$((SECONDS - s)) s, exit $rc] $*" >&2; }

t bash scripts/make_arm_root.sh
t $py -m devices.bundle "$export_dir"
t $py -m devices.run --target local "$export_dir/bundle"
t $py -m devices.run --target qemu-aarch64 --runs 20 "$export_dir/bundle"
t $py -m devices.run --target qemu-aarch64 --qemu-cpu max --skip-latency --limit 200 "$export_dir/bundle"
t $py -m devices.bench --target local --threads "$threads" "$export_dir/bundle"
t $py -m devices.report "$export_dir" --out "$export_dir/devices_report"
