#!/usr/bin/env python3
"""Structural checks of forkd's deployment files, run by deploy/check.sh.

The real tools (systemd-analyze, hadolint, kubernetes-validate, promtool)
check each file against its own format. These checks tie the files to each
other and to forkd: ports, paths, timeouts, secrets, metric names, runbook
anchors, the syscalls forkd makes against the unit's filter.

    deploy_checks.py unit FORKD_SERVICE SAMPLE_TOML
    deploy_checks.py syscalls FORKD_SERVICE TRACE...
    deploy_checks.py dockerfile DOCKERFILE DOCKERIGNORE
    deploy_checks.py split RENDERED_YAML CORE_OUT CRD_OUT
    deploy_checks.py kubernetes RENDERED_YAML KUSTOMIZE_DIR
    deploy_checks.py rules RULES_YML OPERATIONS_MD METRICS_RS
    deploy_checks.py grafana DASHBOARD_JSON METRICS_RS

Each prints one line per check passed and exits 1 after listing every
failure. Needs PyYAML (and Python 3.11+ for tomllib).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any, Callable

import yaml

FAILURES: list[str] = []


def check(ok: bool, what: str) -> bool:
    """Records one check; prints it when it passes."""
    if ok:
        print(f"  ok  {what}")
    else:
        FAILURES.append(what)
        print(f"  FAIL {what}")
    return ok


def done(name: str) -> int:
    if FAILURES:
        print(f"{name}: {len(FAILURES)} check(s) failed:", file=sys.stderr)
        for f in FAILURES:
            print(f"  - {f}", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------- units

SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20, "gi": 2**30, "gib": 2**30, "ti": 2**40, "tib": 2**40,
}


def parse_size(s: str | int) -> int:
    """'4GiB', '64MiB', '10Gi' (Kubernetes), '1GB' -> bytes."""
    if isinstance(s, int):
        return s
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", s)
    if not m or m.group(2).lower() not in SIZE_UNITS:
        raise ValueError(f"not a size: {s!r}")
    return int(float(m.group(1)) * SIZE_UNITS[m.group(2).lower()])


def parse_seconds(s: str | int) -> float:
    """'30s', '1m', '500ms', '1m30s', '45' (systemd: seconds) -> seconds."""
    if isinstance(s, (int, float)):
        return float(s)
    total, rest = 0.0, s.replace(" ", "")
    if re.fullmatch(r"[0-9.]+", rest):
        return float(rest)
    units = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    for num, unit in re.findall(r"([0-9.]+)([a-z]+)", rest):
        if unit not in units:
            raise ValueError(f"not a duration: {s!r}")
        total += float(num) * units[unit]
    if not total and rest not in ("0", "0s"):
        raise ValueError(f"not a duration: {s!r}")
    return total


def listen_port(addr: str) -> int:
    return int(addr.rsplit(":", 1)[1])


def listen_host(addr: str) -> str:
    return addr.rsplit(":", 1)[0].strip("[]")


def forkd_config(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        return tomllib.load(f)


def env_refs(value: Any) -> set[str]:
    """Every ${NAME} a parsed config interpolates (comments do not count)."""
    if isinstance(value, str):
        return set(re.findall(r"\$\{([A-Za-z0-9_]+)\}", value))
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        return set().union(set(), *(env_refs(v) for v in value))
    return set()


def metric_names(metrics_rs: Path) -> set[str]:
    """Series names forkd exports, from src/metrics.rs (histograms expanded)."""
    text = metrics_rs.read_text()
    names = set(re.findall(r'"(forkd_[a-z0-9_]+)"', text))
    histograms = set(re.findall(r'HistogramOpts::new\(\s*"(forkd_[a-z0-9_]+)"', text))
    for h in histograms:
        names |= {h + "_bucket", h + "_sum", h + "_count"}
    return names


def used_metrics(expr: str) -> set[str]:
    return set(re.findall(r"(?<![A-Za-z0-9_\"])(forkd_[a-z0-9_]+)", expr))


def github_anchor(heading: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to '-'."""
    s = heading.strip().lower()
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def markdown_anchors(path: Path) -> set[str]:
    """Anchors of a Markdown file's headings (fenced code blocks skipped)."""
    anchors, fenced = set(), False
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        m = re.match(r"^#{1,6}\s+(.+?)\s*#*\s*$", line)
        if m and not fenced:
            anchors.add(github_anchor(m.group(1)))
    return anchors


