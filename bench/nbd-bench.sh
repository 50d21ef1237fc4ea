#!/usr/bin/env bash
# Throughput of nbd-serve against nbdkit (file plugin) and qemu-nbd, all serving the same 1 GiB file in
# /dev/shm, interleaved over several rounds. Prints the median per server and our ratio to each peer.
#
# Needs: nbdkit, qemu-utils (qemu-nbd), libnbd-bin (nbdcopy, nbdinfo), fio (with the nbd engine), python3.
# Environment: ROUNDS (default 3), FIO_SECONDS (default 8), SIZE_MIB (default 1024), CARGO_TARGET_DIR.
set -euo pipefail

ROUNDS=${ROUNDS:-3}
FIO_SECONDS=${FIO_SECONDS:-8}
SIZE_MIB=${SIZE_MIB:-1024}
root=$(cd "$(dirname "$0")/.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target}

for tool in nbdkit qemu-nbd nbdcopy nbdinfo fio python3; do
    command -v "$tool" >/dev/null || {
        echo "missing $tool: apt-get install nbdkit qemu-utils libnbd-bin fio python3" >&2
        exit 1
    }
done

cargo build --quiet --release -p nbd --bin nbd-serve --manifest-path "$root/Cargo.toml"
ours_bin=$CARGO_TARGET_DIR/release/nbd-serve

work=$(mktemp -d /dev/shm/nbd-bench.XXXXXX)
server_pid=""
stop_server() {
    if [[ -n $server_pid ]]; then
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
        server_pid=""
    fi
}
cleanup() {
    stop_server
    rm -rf "$work"
}
trap cleanup EXIT

img=$work/disk.img
src=$work/src.img
results=$work/results.tsv
: >"$results"
echo "preparing ${SIZE_MIB} MiB image and source in $work" >&2
head -c "$((SIZE_MIB << 20))" /dev/urandom >"$src"
cp "$src" "$img"

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# wait_ready URI: poll until the server answers, for at most 10 s.
wait_ready() {
    local deadline=$((SECONDS + 10))
    until nbdinfo --size "$1" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || {
            echo "server at $1 did not come up" >&2
            exit 1
        }
        sleep 0.05
    done
}

# start_server NAME: starts it on a free port and sets $uri.
start_server() {
    local port
    case $1 in
    nbd-serve)
        local out
        out=$(mktemp "$work/ours.XXXXXX")
        "$ours_bin" --listen 127.0.0.1:0 "disk=$img" >"$out" &
        server_pid=$!
        local deadline=$((SECONDS + 10))
        until grep -q '^listening on ' "$out"; do
            ((SECONDS < deadline)) || {
                echo "nbd-serve did not print its address" >&2
                exit 1
            }
            sleep 0.02
        done
        uri="nbd://$(head -1 "$out" | awk '{print $3}')/disk"
        ;;
    nbdkit)
        port=$(free_port)
        nbdkit -f -i 127.0.0.1 -p "$port" file "file=$img" &
        server_pid=$!
        uri="nbd://127.0.0.1:$port/disk"
        ;;
    qemu-nbd)
        port=$(free_port)
        qemu-nbd -f raw -x disk -b 127.0.0.1 -p "$port" --persistent --shared=16 --aio=threads "$img" &
        server_pid=$!
        uri="nbd://127.0.0.1:$port/disk"
        ;;
    esac
    wait_ready "$uri"
}

now() { date +%s.%N; }
mbps() { python3 -c "import sys; print(f'{$SIZE_MIB * 1.048576 / ($2 - $1):.0f}')" ; }

fio_run() { # fio_run RW BS IODEPTH -> prints IOPS or MB/s
    local rw=$1 bs=$2 qd=$3 dir
    [[ $rw == *read* ]] && dir=read || dir=write
    fio --name=bench --ioengine=nbd --uri="$uri" --rw="$rw" --bs="$bs" --iodepth="$qd" \
        --time_based --runtime="$FIO_SECONDS" --ramp_time=1 --output-format=json >"$work/fio.json" 2>"$work/fio.err" || {
        cat "$work/fio.err" >&2
        exit 1
    }
    python3 - "$work/fio.json" "$dir" "$bs" <<'PY'
import json, sys
text = open(sys.argv[1]).read()
j = json.loads(text[text.index("{"):])["jobs"][0][sys.argv[2]]
print(f"{j['bw_bytes'] / 1e6:.0f}" if sys.argv[3] == "1M" else f"{j['iops']:.0f}")
PY
}

record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$results"; }

servers=(nbd-serve nbdkit qemu-nbd)
for round in $(seq 1 "$ROUNDS"); do
    for s in "${servers[@]}"; do
        echo "round $round: $s" >&2
        start_server "$s"
        t0=$(now)
        nbdcopy --flush "$src" "$uri"
        t1=$(now)
        record "$s" "nbdcopy write (MB/s)" "$round" "$(mbps "$t0" "$t1")"
        t0=$(now)
        nbdcopy "$uri" null:
        t1=$(now)
        record "$s" "nbdcopy read (MB/s)" "$round" "$(mbps "$t0" "$t1")"
        record "$s" "fio 4k randwrite qd32 (IOPS)" "$round" "$(fio_run randwrite 4k 32)"
        record "$s" "fio 4k randread qd32 (IOPS)" "$round" "$(fio_run randread 4k 32)"
        record "$s" "fio 1M seq write qd8 (MB/s)" "$round" "$(fio_run write 1M 8)"
        stop_server
    done
done

python3 - "$results" <<'PY'
import statistics, sys
from collections import defaultdict
vals = defaultdict(list)
order = []
for line in open(sys.argv[1]):
    server, workload, _round, value = line.rstrip("\n").split("\t")
    if workload not in order:
        order.append(workload)
    vals[(workload, server)].append(float(value))
med = {k: statistics.median(v) for k, v in vals.items()}
hdr = f"{'workload':32} {'nbd-serve':>10} {'nbdkit':>10} {'qemu-nbd':>10} {'/nbdkit':>8} {'/qemu':>8}"
print(hdr)
print("-" * len(hdr))
for w in order:
    o, k, q = (med[(w, s)] for s in ("nbd-serve", "nbdkit", "qemu-nbd"))
    print(f"{w:32} {o:10.0f} {k:10.0f} {q:10.0f} {o / k:8.2f} {o / q:8.2f}")
print(f"(median of {len(vals[(order[0], 'nbd-serve')])} interleaved rounds)")
PY
