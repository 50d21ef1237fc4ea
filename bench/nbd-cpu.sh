#!/usr/bin/env bash
# Where the CPU goes when nbdcopy moves 1 GiB over 4 loopback connections: CPU time per GiB of the server
# (utime + stime from /proc/PID/stat) and of the whole machine (/proc/stat), for nbd-serve, nbdkit's file
# plugin, `nbdkit null` (writes only: it stores nothing) and the lean server (writes only:
# crates/nbd/examples/lean_server.rs, the leanest server that stores as nbd-serve does), serving one file of
# random data in /dev/shm.
# `dd` of the same GiB from the source into the served file makes two copies (source to a buffer, buffer to
# the file). Prints the median of ROUNDS runs per figure, then the CPU time of the one copy a storing server
# adds (a GiB copied from a cached buffer into the file's mapping) and what 0.9 of `nbdkit null`'s write
# throughput would leave a server, if the client cost as much as it does against `null`.
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
    for s in nbd-serve nbdkit nbdkit-null lean; do
        start_server "$s"
        measure "$s write" "$server_pid" nbdcopy -C "$CONNECTIONS" -T "$CONNECTIONS" "$src" "$uri"
        if reads "$s"; then
            measure "$s read" "$server_pid" nbdcopy -C "$CONNECTIONS" -T "$CONNECTIONS" "$uri" null:
        fi
        stop_server
    done
done

# What storing adds to receiving: CPU time of one copy of the GiB from a cached 256 KiB buffer into the
# served file through a shared mapping whose pages are already mapped (one untimed pass maps them): the
# copy nbd-serve makes where `null` copies into its own small buffer. Median of ROUNDS passes.
copy_ms=$(python3 - "$img" "$ROUNDS" <<'PY'
import mmap, os, statistics, sys, time
path, rounds = sys.argv[1], int(sys.argv[2])
size, chunk = os.path.getsize(path), 256 * 1024
buf = os.urandom(chunk)
m = mmap.mmap(os.open(path, os.O_RDWR), size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
times = []
for rep in range(rounds + 1):
    t0 = time.process_time()
    for off in range(0, size, chunk):
        m[off:off + chunk] = buf
    times.append(time.process_time() - t0)
print(round(statistics.median(times[1:]) * 1000 * (1 << 30) / size))
PY
)

python3 - "$results" "$CONNECTIONS" "$ROUNDS" "$copy_ms" <<'EOF'
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
print(f"{'':24}{'MB/s':>8}{'server':>9}{'machine':>9}{'rest':>7}")
med = {}
for label in order:
    mbs, server, machine = (statistics.median(col) for col in zip(*rows[label]))
    med[label] = (mbs, server, machine)
    if label.startswith("dd"):
        print(f"{label:24}{mbs:8.0f}{'-':>9}{machine:9.0f}{'-':>7}")
    else:
        print(f"{label:24}{mbs:8.0f}{server:9.0f}{machine:9.0f}{machine - server:7.0f}")
print("(rest: the machine less the server, mostly nbdcopy and the kernel work charged to it)")
copy = int(sys.argv[4])
print(f"one copy of the GiB into the served file's mapping (cached source, pages mapped): {copy} ms")
if "nbdkit-null write" in med:
    _, server, machine = med["nbdkit-null write"]
    left = machine / 0.9 - (machine - server)
    print(f"0.9 of null's write throughput, with the rest as against null, leaves a server {left:.0f} ms per GiB; "
          f"null takes {server:.0f} to receive and drop the data")
EOF
