#!/usr/bin/env bash
# Installs the Debian package on THIS machine, runs it as its user, checks the
# unit, purges it and checks what is left: `make test-deb` (as root; no
# systemd needs to run). Usage: scripts/test-deb.sh target/debian/ganomalyd_*.deb
#
# It changes the machine: dpkg -i, a system user, then dpkg --purge. A
# ganomalyd already installed is purged first. GANOMALY_KEEP_DEB=1 leaves the
# package installed when a check fails, to look at it.
set -euo pipefail

deb=${1:?usage: $0 PACKAGE.deb}
deb=$(realpath "$deb")
pkg=$(dpkg-deb -f "$deb" Package)
conf=/etc/ganomalyd/ganomalyd.toml
unit=/usr/lib/systemd/system/ganomalyd.service
run_s=${GANOMALY_TEST_RUN_S:-16}
work=$(mktemp -d /tmp/test-deb.XXXXXX)
# The installed daemon must find ONNX Runtime on its own, and not through
# this checkout: run everything from / with no ORT_DYLIB_PATH.
unset ORT_DYLIB_PATH
cd /

fail() { echo "test-deb: FAIL: $*" >&2; exit 1; }
step() { echo "== $*"; }
[ "$(id -u)" = 0 ] || fail "run as root (dpkg -i, runuser)"

installed() { dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null | grep -qx installed; }
cleanup() {
	local rc=$?
	if [ -n "${daemon:-}" ]; then kill "$daemon" 2>/dev/null || true; wait "$daemon" 2>/dev/null || true; fi
	if [ $rc != 0 ] && [ -z "${GANOMALY_KEEP_DEB:-}" ] && installed "$pkg"; then
		dpkg --purge "$pkg" >/dev/null || true
	fi
	rm -rf "$work"
	exit $rc
}
trap cleanup EXIT

for p in ganomalyd ganomalyd-gpu; do
	if dpkg-query -W "$p" >/dev/null 2>&1; then
		step "purging the $p already installed"
		dpkg --purge "$p" >/dev/null
	fi
done

# Everything dpkg and the maintainer scripts could leave behind, before.
snapshot() {
	find /etc /usr /var /opt /srv -xdev \
		-path /var/log -prune -o -path /var/cache/apt -prune -o -path /var/lib/apt -prune -o \
		-path /var/lib/dpkg -prune -o -path /var/cache/man -prune -o -path /var/tmp -prune -o -print 2>/dev/null | sort
}
snapshot > "$work/before"
cp /etc/passwd "$work/passwd.before"
cp /etc/group "$work/group.before"

step "lintian $(basename "$deb")"
# (Only tag lines: lintian also says it does not like running as root.)
lintian_out=$(lintian --tag-display-limit 0 "$deb" 2>&1 | grep -E '^[EWIPXO]: ' || true)
if [ -z "$lintian_out" ]; then lintian_summary="clean"; else
	lintian_summary="$(echo "$lintian_out" | wc -l) tag(s): $(echo "$lintian_out" | awk '{print $1 $3}' | sort | uniq -c | xargs)"
	echo "$lintian_out"
fi
echo "$lintian_out" | grep -q '^E: ' && fail "lintian errors"

step "dpkg -i"
dpkg -i "$deb"
installed "$pkg" || fail "$pkg not installed"
size_kb=$(( $(stat -c %s "$deb") / 1024 ))
files=$(dpkg-deb -c "$deb" | grep -vc '/$')
installed_kb=$(dpkg-query -W -f='${Installed-Size}' "$pkg")

step "what the package set up"
[ -x /usr/bin/ganomalyd ] || fail "/usr/bin/ganomalyd missing"
ls /usr/lib/ganomalyd/libonnxruntime.so.* >/dev/null || fail "no ONNX Runtime in /usr/lib/ganomalyd"
[ -f /usr/share/ganomalyd/models/demo.onnx ] || fail "demo model missing"
for d in README.md mqtt.md examples/ganomalyd.toml copyright onnxruntime/ThirdPartyNotices.txt; do
	[ -f "/usr/share/doc/$pkg/$d" ] || [ -f "/usr/share/doc/ganomalyd/$d" ] || fail "doc $d missing"
done
dpkg-query -W -f='${Conffiles}\n' "$pkg" | grep -q " $conf " || fail "$conf is not a conffile"
id ganomalyd || fail "user ganomalyd not created"
id -nG ganomalyd | tr ' ' '\n' | grep -qx video || fail "ganomalyd is not in group video"
for d in /var/lib/ganomalyd /var/cache/ganomalyd; do
	[ "$(stat -c %U "$d")" = ganomalyd ] || fail "$d is not owned by ganomalyd"
done
# Nothing enabled or started.
[ -z "$(find /etc/systemd/system -name 'ganomalyd*' 2>/dev/null)" ] || fail "the unit was enabled"

