#!/bin/bash
# User-space instructions per request, counted by callgrind: repeatable for
# the same binary and inputs whatever else the machine is doing, so it can
# compare two builds where the end-to-end bench's timings are too noisy.
#
#   cargo build --release && cargo bench --bench e2e --no-run
#   benches/callgrind.sh target/release/forkd [LABEL]
#
# Active-active, two sinks (the e2e bench binary as `--sink`), wrk with 16
# connections and 4 KiB POST bodies: 2 s of warm-up uninstrumented, then 6 s
# instrumented. Prints requests, instructions and instructions per request;
# the profile is left in target/tmp/callgrind-LABEL/cg.out for
# callgrind_annotate. Needs valgrind, wrk and curl (Debian packages).
# Kernel time is not counted: compare builds, not proxies.
set -euo pipefail
BIN=$(realpath "$1"); LABEL=${2:-run}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
D=$ROOT/target/tmp/callgrind-$LABEL; rm -rf "$D"; mkdir -p "$D"
E2E=
for f in "$ROOT"/target/release/deps/e2e-*; do
    [[ $f == *.d ]] && continue
    [[ -z $E2E || $f -nt $E2E ]] && E2E=$f
done
[ -x "$E2E" ] || { echo "build the e2e bench first: cargo bench --bench e2e --no-run" >&2; exit 1; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do pkill -P "$p" 2>/dev/null || true; kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
# A sink exits when its stdin closes: feed it from a sleep that outlives the run.
(sleep 120 | "$E2E" --sink 127.0.0.1:0 > "$D/s1.port") & PIDS+=($!)
(sleep 120 | "$E2E" --sink 127.0.0.1:0 > "$D/s2.port") & PIDS+=($!)
for _ in $(seq 100); do [ -s "$D/s1.port" ] && [ -s "$D/s2.port" ] && break; sleep 0.1; done
LISTEN=$(free_port); ADMIN=$(free_port)
cat > "$D/forkd.toml" <<TOML
[server]
listen = "127.0.0.1:$LISTEN"
[admin]
listen = "127.0.0.1:$ADMIN"
[routing]
mode = "active-active"
active = "primary"
[targets.primary]
url = "http://127.0.0.1:$(head -1 "$D/s1.port")"
[targets.backup]
url = "http://127.0.0.1:$(head -1 "$D/s2.port")"
[buffer]
dir = "$D/spool"
TOML
cat > "$D/post.lua" <<'LUA'
wrk.method = "POST"
wrk.body = string.rep("x", 4096)
wrk.headers["Content-Type"] = "application/json"
LUA
valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$D/cg.out" \
    "$BIN" run --config "$D/forkd.toml" 2> "$D/valgrind.log" &
V=$!; PIDS+=("$V")
for _ in $(seq 300); do curl -sf -o /dev/null "127.0.0.1:$ADMIN/readyz" && break; sleep 0.2; done
wrk -t1 -c16 -d2s -s "$D/post.lua" "http://127.0.0.1:$LISTEN/v1/logs" > /dev/null
callgrind_control -i on "$V" > /dev/null 2>&1
wrk -t1 -c16 -d6s -s "$D/post.lua" "http://127.0.0.1:$LISTEN/v1/logs" > "$D/wrk.txt"
callgrind_control -i off "$V" > /dev/null 2>&1
kill -TERM "$V"; wait "$V" || true
REQ=$(grep -oE '^ +[0-9]+ requests' "$D/wrk.txt" | awk '{print $1}')
IR=$(grep -oE 'Collected : [0-9]+' "$D/valgrind.log" | awk '{print $3}')
echo "$LABEL: $REQ requests, $IR instructions, $((IR / REQ)) per request"
grep -i 'non-2xx' "$D/wrk.txt" || true
