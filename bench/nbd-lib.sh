# Shared by the nbd benchmarks (sourced, not run): checks for the tools, builds nbd-serve, makes a work
# directory in /dev/shm that is removed on exit, and starts and stops the servers compared.
# The caller sets TOOLS (programs it needs) and, before start_server, $img and SIZE_MIB.

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target}

for tool in $TOOLS; do
    command -v "$tool" >/dev/null || {
        echo "missing $tool: apt-get install nbdkit qemu-utils libnbd-bin fio strace python3" >&2
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

# start_server NAME: starts it on a free port and sets $uri and $server_pid.
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
    nbdkit-null)
        port=$(free_port)
        nbdkit -f -i 127.0.0.1 -p "$port" null "$((SIZE_MIB << 20))" &
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