# ---------------------------------------------------------------- systemd

def parse_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    sections: dict[str, list[tuple[str, str]]] = {}
    current = ""
    pending = ""
    for raw in path.read_text().splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            sections.setdefault(current, [])
            continue
        key, _, value = line.partition("=")
        sections.setdefault(current, []).append((key.strip(), value.strip()))
    return sections


def unit_values(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def cmd_unit(service: Path, sample: Path) -> int:
    unit = parse_unit(service)
    conf = forkd_config(sample)

    def one(key: str) -> str | None:
        vals = unit_values(unit, "Service", key)
        return vals[-1] if vals else None

    exec_start = one("ExecStart") or ""
    check(exec_start.split()[:2] == ["/usr/local/bin/forkd", "run"] and "--config" in exec_start,
          f"ExecStart runs forkd run --config: {exec_start!r}")
    config_path = exec_start.split("--config", 1)[-1].split()[0] if "--config" in exec_start else ""
    check(config_path == "/etc/forkd/forkd.toml", f"config at /etc/forkd/forkd.toml: {config_path!r}")
    reloads = unit_values(unit, "Service", "ExecReload")
    check(any(re.fullmatch(r"/bin/kill -HUP \$MAINPID", r) for r in reloads),
          f"ExecReload sends SIGHUP to $MAINPID: {reloads}")
    check(one("Restart") == "on-failure", "Restart=on-failure")
    check(bool(one("User")) or one("DynamicUser") == "yes", "a dedicated user (User= or DynamicUser=yes)")
    check(one("User") != "root", "User is not root")
    check(one("StateDirectory") == "forkd", "StateDirectory=forkd")
    buffer_dir = conf.get("buffer", {}).get("dir", "")
    check(buffer_dir.startswith("/var/lib/forkd/"), f"sample buffer.dir under the state directory: {buffer_dir!r}")
    rw = " ".join(unit_values(unit, "Service", "ReadWritePaths")).split()
    check("/var/lib/forkd" in rw, f"ReadWritePaths has the state directory: {rw}")
    shutdown = parse_seconds(conf.get("server", {}).get("shutdown_timeout", "30s"))
    stop = parse_seconds(one("TimeoutStopSec") or "90")
    check(stop >= shutdown + 15,
          f"TimeoutStopSec ({stop:g}s) >= server.shutdown_timeout ({shutdown:g}s) + 15s for the spool sync")
    check(one("KillSignal") in (None, "SIGTERM"), "stops with SIGTERM")
    expected = {
        "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
        "PrivateDevices": "yes", "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes", "ProtectControlGroups": "yes", "RestrictNamespaces": "yes",
        "RestrictSUIDSGID": "yes", "LockPersonality": "yes", "MemoryDenyWriteExecute": "yes",
        "UMask": "0077", "CapabilityBoundingSet": "", "SystemCallArchitectures": "native",
    }
    for key, want in expected.items():
        check(one(key) == want, f"{key}={want}")
    families = set(" ".join(unit_values(unit, "Service", "RestrictAddressFamilies")).split())
    check(families == {"AF_INET", "AF_INET6", "AF_UNIX"}, f"RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX: {families}")
    filters = unit_values(unit, "Service", "SystemCallFilter")
    check("@system-service" in filters, f"SystemCallFilter=@system-service: {filters}")
    nofile = one("LimitNOFILE") or "0"
    max_conn = int(conf.get("server", {}).get("max_connections", 10000))
    check(nofile.isdigit() and int(nofile) > max_conn + 1000,
          f"LimitNOFILE ({nofile}) above server.max_connections ({max_conn}) + spool and upstream files")
    wanted_by = unit_values(unit, "Install", "WantedBy")
    check(wanted_by == ["multi-user.target"], f"WantedBy=multi-user.target: {wanted_by}")
    return done("unit")


def expand_syscall_groups() -> Callable[[str], set[str]]:
    """Expands systemd's @groups into syscall names (systemd-analyze syscall-filter)."""
    out = subprocess.run(["systemd-analyze", "syscall-filter"], check=True, capture_output=True, text=True).stdout
    groups: dict[str, list[str]] = {}
    current = None
    for line in out.splitlines():
        if line.startswith("@"):
            current = line.strip()
            groups[current] = []
        elif current and line.strip() and not line.strip().startswith("#"):
            groups[current].append(line.strip())

    def expand(name: str, seen: frozenset[str] = frozenset()) -> set[str]:
        if not name.startswith("@"):
            return {name}
        if name in seen:
            return set()
        result: set[str] = set()
        for item in groups.get(name, []):
            result |= expand(item, seen | {name})
        return result

    return expand


def cmd_syscalls(service: Path, traces: list[Path]) -> int:
    """forkd's syscalls (from strace logs) against the unit's SystemCallFilter
    and address families against RestrictAddressFamilies."""
    unit = parse_unit(service)
    expand = expand_syscall_groups()
    allowed: set[str] | None = None
    for value in unit_values(unit, "Service", "SystemCallFilter"):
        deny = value.startswith("~")
        names = set()
        for item in value.lstrip("~").split():
            names |= expand(item)
        if deny:
            allowed = (allowed if allowed is not None else set()) - names
        else:
            allowed = (allowed or set()) | names
    check(allowed is not None and len(allowed) > 100, f"SystemCallFilter allows {len(allowed or ())} syscalls")
    allowed = allowed or set()
    families_allowed = set(" ".join(unit_values(unit, "Service", "RestrictAddressFamilies")).split())
    used: set[str] = set()
    families: set[str] = set()
    for trace in traces:
        for line in trace.read_text(errors="replace").splitlines():
            m = re.match(r"^\d+\s+([a-z0-9_]+)\(", line)
            if m:
                used.add(m.group(1))
            m = re.search(r"\bsocket(?:pair)?\((AF_[A-Z0-9]+)", line)
            if m:
                families.add(m.group(1))
    # The process starts as root in systemd's own code before the filter
    # applies; execve is the one call of the trace made before it.
    used.discard("execve")
    check(len(used) > 30, f"traced {len(used)} distinct syscalls of forkd")
    blocked = sorted(used - allowed)
    check(not blocked, f"every syscall forkd made is allowed by SystemCallFilter (blocked: {blocked})")
    bad_families = sorted(families - families_allowed - {"AF_UNSPEC"})
    check(not bad_families,
          f"every socket family forkd used ({sorted(families)}) is in RestrictAddressFamilies (not: {bad_families})")
    return done("syscalls")


# ---------------------------------------------------------------- Dockerfile

def cmd_dockerfile(dockerfile: Path, dockerignore: Path) -> int:
    lines: list[str] = []
    pending = ""
    for raw in dockerfile.read_text().splitlines():
        s = raw.strip()
        if s.startswith("#") and not pending:
            continue
        if s.startswith("#"):
            continue
        if s.endswith("\\"):
            pending += s[:-1] + " "
            continue
        s = (pending + s).strip()
        pending = ""
        if s:
            lines.append(s)
    instrs = [(l.split(None, 1)[0].upper(), l.split(None, 1)[1] if " " in l else "") for l in lines]
    stages: list[list[tuple[str, str]]] = []
    for ins, arg in instrs:
        if ins == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((ins, arg))
    check(len(stages) >= 2, f"multi-stage build ({len(stages)} stages)")
    if len(stages) < 2:
        return done("dockerfile")
    build, final = stages[0], stages[-1]
    check(re.match(r"rust:1(\.\d+)*-bookworm\s+AS\s+\w+", build[0][1], re.I) is not None,
          f"builder stage is rust:*-bookworm, named: {build[0][1]!r}")
    build_runs = " ".join(a for i, a in build if i == "RUN")
    check("cargo build --release --locked" in build_runs, "builder runs cargo build --release --locked")
    base = final[0][1].split()[0]
    check(base.startswith(("gcr.io/distroless/cc-debian12", "debian:bookworm-slim")),
          f"runtime image is distroless cc-debian12 or debian:bookworm-slim: {base}")
    check(":latest" not in base, "runtime image tag is not latest")

    def last(ins: str) -> str | None:
        vals = [a for i, a in final if i == ins]
        return vals[-1] if vals else None

    user = last("USER") or ""
    check(user.split(":")[0] == "65532", f"runs as uid 65532 (numeric, for runAsNonRoot): USER {user}")
    volumes: list[str] = []
    for i, a in final:
        if i == "VOLUME":
            volumes += json.loads(a) if a.startswith("[") else a.split()
    check("/var/lib/forkd" in volumes, f"VOLUME /var/lib/forkd: {volumes}")
    exposed = set(" ".join(a for i, a in final if i == "EXPOSE").split())
    check({"8080", "9464"} <= {p.split("/")[0] for p in exposed}, f"EXPOSE 8080 9464: {sorted(exposed)}")
    entry = last("ENTRYPOINT") or ""
    check(entry.startswith("[") and json.loads(entry) == ["forkd"], f'ENTRYPOINT ["forkd"] (exec form): {entry}')
    cmd = last("CMD") or ""
    check(cmd.startswith("[") and json.loads(cmd) == ["run", "--config", "/etc/forkd/forkd.toml"],
          f'CMD ["run", "--config", "/etc/forkd/forkd.toml"]: {cmd}')
    check(last("STOPSIGNAL") == "SIGTERM", "STOPSIGNAL SIGTERM")
    copies = " ".join(a for i, a in final if i == "COPY")
    check("/usr/local/bin/forkd" in copies, "the binary is copied to /usr/local/bin/forkd")
    check("--chown=65532:65532" in copies and "/var/lib" in copies,
          "the spool directory is owned by 65532 in the image")
    ignored = [l.strip() for l in dockerignore.read_text().splitlines() if l.strip() and not l.startswith("#")]
    for want in ("target", ".git"):
        check(any(p.strip("/").lstrip("*/") == want for p in ignored), f".dockerignore excludes {want}")
    return done("dockerfile")


# ---------------------------------------------------------------- Kubernetes

def load_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def cmd_split(rendered: Path, core_out: Path, crd_out: Path) -> int:
    """Splits rendered manifests: core kinds (for kubernetes-validate) and CRDs."""
    core, crds = [], []
    for d in load_docs(rendered):
        api = d.get("apiVersion", "")
        group = api.split("/")[0] if "/" in api else ""
        is_core = group in ("", "apps", "batch", "policy", "autoscaling") or group.endswith(".k8s.io")
        (core if is_core else crds).append(d)
    core_out.write_text(yaml.safe_dump_all(core, sort_keys=False))
    crd_out.write_text(yaml.safe_dump_all(crds, sort_keys=False))
    print(f"  ok  {len(core)} core resources ({', '.join(d['kind'] for d in core)}), "
          f"{len(crds)} custom ({', '.join(d['kind'] for d in crds)})")
    return 0


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def cmd_kubernetes(rendered: Path, kdir: Path) -> int:
    docs = load_docs(rendered)
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    for kind in ("StatefulSet", "Service", "ConfigMap", "PodDisruptionBudget", "ServiceMonitor"):
        check(kind in by_kind, f"bundle has a {kind}")
    check("Secret" not in by_kind, "bundle ships no Secret (secret.example.yaml is an example, created out of band)")
    if FAILURES:
        return done("kubernetes")

    conf_path = kdir / "forkd.toml"
    conf_text = conf_path.read_text()
    conf = tomllib.loads(conf_text)
    sts = by_kind["StatefulSet"][0]
    spec = sts["spec"]
    pod = spec["template"]["spec"]
    pod_labels = spec["template"]["metadata"]["labels"]
    check(spec.get("replicas", 1) >= 2, f"StatefulSet runs >= 2 replicas: {spec.get('replicas')}")
    check(selects(spec["selector"]["matchLabels"], pod_labels), "StatefulSet selector matches its pod labels")
    containers = pod["containers"]
    check(len(containers) == 1, "one container")
    c = containers[0]
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}

    # Config: mounted read-only from the generated ConfigMap, where --config says.
    args = c.get("args", [])
    config_arg = args[args.index("--config") + 1] if "--config" in args else ""
    check(args[:1] == ["run"] and config_arg == "/etc/forkd/forkd.toml",
          f"container runs `forkd run --config /etc/forkd/forkd.toml`: {args}")
    mounts = {m["name"]: m for m in c.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    cm_names = {cm["metadata"]["name"]: cm for cm in by_kind["ConfigMap"]}
    config_ok = False
    for name, v in volumes.items():
        cm = v.get("configMap", {}).get("name")
        if cm in cm_names and name in mounts:
            m = mounts[name]
            config_ok = (m["mountPath"].rstrip("/") + "/forkd.toml" == config_arg and m.get("readOnly") is True
                         and cm_names[cm]["data"].get("forkd.toml") == conf_text)
    check(config_ok, "ConfigMap holding forkd.toml (as in the repo) is mounted read-only at /etc/forkd")

    # Ports, probes.
    server_listen = conf["server"]["listen"]
    admin_listen = conf["admin"]["listen"]
    check(ports.get("ingest") == listen_port(server_listen), f"port ingest = server.listen {server_listen}")
    check(ports.get("admin") == listen_port(admin_listen), f"port admin = admin.listen {admin_listen}")
    check(listen_host(admin_listen) in ("0.0.0.0", "::"), f"admin.listen reachable by probes/Prometheus: {admin_listen}")
    check(listen_host(server_listen) in ("0.0.0.0", "::"), f"server.listen reachable by the Service: {server_listen}")
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        p = c.get(probe, {}).get("httpGet", {})
        check(p.get("path") == path and p.get("port") in ("admin", ports.get("admin")),
              f"{probe} GET {path} on the admin port: {p}")
    shutdown = parse_seconds(conf["server"].get("shutdown_timeout", "30s"))
    grace = pod.get("terminationGracePeriodSeconds", 30)
    check(grace >= shutdown + 15,
          f"terminationGracePeriodSeconds ({grace}) >= server.shutdown_timeout ({shutdown:g}s) + 15s")

    # Security.
    psc, csc = pod.get("securityContext", {}), c.get("securityContext", {})
    check(psc.get("runAsNonRoot") is True or csc.get("runAsNonRoot") is True, "runAsNonRoot")
    uid = csc.get("runAsUser", psc.get("runAsUser"))
    check(isinstance(uid, int) and uid != 0, f"runAsUser is a non-zero uid: {uid}")
    check(csc.get("readOnlyRootFilesystem") is True, "readOnlyRootFilesystem")
    check(csc.get("allowPrivilegeEscalation") is False, "allowPrivilegeEscalation: false")
    check(csc.get("capabilities", {}).get("drop") == ["ALL"], "capabilities drop ALL")
    seccomp = csc.get("seccompProfile", psc.get("seccompProfile", {}))
    check(seccomp.get("type") == "RuntimeDefault", "seccompProfile RuntimeDefault")
    res = c.get("resources", {})
    check(bool(res.get("requests", {}).get("cpu")) and bool(res.get("requests", {}).get("memory"))
          and bool(res.get("limits", {}).get("memory")), "resources: cpu/memory requests, memory limit")
    if res.get("limits", {}).get("memory"):
        limit = parse_size(res["limits"]["memory"])
        inflight = parse_size(conf["server"].get("max_inflight_bytes", "256MiB"))
        check(limit >= 2 * inflight, f"memory limit ({limit}) >= 2 x server.max_inflight_bytes ({inflight})")

    # Spool: on a per-replica claim, big enough for every target's bounds.
    claims = {t["metadata"]["name"]: t for t in spec.get("volumeClaimTemplates", [])}
    buffer_dir = conf["buffer"]["dir"]
    spool_mount = [m for n, m in mounts.items() if n in claims]
    check(len(spool_mount) == 1 and buffer_dir.startswith(spool_mount[0]["mountPath"].rstrip("/") + "/"),
          f"buffer.dir {buffer_dir} is on a volumeClaimTemplates claim")
    check(not spool_mount or not spool_mount[0].get("readOnly"), "spool mount is writable")
    if len(spool_mount) == 1:
        claim = claims[spool_mount[0]["name"]]
        storage = parse_size(claim["spec"]["resources"]["requests"]["storage"])
        need = 0
        for name, t in conf.get("targets", {}).items():
            b = {**conf["buffer"], **t.get("buffer", {})}
            need += parse_size(b.get("max_size", "1GiB")) + parse_size(b.get("rejected_max_size", "64MiB"))
        check(storage >= need, f"claim ({storage} bytes) holds every target's max_size + rejected_max_size ({need})")
        check(claim["spec"].get("accessModes") == ["ReadWriteOnce"], "claim is ReadWriteOnce (one pod per spool)")
    retention = spec.get("persistentVolumeClaimRetentionPolicy", {})
    check(retention.get("whenScaled", "Retain") == "Retain" and retention.get("whenDeleted", "Retain") == "Retain",
          "claims are retained on scale-down and delete (spools are not thrown away)")

    # Secrets: every ${NAME} comes from a Secret key the example documents.
    env = {e["name"]: e for e in c.get("env", [])}
    secret_example = load_docs(kdir / "secret.example.yaml")[0]
    example_keys = set(secret_example.get("stringData", {})) | set(secret_example.get("data", {}))
    for var in sorted(env_refs(conf)):
        e = env.get(var, {})
        ref = e.get("valueFrom", {}).get("secretKeyRef", {})
        check(ref.get("name") == secret_example["metadata"]["name"] and ref.get("key") in example_keys,
              f"${{{var}}} comes from Secret {secret_example['metadata']['name']} key {ref.get('key')!r}")
    check(all("value" not in e for e in env.values()), "no literal env values (secrets come from the Secret)")
    resources = yaml.safe_load((kdir / "kustomization.yaml").read_text()).get("resources", [])
    check("secret.example.yaml" not in resources, "secret.example.yaml is not a kustomization resource")

    # Services.
    services = {s["metadata"]["name"]: s for s in by_kind["Service"]}
    headless = services.get(spec.get("serviceName", ""))
    check(headless is not None and headless["spec"].get("clusterIP") == "None",
          f"serviceName {spec.get('serviceName')!r} is a headless Service")
    for name, s in services.items():
        check(selects(s["spec"].get("selector", {}), pod_labels), f"Service {name} selects the forkd pods")
        for p in s["spec"]["ports"]:
            tp = p.get("targetPort")
            check(tp in ports or tp in ports.values(), f"Service {name} port {p['name']} targets a container port ({tp})")
    ingest = [n for n, s in services.items() if s["spec"].get("clusterIP") != "None"]
    check(len(ingest) == 1 and {p.get("targetPort") for p in services[ingest[0]]["spec"]["ports"]} == {"ingest"},
          f"the client Service exposes the ingest port only: {ingest}")
    pdb = by_kind["PodDisruptionBudget"][0]
    check(selects(pdb["spec"]["selector"]["matchLabels"], pod_labels), "PodDisruptionBudget selects the forkd pods")
    check(pdb["spec"].get("maxUnavailable") == 1 or pdb["spec"].get("minAvailable", 0) >= 1,
          "PodDisruptionBudget keeps replicas up during voluntary disruptions")

    # The ServiceMonitor (CRD: not in kubernetes-validate's schemas).
    sm = by_kind["ServiceMonitor"][0]
    check(sm.get("apiVersion") == "monitoring.coreos.com/v1", f"ServiceMonitor apiVersion: {sm.get('apiVersion')}")
    check(bool(sm.get("metadata", {}).get("name")), "ServiceMonitor has a name")
    sel = sm.get("spec", {}).get("selector", {}).get("matchLabels", {})
    matched = [n for n, s in services.items() if selects(sel, s["metadata"].get("labels", {}))]
    check(len(matched) == 1, f"ServiceMonitor selects exactly one Service: {matched}")
    endpoints = sm.get("spec", {}).get("endpoints", [])
    check(len(endpoints) >= 1, "ServiceMonitor has endpoints")
    if len(matched) == 1:
        svc = services[matched[0]]
        svc_ports = {p["name"]: p for p in svc["spec"]["ports"]}
        check(svc["spec"].get("publishNotReadyAddresses") is True,
              f"scraped Service {matched[0]} publishes not-ready pods (metrics matter most then)")
        for ep in endpoints:
            port = svc_ports.get(ep.get("port", ""))
            check(port is not None and port.get("targetPort") in ("admin", ports.get("admin")),
                  f"endpoint port {ep.get('port')!r} is the admin port of Service {matched[0]}")
            check(ep.get("path") == "/metrics", f"endpoint path /metrics: {ep.get('path')}")
            if "interval" in ep and "scrapeTimeout" in ep:
                check(parse_seconds(ep["scrapeTimeout"]) <= parse_seconds(ep["interval"]),
                      "scrapeTimeout <= interval")
        job_label = sm["spec"].get("jobLabel")
        job = svc["metadata"]["labels"].get(job_label, matched[0]) if job_label else matched[0]
        check(job == "forkd", f'scrape job is "forkd", as the alert rules expect: {job!r}')
    return done("kubernetes")


# ---------------------------------------------------------------- Prometheus rules

def cmd_rules(rules_path: Path, operations: Path, metrics_rs: Path) -> int:
    rules = yaml.safe_load(rules_path.read_text())
    anchors = markdown_anchors(operations)
    exported = metric_names(metrics_rs)
    alerts = [r for g in rules["groups"] for r in g["rules"] if "alert" in r]
    names = [r["alert"] for r in alerts]
    required = {"ForkdDown", "ForkdTargetDown", "ForkdSpoolFilling", "ForkdSpoolFull", "ForkdRecordsDropped",
                "ForkdClients503", "ForkdReloadFailed", "ForkdNoTargetSelected"}
    check(required <= set(names), f"alerts {sorted(required - set(names))} missing" if required - set(names)
          else f"every required alert is defined ({len(names)} alerts)")
    check(len(names) == len(set(names)), "alert names are unique")
    for r in alerts:
        a, ann = r["alert"], r.get("annotations", {})
        check(r.get("labels", {}).get("severity") in ("warning", "critical"), f"{a}: severity warning|critical")
        check(bool(ann.get("summary")) and bool(ann.get("description")), f"{a}: summary and description")
        url = ann.get("runbook_url", "")
        m = re.fullmatch(r"docs/operations\.md#([\w-]+)", url)
        check(m is not None and m.group(1) in anchors,
              f"{a}: runbook_url {url!r} is a heading of {operations.name}")
        unknown = sorted(used_metrics(r["expr"]) - exported)
        check(not unknown, f"{a}: every metric is exported by forkd (unknown: {unknown})")
    links = re.findall(r"\]\(#([\w-]+)\)", operations.read_text())
    broken = sorted(set(links) - anchors)
    check(not broken, f"every #link inside {operations.name} resolves (broken: {broken})")
    return done("rules")


# ---------------------------------------------------------------- Grafana

BUILTINS = {"__rate_interval", "__interval", "__interval_ms", "__range", "__range_s", "__dashboard", "__name"}


def cmd_grafana(path: Path, metrics_rs: Path) -> int:
    try:
        dash = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        check(False, f"{path} is valid JSON: {e}")
        return done("grafana")
    check(True, f"{path.name} is valid JSON")
    check(bool(dash.get("uid")) and bool(dash.get("title")), "uid and title")
    check(isinstance(dash.get("schemaVersion"), int), "schemaVersion")
    variables = {v["name"]: v for v in dash.get("templating", {}).get("list", [])}
    ds = variables.get("datasource", {})
    check(ds.get("type") == "datasource" and ds.get("query") == "prometheus",
          "datasource is a template variable of type prometheus")
    exported = metric_names(metrics_rs)

    panels: list[dict[str, Any]] = []

    def walk(lst: list[dict[str, Any]]) -> None:
        for p in lst:
            panels.append(p)
            walk(p.get("panels", []))

    walk(dash.get("panels", []))
    ids = [p.get("id") for p in panels]
    check(len(ids) == len(set(ids)) and None not in ids, "panel ids are unique")
    used: set[str] = set()
    exprs: list[str] = []
    for p in panels:
        title = p.get("title", "?")
        g = p.get("gridPos", {})
        check(all(k in g for k in "hwxy") and g.get("x", 0) + g.get("w", 0) <= 24,
              f"panel {title!r}: gridPos within 24 columns")
        if p.get("type") == "row":
            continue
        check(p.get("datasource", {}).get("uid") == "${datasource}", f"panel {title!r}: datasource ${{datasource}}")
        targets = p.get("targets", [])
        check(bool(targets), f"panel {title!r}: has queries")
        refs = [t.get("refId") for t in targets]
        check(len(refs) == len(set(refs)) and None not in refs, f"panel {title!r}: unique refIds")
        for t in targets:
            expr = t.get("expr", "")
            check(bool(expr), f"panel {title!r} {t.get('refId')}: has an expr")
            check(t.get("datasource", {}).get("uid", "${datasource}") == "${datasource}",
                  f"panel {title!r} {t.get('refId')}: datasource ${{datasource}}")
            exprs.append(expr)
    for v in variables.values():
        if v.get("type") == "query":
            q = v.get("query", {})
            exprs.append(q.get("query", "") if isinstance(q, dict) else q)
    for expr in exprs:
        for braced, plain in re.findall(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", expr):
            used.add(braced or plain)
    undefined = sorted(used - set(variables) - BUILTINS)
    check(not undefined, f"every variable used is defined (undefined: {undefined})")
    names = set().union(*(used_metrics(e) for e in exprs)) if exprs else set()
    unknown = sorted(names - exported)
    check(not unknown, f"every metric is exported by forkd (unknown: {unknown})")
    required = {
        "forkd_requests_total", "forkd_target_requests_total", "forkd_target_up", "forkd_target_selected",
        "forkd_buffer_bytes", "forkd_buffer_max_bytes", "forkd_buffer_oldest_record_age_seconds",
        "forkd_target_latency_seconds_bucket", "forkd_request_duration_seconds_bucket",
        "forkd_config_reloads_total", "forkd_inflight_bytes", "forkd_client_connections",
    }
    check(required <= names, f"dashboard shows {sorted(required)} (missing: {sorted(required - names)})")
    joined = "\n".join(exprs)
    for result in ("delivered", "spooled", "rejected", "dropped"):
        check(result in joined, f"per-target {result} rate is shown")
    check(re.search(r"histogram_quantile\([^,]+,\s*sum by \(le, target, path\)\s*\(rate\(forkd_target_latency_seconds_bucket",
                    joined) is not None, "target latency quantiles by le, target, path")
    return done("grafana")


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    cmd, args = argv[1], [Path(a) for a in argv[2:]]
    commands: dict[str, tuple[int, Callable[..., int]]] = {
        "unit": (2, cmd_unit),
        "dockerfile": (2, cmd_dockerfile),
        "split": (3, cmd_split),
        "kubernetes": (2, cmd_kubernetes),
        "rules": (3, cmd_rules),
        "grafana": (2, cmd_grafana),
    }
    if cmd == "syscalls" and len(args) >= 2:
        return cmd_syscalls(args[0], args[1:])
    if cmd not in commands or len(args) != commands[cmd][0]:
        print(__doc__, file=sys.stderr)
        return 2
    return commands[cmd][1](*args)


if __name__ == "__main__":
    os.environ.setdefault("SYSTEMD_COLORS", "0")
    sys.exit(main(sys.argv))