step "check-config (as root and as ganomalyd, like ExecStartPre)"
ganomalyd check-config "$conf"
runuser -u ganomalyd -- ganomalyd check-config "$conf"

step "the daemon as ganomalyd for ${run_s} s, and ganomalyd watch on its embedded broker"
runuser -u ganomalyd -- timeout --preserve-status -s TERM "$run_s" \
	ganomalyd run --config "$conf" > "$work/daemon.log" 2>&1 &
daemon=$!
# The broker is up within a second; watch until just before the daemon stops.
sleep 1
runuser -u ganomalyd -- timeout "$((run_s - 2))" ganomalyd watch --config "$conf" --json --no-scores > "$work/watch.jsonl" 2> "$work/watch.err" || true
# The daemon's own process (runuser -> timeout -> ganomalyd), by its exact command line.
rss_kb=$(awk '/^VmHWM/ {print $2}' "/proc/$(pgrep -u ganomalyd -xf "ganomalyd run --config $conf" | head -1)/status" 2>/dev/null || echo "?")
daemon_rc=0
wait "$daemon" || daemon_rc=$?
daemon=
sed 's/^/  daemon| /' "$work/daemon.log" | cut -c1-240
[ "$daemon_rc" = 0 ] || fail "the daemon exited with $daemon_rc after SIGTERM"
grep -q 'ONNX Runtime loaded library=/usr/lib/ganomalyd/libonnxruntime.so' "$work/daemon.log" \
	|| fail "ONNX Runtime was not loaded from /usr/lib/ganomalyd"
grep -q 'ganomalyd running' "$work/daemon.log" || fail "the daemon did not start its pipeline"
grep -q '"kind":"stats"' "$work/watch.jsonl" || { cat "$work/watch.err"; fail "no stats message on MQTT"; }
ort_log=$(grep -m1 'ONNX Runtime loaded' "$work/daemon.log" | cut -c1-200)
first_log=$(grep -m1 'ganomalyd running' "$work/daemon.log" | cut -c1-200)
first_stats=$(grep -m1 '"kind":"stats"' "$work/watch.jsonl" | cut -c1-600)
snapshots=$(find /var/lib/ganomalyd/snapshots -type f -user ganomalyd | wc -l)
[ -f /var/lib/ganomalyd/outbox.sqlite ] || fail "no outbox in /var/lib/ganomalyd"

step "systemd-analyze verify and security on the installed unit"
systemd-analyze verify "$unit" 2>&1 | tee "$work/verify"
[ ! -s "$work/verify" ] || fail "systemd-analyze verify reported something"
security=$(systemd-analyze security --offline=true "$unit" 2>&1 | tail -1)
echo "$security"
exposure=$(echo "$security" | sed -n 's/.*: \([0-9.]*\) \([A-Z]*\).*/\1 \2/p')
awk -v e="${exposure% *}" 'BEGIN { exit !(e != "" && e <= 2.0) }' || fail "exposure $exposure > 2.0"
[ "${exposure#* }" = OK ] || fail "exposure is $exposure, not OK"

step "dpkg --purge"
dpkg --purge "$pkg"
status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
[ -z "$status" ] || [ "$status" = not-installed ] || fail "$pkg is still '$status' after purge"
snapshot > "$work/after"
left=$(comm -13 "$work/before" "$work/after" || true)
# Debian keeps system users on purge; systemd-sysusers/useradd keep a
# backup of the files they edit. Anything else is a leftover.
unexpected=$(echo "$left" | grep -v -x -e '' -e '/etc/passwd-' -e '/etc/group-' -e '/etc/shadow-' -e '/etc/gshadow-' || true)
[ -z "$unexpected" ] || { echo "$unexpected"; fail "left after purge (above)"; }
getent passwd ganomalyd >/dev/null || fail "the ganomalyd user is gone: Debian keeps system users on purge"
kept="user $(id ganomalyd | cut -d' ' -f1-3)"
new_users=$( (diff "$work/passwd.before" /etc/passwd || true) | sed -n 's/^> \([^:]*\):.*/\1/p' | xargs)

cat <<EOF

== test-deb summary ($pkg $(dpkg-deb -f "$deb" Version))
package:        $(basename "$deb"), ${size_kb} KiB, ${files} files, ${installed_kb} KiB installed
lintian:        ${lintian_summary}
exposure:       ${exposure} (systemd-analyze security --offline=true)
verify:         systemd-analyze verify: clean
daemon:         ran ${run_s} s as ganomalyd, exit ${daemon_rc} after SIGTERM, peak RSS ${rss_kb} kB, ${snapshots} snapshot(s)
log:            ${ort_log}
                ${first_log}
first stats:    ${first_stats}
after purge:    no file of the package left. Kept, as Debian policy has it: ${kept}
                (created by this run: ${new_users:-none, it was there from an earlier run})$( [ -n "$left" ] && echo "; and $(echo "$left" | xargs), the backups the user tools keep")
EOF
