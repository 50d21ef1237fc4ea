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

cargo build --quiet --release -p nbd --bin nbd-serve --example lean_server --manifest-path "$root/Cargo.toml"
ours_bin=$CARGO_TARGET_DIR/release/nbd-serve
lean_bin=$CARGO_TARGET_DIR/release/examples/lean_server

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

# start_printing COMMAND...: starts a server that prints `listening on ADDR` (nbd-serve, the lean server)
# and sets $uri and $server_pid.
start_printing() {
    local out
    out=$(mktemp "$work/server.XXXXXX")
    "$@" >"$out" &
    server_pid=$!
    local deadline=$((SECONDS + 10))
    until grep -q '^listening on ' "$out"; do
        ((SECONDS < deadline)) || {
            echo "$1 did not print its address" >&2
            exit 1
        }
        sleep 0.02
    done
    uri="nbd://$(head -1 "$out" | awk '{print $3}')/disk"
}

# reads NAME: whether the workloads that read run against server NAME. `nbdkit null` and the lean server are
# yardsticks for writes only.
reads() { [[ $1 != nbdkit-null && $1 != lean ]]; }

# start_server NAME: starts it on a free port and sets $uri and $server_pid. NAME is nbd-serve, nbdkit,
# nbdkit-null, qemu-nbd or lean (crates/nbd/examples/lean_server.rs: the leanest server that stores
# WRITE payloads the way nbd-serve does).
start_server() {
    local port
    case $1 in
    nbd-serve)
        start_printing "$ours_bin" --listen 127.0.0.1:0 "disk=$img"
        ;;
    lean)
        start_printing "$lean_bin" "$img" --listen 127.0.0.1:0
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

