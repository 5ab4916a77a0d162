#!/usr/bin/env bash
# `just lab-down`: stops what `just lab` started, by the PIDs it recorded in target/lab (the
# plane first: it powers off the machines it started, by their PIDs, then the registry).
# A recorded PID whose start time differs is another process now, and is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lab.sh

for name in plane registry; do
    lab_stop_recorded "target/lab/$name.pid"
done
rm -f target/lab/env
