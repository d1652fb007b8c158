#!/bin/bash
# forkd's user and system CPU per active-active request, separately: forkd
# pinned to CPU 0 and not capped (it is the bottleneck), two sinks and wrk
# (64 connections, 4 KiB POST bodies) on CPU 1; 1 s of warm-up, then
# SECS (5) seconds measured from /proc/<pid>/stat. User time is steady
# between runs of one build (+-5 %); system time is not (+-25 % on a shared
# VM), which is why the e2e bench's ratios move. PERF=1 adds system calls per
# request (perf tracepoints); PERF_EVENTS=a,b replaces the first event (all
# system calls), e.g. PERF_EVENTS=raw_syscalls:sys_enter,net:net_dev_queue
# to count the packets forkd sends.
#
#   cargo build --release && cargo bench --bench e2e --no-run
#   benches/cpu_split.sh target/release/forkd [LABEL]
#
# Needs wrk, curl, taskset, python3 (and perf for PERF=1).
set -euo pipefail
source "$(dirname "$0")/active_active.sh"
aa_setup cpu-split "$1" "${2:-run}" -- taskset -c 1
taskset -c 0 "$BIN" run --config "$D/forkd.toml" 2> "$D/log" & V=$!; PIDS+=("$V")
aa_wait_ready
taskset -c 1 wrk -t1 -c64 -d1s -s "$D/post.lua" "http://127.0.0.1:$LISTEN/v1/logs" > /dev/null
read -r u0 s0 < <(awk '{print $14, $15}' /proc/$V/stat)
if [ -n "${PERF:-}" ]; then
  perf stat -x, -e ${PERF_EVENTS:-raw_syscalls:sys_enter},syscalls:sys_enter_writev,syscalls:sys_enter_recvfrom,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_write,context-switches,page-faults,syscalls:sys_enter_brk,syscalls:sys_enter_mmap,syscalls:sys_enter_munmap,syscalls:sys_enter_madvise -p $V -o "$D/perf.txt" -- sleep ${SECS:-5} &
  PP=$!
fi
taskset -c 1 wrk -t1 -c64 -d${SECS:-5}s -s "$D/post.lua" "http://127.0.0.1:$LISTEN/v1/logs" > "$D/wrk.txt"
[ -n "${PERF:-}" ] && wait $PP
read -r u1 s1 < <(awk '{print $14, $15}' /proc/$V/stat)
REQ=$(grep -oE '^ +[0-9]+ requests' "$D/wrk.txt" | awk '{print $1}')
python3 -c "
u=($u1-$u0)*10000/$REQ; s=($s1-$s0)*10000/$REQ
print('$LABEL: %d req, user %.1f us/req, sys %.1f us/req, total %.1f' % ($REQ, u, s, u+s))"
if [ -n "${PERF:-}" ]; then awk -F, -v r=$REQ '/^[0-9]/{printf "  %s %.2f/req\n", $3, $1/r}' "$D/perf.txt"; fi
