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
source "$(dirname "$0")/active_active.sh"
aa_setup callgrind "$1" "${2:-run}"
valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$D/cg.out" \
    "$BIN" run --config "$D/forkd.toml" 2> "$D/valgrind.log" &
V=$!; PIDS+=("$V")
aa_wait_ready
wrk -t1 -c16 -d2s -s "$D/post.lua" "http://127.0.0.1:$LISTEN/v1/logs" > /dev/null
callgrind_control -i on "$V" > /dev/null 2>&1
wrk -t1 -c16 -d6s -s "$D/post.lua" "http://127.0.0.1:$LISTEN/v1/logs" > "$D/wrk.txt"
callgrind_control -i off "$V" > /dev/null 2>&1
kill -TERM "$V"; wait "$V" || true
REQ=$(grep -oE '^ +[0-9]+ requests' "$D/wrk.txt" | awk '{print $1}')
IR=$(grep -oE 'Collected : [0-9]+' "$D/valgrind.log" | awk '{print $3}')
echo "$LABEL: $REQ requests, $IR instructions, $((IR / REQ)) per request"
grep -i 'non-2xx' "$D/wrk.txt" || true
