#!/usr/bin/env bash
# Where the CPU goes when nbdcopy moves 1 GiB over 4 loopback connections: CPU time per GiB of the server
# (utime + stime from /proc/PID/stat) and of the whole machine (/proc/stat), for nbd-serve, nbdkit's file
# plugin and `nbdkit null` (writes only: it stores nothing), serving one file of random data in /dev/shm.
# `dd` of the same GiB from the source into the served file makes two copies (source to a buffer, buffer to
# the file): about half of its cost is the one copy any storing server makes. Prints the median of ROUNDS
# runs per figure.
#
# Needs: nbdkit, libnbd-bin (nbdcopy, nbdinfo), python3. Environment: ROUNDS (default 5), CONNECTIONS
# (default 4), CARGO_TARGET_DIR.
set -euo pipefail

ROUNDS=${ROUNDS:-5}
CONNECTIONS=${CONNECTIONS:-4}
SIZE_MIB=1024
TOOLS="nbdkit nbdcopy nbdinfo python3"
# shellcheck source=bench/nbd-lib.sh
source "$(dirname "$0")/nbd-lib.sh"

img=$work/disk.img
src=$work/src.img
results=$work/results.tsv
: >"$results"
head -c 1G /dev/urandom >"$src"
cp "$src" "$img"
tick=$(getconf CLK_TCK)

proc_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
machine_ticks() { awk '/^cpu /{print $2 + $3 + $4 + $7 + $8}' /proc/stat; }

# measure LABEL PID COMMAND...: runs COMMAND once and records MB/s, the PID's and the machine's CPU ms.
measure() {
    local label=$1 pid=$2 s0 s1 m0 m1 t0 t1
    shift 2
    s0=$([[ $pid == - ]] && echo 0 || proc_ticks "$pid")
    m0=$(machine_ticks)
    t0=$(date +%s.%N)
    "$@" >/dev/null
    t1=$(date +%s.%N)
    s1=$([[ $pid == - ]] && echo 0 || proc_ticks "$pid")
    m1=$(machine_ticks)
    printf '%s\t%s\t%s\t%s\n' "$label" \
        "$(python3 -c "print(round(1073.741824 / ($t1 - $t0)))")" \
        "$(((s1 - s0) * 1000 / tick))" "$(((m1 - m0) * 1000 / tick))" >>"$results"
}

for round in $(seq "$ROUNDS"); do
    echo "round $round" >&2
    cp "$src" "$img"
    measure "dd into tmpfs" - dd if="$src" of="$img" bs=1M conv=notrunc status=none
    for s in nbd-serve nbdkit nbdkit-null; do
        start_server "$s"
        measure "$s write" "$server_pid" nbdcopy -C "$CONNECTIONS" -T "$CONNECTIONS" "$src" "$uri"
        if [[ $s != nbdkit-null ]]; then
            measure "$s read" "$server_pid" nbdcopy -C "$CONNECTIONS" -T "$CONNECTIONS" "$uri" null:
        fi
        stop_server
    done
done

python3 - "$results" "$CONNECTIONS" "$ROUNDS" <<'EOF'
import statistics
import sys
from collections import defaultdict

rows = defaultdict(list)
order = []
for line in open(sys.argv[1]):
    label, mbs, server, machine = line.rstrip("\n").split("\t")
    if label not in rows:
        order.append(label)
    rows[label].append((int(mbs), int(server), int(machine)))
print(f"nbdcopy, {sys.argv[2]} connections, 1 GiB; CPU ms per GiB (median of {sys.argv[3]} runs)")
print(f"{'':24}{'MB/s':>8}{'server':>9}{'machine':>9}")
for label in order:
    mbs, server, machine = (statistics.median(col) for col in zip(*rows[label]))
    server_text = "-" if label.startswith("dd") else f"{server:.0f}"
    print(f"{label:24}{mbs:8.0f}{server_text:>9}{machine:9.0f}")
EOF
