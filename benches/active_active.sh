# Sourced by benches/callgrind.sh and benches/cpu_split.sh: forkd in
# active-active between two sinks (the e2e bench binary as `--sink`), with a
# wrk script posting 4 KiB bodies.
#
#   aa_setup NAME BIN [LABEL] [-- PREFIX...]
#
# sets BIN, LABEL, D (target/tmp/NAME-LABEL, fresh), LISTEN and ADMIN, starts
# the sinks (under PREFIX, e.g. `taskset -c 1`), writes $D/forkd.toml and
# $D/post.lua, and kills what it started on exit (PIDS).
#   aa_wait_ready: waits until forkd's /readyz answers.

aa_setup() {
    local name=$1 prefix=()
    BIN=$(realpath "$2"); LABEL=${3:-run}
    shift $(( $# < 3 ? $# : 3 ))
    [ "${1:-}" = "--" ] && { shift; prefix=("$@"); }
    local root e2e= f
    root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    D=$root/target/tmp/$name-$LABEL; rm -rf "$D"; mkdir -p "$D"
    for f in "$root"/target/release/deps/e2e-*; do
        [[ $f == *.d ]] && continue
        [[ -z $e2e || $f -nt $e2e ]] && e2e=$f
    done
    [ -x "$e2e" ] || { echo "build the e2e bench first: cargo bench --bench e2e --no-run" >&2; exit 1; }
    PIDS=()
    trap aa_cleanup EXIT
    # A sink exits when its stdin closes: feed it from a sleep that outlives the run.
    (sleep 120 | "${prefix[@]}" "$e2e" --sink 127.0.0.1:0 > "$D/s1.port") & PIDS+=($!)
    (sleep 120 | "${prefix[@]}" "$e2e" --sink 127.0.0.1:0 > "$D/s2.port") & PIDS+=($!)
    for _ in $(seq 100); do [ -s "$D/s1.port" ] && [ -s "$D/s2.port" ] && break; sleep 0.1; done
    LISTEN=$(aa_free_port); ADMIN=$(aa_free_port)
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
}

aa_free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

aa_cleanup() {
    local p
    for p in "${PIDS[@]}"; do pkill -P "$p" 2>/dev/null || true; kill "$p" 2>/dev/null || true; done
}

aa_wait_ready() {
    for _ in $(seq 300); do curl -sf -o /dev/null "127.0.0.1:$ADMIN/readyz" && return; sleep 0.2; done
}
