#!/usr/bin/env bash
# Builds the volume-daemon Debian package with cargo-deb, installs it with dpkg, checks the installed files and
# binaries (volume-daemon check must fail clearly without a cloud; volumectl --help), then removes and purges it.
# Needs root (dpkg). Refuses to touch a volume-daemon package that was installed before it ran.
set -euo pipefail

cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
PKG=volume-daemon
CONF=/etc/volume-daemon/volume-daemon.toml

fail() {
    echo "deb-test: FAIL: $*" >&2
    exit 1
}
step() { echo "deb-test: $*"; }

[ "$(id -u)" = 0 ] || fail "must run as root (dpkg -i / dpkg --purge)"
command -v dpkg >/dev/null || fail "dpkg is not installed: this test needs a Debian-based machine"
if dpkg-query -W -f '${Status}' "$PKG" 2>/dev/null | grep -q 'installed'; then
    fail "package $PKG is already installed on this machine; remove it first (this test installs and purges it)"
fi

if ! command -v cargo-deb >/dev/null; then
    step "installing cargo-deb"
    cargo install cargo-deb --locked
fi

step "building release binaries"
cargo build --release --locked -p volume-daemon -p volumectl
out_dir="$CARGO_TARGET_DIR/debian"
mkdir -p "$out_dir"
step "building the package"
deb=$(cargo deb -p volume-daemon --no-build --output "$out_dir" | tail -n 1)
[ -f "$deb" ] || fail "cargo deb did not produce a package (got: $deb)"
step "package: $deb"
dpkg-deb --info "$deb"
dpkg-deb --contents "$deb"

tmp=$(mktemp -d)
installed=0
cleanup() {
    if [ "$installed" = 1 ]; then
        dpkg --purge "$PKG" >/dev/null 2>&1 || true
    fi
    rm -rf "$tmp"
}
trap cleanup EXIT

step "dpkg -i"
dpkg -i "$deb"
installed=1

step "installed files"
for f in /usr/bin/volume-daemon /usr/bin/volumectl; do
    [ -x "$f" ] || fail "$f is not installed or not executable"
done
unit=""
for u in /usr/lib/systemd/system/volume-daemon.service /lib/systemd/system/volume-daemon.service; do
    [ -f "$u" ] && unit="$u"
done
[ -n "$unit" ] || fail "the systemd unit volume-daemon.service is not installed"
grep -q '^Type=notify$' "$unit" || fail "$unit is not Type=notify"
grep -q '^ExecStartPre=/usr/bin/volume-daemon check' "$unit" || fail "$unit does not run the check first"
[ -f "$CONF" ] || fail "$CONF is not installed"
[ "$(stat -c %a "$CONF")" = 640 ] || fail "$CONF must be mode 0640 (it holds secrets), is $(stat -c %a "$CONF")"
dpkg-query -W -f '${Conffiles}\n' "$PKG" | grep -q "$CONF" || fail "$CONF is not a conffile"
[ -d /var/lib/volume-daemon ] || fail "the state directory /var/lib/volume-daemon was not created"
[ -f /usr/share/doc/volume-daemon/operations.md ] || fail "the operations guide is not installed"
if command -v systemd-analyze >/dev/null; then
    step "systemd-analyze verify"
    systemd-analyze verify "$unit" || fail "systemd-analyze verify rejects $unit"
fi

step "volume-daemon --help / check --help"
/usr/bin/volume-daemon --help >/dev/null || fail "volume-daemon --help failed"
/usr/bin/volume-daemon check --help | grep -q -- '--config' || fail "volume-daemon check --help does not offer --config"

step "volume-daemon check without a cloud must fail with a clear report"
mkdir -p "$tmp/state" "$tmp/names" "$tmp/by-id"
cat >"$tmp/volume-daemon.toml" <<EOF
state_dir = "$tmp/state"
names_dir = "$tmp/names"
by_id_dir = "$tmp/by-id"
EOF
set +e
report=$(env -u VOLUME_DAEMON_CONFIG /usr/bin/volume-daemon check --config "$tmp/volume-daemon.toml" 2>&1)
rc=$?
set -e
echo "$report"
[ "$rc" != 0 ] || fail "volume-daemon check succeeded without any cloud configured"
echo "$report" | grep -q 'FAIL' || fail "the check report marks no failed line"
echo "$report" | grep -q 'cloudstack_url' || fail "the check report does not say that cloudstack_url is missing"
echo "$report" | grep -qi 'panicked' && fail "volume-daemon check panicked"

step "the installed example configuration parses (same failure, not a syntax error)"
set +e
report=$(env -u VOLUME_DAEMON_CONFIG VOLUME_DAEMON_STATE_DIR="$tmp/state2" VOLUME_DAEMON_NAMES_DIR="$tmp/names2" \
    /usr/bin/volume-daemon check --config "$CONF" 2>&1)
rc=$?
set -e
echo "$report"
[ "$rc" != 0 ] || fail "volume-daemon check succeeded with the unconfigured example"
echo "$report" | grep -q 'not valid TOML' && fail "the installed example configuration does not parse"
echo "$report" | grep -q 'cloudstack_url' || fail "the example's check report does not name cloudstack_url"

step "volumectl"
/usr/bin/volumectl --help | grep -q 'Exit codes:' || fail "volumectl --help does not document the exit codes"
/usr/bin/volumectl --version | grep -q '^volumectl ' || fail "volumectl --version failed"
/usr/bin/volumectl completions bash | grep -q volumectl || fail "volumectl completions bash printed nothing useful"
set +e
/usr/bin/volumectl --url http://127.0.0.1:1 health >/dev/null 2>&1
rc=$?
set -e
[ "$rc" = 5 ] || fail "volumectl against no daemon exited $rc, expected 5 (unreachable)"

step "dpkg -r keeps the configuration and state"
dpkg -r "$PKG"
[ ! -e /usr/bin/volume-daemon ] || fail "/usr/bin/volume-daemon left after dpkg -r"
[ ! -e /usr/bin/volumectl ] || fail "/usr/bin/volumectl left after dpkg -r"
[ -f "$CONF" ] || fail "dpkg -r removed the configuration (a conffile must stay until purge)"

step "dpkg --purge removes them"
dpkg --purge "$PKG"
installed=0
[ ! -e "$CONF" ] || fail "$CONF left after purge"
[ ! -e /var/lib/volume-daemon ] || fail "/var/lib/volume-daemon left after purge"

step "OK"
