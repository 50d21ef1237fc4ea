#!/usr/bin/env bash
# Throughput of nbd-serve against nbdkit (file plugin) and qemu-nbd, all serving the same file in /dev/shm,
# interleaved over several rounds, with 1, 2 and 4 connections (nbdcopy) or 1 and 4 jobs (fio). Three
# yardsticks for writes:
# - `null` (`nbdkit null`, no I/O at all): the ceiling for writes over the network;
# - `store` (bench/store_ceiling.py: the same bytes copied into the file by local threads, no network):
#   the ceiling for storing them;
# - `lean` (crates/nbd/examples/lean_server.rs: a thread per connection receiving each payload straight
#   into the file's mapping, nothing else): what the leanest server storing the way nbd-serve does reaches
#   over the network with large writes.
# Prints, per workload, the median value per server and the median of the per-round ratios of nbd-serve to
# each; where nbd-serve is below 0.9 of `null`, whether that is beyond what storing allows; then, for
# nbd-serve, nbdkit and `null`, context switches and futex calls per request and how evenly 4 jobs were
# served. Before the rounds, nbd-serve and the lean server each receive the source into an empty image,
# which must then equal it.
#
# Needs: nbdkit, qemu-utils (qemu-nbd), libnbd-bin (nbdcopy, nbdinfo), fio (with the nbd engine), strace,
# python3. Environment: ROUNDS (default 3), FIO_SECONDS (default 6), SIZE_MIB (default 1024),
# CARGO_TARGET_DIR, STRACE=0 to skip the futex count.
set -euo pipefail

ROUNDS=${ROUNDS:-3}
FIO_SECONDS=${FIO_SECONDS:-6}
SIZE_MIB=${SIZE_MIB:-1024}
STRACE=${STRACE:-1}
TOOLS="nbdkit qemu-nbd nbdcopy nbdinfo fio python3 strace"
# shellcheck source=bench/nbd-lib.sh
source "$(dirname "$0")/nbd-lib.sh"

img=$work/disk.img
src=$work/src.img
results=$work/results.tsv
costs=$work/costs.tsv
: >"$results"
: >"$costs"
echo "preparing ${SIZE_MIB} MiB image and source in $work" >&2
head -c "$((SIZE_MIB << 20))" /dev/urandom >"$src"
cp "$src" "$img"

now() { date +%s.%N; }
mbps() { python3 -c "print(f'{$SIZE_MIB * 1.048576 / ($2 - $1):.0f}')"; }

# Context switches of every live thread of $server_pid.
ctx_switches() {
    cat /proc/"$server_pid"/task/*/status 2>/dev/null |
        awk '/^(non)?voluntary_ctxt_switches/ {s += $2} END {print s + 0}'
}

# fio_run RW BS IODEPTH JOBS -> prints IOPS (4k) or MB/s (1M) of all jobs together, context switches of the
# server per request (sampled while every connection, and nbdkit's threads, is alive), and the slowest job's
# share of the mean job (1.00: every connection served alike).
fio_run() {
    local rw=$1 bs=$2 qd=$3 jobs=$4 dir c0 c1
    [[ $rw == *read* ]] && dir=read || dir=write
    fio --name=bench --ioengine=nbd --uri="$uri" --rw="$rw" --bs="$bs" --iodepth="$qd" --numjobs="$jobs" \
        --time_based --runtime="$FIO_SECONDS" --ramp_time=1 \
        --output-format=json >"$work/fio.json" 2>"$work/fio.err" &
    local fio_pid=$!
    sleep 1.5
    c0=$(ctx_switches)
    local t0
    t0=$(now)
    sleep "$((FIO_SECONDS - 1))"
    c1=$(ctx_switches)
    local t1
    t1=$(now)
    wait "$fio_pid" || {
        cat "$work/fio.err" >&2
        exit 1
    }
    python3 - "$work/fio.json" "$dir" "$bs" "$c0" "$c1" "$t0" "$t1" <<'PY'
import json, sys
text = open(sys.argv[1]).read()
jobs = [j[sys.argv[2]] for j in json.loads(text[text.index("{"):])["jobs"]]
iops, bw = sum(j["iops"] for j in jobs), sum(j["bw_bytes"] for j in jobs)
c0, c1, t0, t1 = map(float, sys.argv[4:8])
per_req = (c1 - c0) / max(1.0, iops * (t1 - t0))
fair = min(j["iops"] for j in jobs) / max(1.0, iops / len(jobs))
print(f"{bw / 1e6:.0f}" if sys.argv[3] == "1M" else f"{iops:.0f}", f"{per_req:.3f}", f"{fair:.3f}")
PY
}

record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$results"; }

workload_fio() { # SERVER ROUND LABEL RW BS QD JOBS
    local out value ctx fair
    out=$(fio_run "$4" "$5" "$6" "$7")
    read -r value ctx fair <<<"$out"
    record "$1" "$3" "$2" "$value"
    [[ $5 == 4k ]] && printf '%s\tctx\t%s\t%s\n' "$1" "$3" "$ctx" >>"$costs"
    (($7 > 1)) && printf '%s\tfair\t%s\t%s\n' "$1" "$3" "$fair" >>"$costs"
    return 0
}

# The servers built here must store what they are sent, or their figures mean nothing: each receives the
# source once into an empty image.
for s in nbd-serve lean; do
    truncate -s 0 "$img"
    truncate -s "$((SIZE_MIB << 20))" "$img"
    start_server "$s"
    nbdcopy --flush -C 4 -T 4 "$src" "$uri"
    stop_server
    cmp -s "$src" "$img" || {
        echo "$s did not store what nbdcopy sent" >&2
        exit 1
    }
done

servers=(nbd-serve nbdkit qemu-nbd nbdkit-null lean)
for round in $(seq 1 "$ROUNDS"); do
    for s in "${servers[@]}"; do
        echo "round $round: $s (load average $(cut -d' ' -f1-3 /proc/loadavg))" >&2
        start_server "$s"
        # nbdcopy opens at most one connection per thread, and runs one thread per CPU by default: -T makes
        # the number of connections the one asked for on any machine.
        for c in 1 2 4; do
            t0=$(now)
            nbdcopy --flush -C "$c" -T "$c" "$src" "$uri"
            t1=$(now)
            record "$s" "nbdcopy write $c conn (MB/s)" "$round" "$(mbps "$t0" "$t1")"
            if reads "$s"; then
                t0=$(now)
                nbdcopy -C "$c" -T "$c" "$uri" null:
                t1=$(now)
                record "$s" "nbdcopy read $c conn (MB/s)" "$round" "$(mbps "$t0" "$t1")"
            fi
        done
        for j in 1 4; do
            workload_fio "$s" "$round" "fio 4k randwrite qd32 ${j}j (IOPS)" randwrite 4k 32 "$j"
            reads "$s" &&
                workload_fio "$s" "$round" "fio 4k randread qd32 ${j}j (IOPS)" randread 4k 32 "$j"
            workload_fio "$s" "$round" "fio 1M seq write qd8 ${j}j (MB/s)" write 1M 8 "$j"
        done
        stop_server
    done
    # The no-network ceiling of the write workloads: the same bytes copied into the file by local threads.
    echo "round $round: store ceiling" >&2
    for c in 1 2 4; do
        record store "nbdcopy write $c conn (MB/s)" "$round" "$(python3 "$root/bench/store_ceiling.py" "$img" "$c" source "$src")"
    done
    for j in 1 4; do
        record store "fio 1M seq write qd8 ${j}j (MB/s)" "$round" "$(python3 "$root/bench/store_ceiling.py" "$img" "$j" buffer)"
    done
done

# futex calls per request: 100k 4k random writes and reads (4 jobs) under `strace -c -f`, one run each.
if [[ $STRACE == 1 ]]; then
    for s in nbd-serve nbdkit; do
        start_server "$s"
        for rw in randwrite randread; do
            strace -c -f -e trace=futex -p "$server_pid" -o "$work/strace.txt" &
            strace_pid=$!
            sleep 0.5
            fio --name=futex --ioengine=nbd --uri="$uri" --rw="$rw" --bs=4k --iodepth=32 --numjobs=4 \
                --io_size=100M --group_reporting --output-format=json >"$work/fio.json" 2>"$work/fio.err"
            kill -INT "$strace_pid"
            wait "$strace_pid" 2>/dev/null || true
            calls=$(awk '$NF == "futex" {print $4}' "$work/strace.txt" | head -1)
            python3 -c "print('$s\tfutex\tfio 4k $rw qd32 4j\t' + f'{int(\"${calls:-0}\") / (4 * 25600):.3f}')" >>"$costs"
        done
        stop_server
    done
fi

python3 - "$results" "$costs" "$(cut -d' ' -f1-3 /proc/loadavg)" <<'PY'
import statistics, sys
from collections import defaultdict
vals = defaultdict(dict)
order = []
for line in open(sys.argv[1]):
    server, workload, rnd, value = line.rstrip("\n").split("\t")
    if workload not in order:
        order.append(workload)
    vals[workload].setdefault(server, {})[rnd] = float(value)
def ratio(w, peer):
    ours, theirs = vals[w].get("nbd-serve", {}), vals[w].get(peer, {})
    r = [ours[k] / theirs[k] for k in ours if k in theirs and theirs[k] > 0]
    return statistics.median(r) if r else float("nan")
def med(w, s):
    v = vals[w].get(s)
    return statistics.median(v.values()) if v else float("nan")
hdr = (f"{'workload':34} {'nbd-serve':>9} {'nbdkit':>9} {'qemu-nbd':>9} {'null':>9} {'store':>9} "
       f"{'lean':>9} {'/nbdkit':>8} {'/qemu':>7} {'/null':>7} {'/store':>7} {'/lean':>7}")
print(hdr)
print("-" * len(hdr))
for w in order:
    print(f"{w:34} {med(w, 'nbd-serve'):9.0f} {med(w, 'nbdkit'):9.0f} {med(w, 'qemu-nbd'):9.0f} "
          f"{med(w, 'nbdkit-null'):9.0f} {med(w, 'store'):9.0f} {med(w, 'lean'):9.0f} {ratio(w, 'nbdkit'):8.2f} "
          f"{ratio(w, 'qemu-nbd'):7.2f} {ratio(w, 'nbdkit-null'):7.2f} {ratio(w, 'store'):7.2f} {ratio(w, 'lean'):7.2f}")
for w in order:
    null, store, lean = med(w, "nbdkit-null"), med(w, "store"), med(w, "lean")
    if not ratio(w, "nbdkit-null") < 0.9:
        continue
    if 0.9 * null > store:
        print(f"{w}: 0.9 of null ({0.9 * null:.0f}) is above the store ceiling ({store:.0f}): "
              "no server that stores the data can reach it on this machine")
    elif 0.9 * null > lean:
        print(f"{w}: 0.9 of null ({0.9 * null:.0f}) is above the lean server ({lean:.0f}): "
              "the leanest server storing the way nbd-serve does falls short of it")
rounds = len(next(iter(vals[order[0]].values())))
print(f"(value: median of {rounds} interleaved rounds; ratio: median of per-round ratios; "
      f"load average at the end {sys.argv[3]})")
costs = defaultdict(list)
for line in open(sys.argv[2]):
    server, what, workload, value = line.rstrip("\n").split("\t")
    costs[(what, workload, server)].append(float(value))
if costs:
    print()
    print(f"{'per request, and fairness':56} {'nbd-serve':>10} {'nbdkit':>10} {'null':>10}")
    for what, workload in sorted({(k[0], k[1]) for k in costs}):
        o = costs.get((what, workload, "nbd-serve"))
        k = costs.get((what, workload, "nbdkit"))
        n = costs.get((what, workload, "nbdkit-null"))
        f = lambda v: f"{statistics.median(v):10.3f}" if v else f"{'-':>10}"
        label = {"ctx": "context switches", "fair": "slowest job / mean job",
                 "futex": "futex calls"}[what]
        print(f"{label + ', ' + workload:56} {f(o)} {f(k)} {f(n)}")
PY
