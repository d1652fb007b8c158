#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Config tests: formats, environment overrides, interpolation, unknown keys,
//! validation (every problem at once, naming the key), target names, human
//! durations and sizes, buffer overrides and defaults, warnings, redaction and
//! the shipped configs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use forkd::config::{Config, ConfigError, Mode, REDACTED};
use forkd::spool::{FsyncPolicy, WhenFull};
use tempfile::TempDir;

// ---------------------------------------------------------------- helpers

const MIB: u64 = 1 << 20;

/// A complete, valid config in TOML; the YAML and JSON versions below say the same.
const FULL_TOML: &str = r#"
[server]
listen = "127.0.0.1:18080"
methods = ["POST", "PUT", "PATCH"]
max_body_size = "8MiB"
max_inflight_bytes = "128MiB"
request_timeout = "20s"
auth_tokens = ["ingest-secret"]

[admin]
listen = "127.0.0.1:19464"
token = "admin-secret"

[log]
level = "debug"
format = "json"

[routing]
mode = "active-passive"
active = "backup"
secondary_wait = "250ms"
spooled_status = 201

[targets.primary]
url = "http://127.0.0.1:19001/ingest?sig=primary-sas"
timeout = "5s"
connect_timeout = "1s"
headers = { Authorization = "Bearer primary-secret", X-Tenant = "acme" }
retry_statuses = [429, 503]

[targets.backup]
url = "http://127.0.0.1:19002"

[targets.backup.buffer]
max_size = "2MiB"
when_full = "drop_newest"
fsync = "100ms"

[buffer]
dir = "/var/lib/forkd-test/spool"
max_size = "512MiB"
fsync = "never"
drain_concurrency = 4

[retry]
initial_backoff = "50ms"
max_backoff = "5m"
"#;

const FULL_YAML: &str = r#"
server:
  listen: "127.0.0.1:18080"
  methods: ["POST", "PUT", "PATCH"]
  max_body_size: "8MiB"
  max_inflight_bytes: "128MiB"
  request_timeout: "20s"
  auth_tokens: ["ingest-secret"]
admin:
  listen: "127.0.0.1:19464"
  token: "admin-secret"
log:
  level: debug
  format: json
routing:
  mode: active-passive
  active: backup
  secondary_wait: 250ms
  spooled_status: 201
targets:
  primary:
    url: "http://127.0.0.1:19001/ingest?sig=primary-sas"
    timeout: 5s
    connect_timeout: 1s
    headers:
      Authorization: "Bearer primary-secret"
      X-Tenant: acme
    retry_statuses: [429, 503]
  backup:
    url: "http://127.0.0.1:19002"
    buffer:
      max_size: 2MiB
      when_full: drop_newest
      fsync: 100ms
buffer:
  dir: /var/lib/forkd-test/spool
  max_size: 512MiB
  fsync: never
  drain_concurrency: 4
retry:
  initial_backoff: 50ms
  max_backoff: 5m
"#;

const FULL_JSON: &str = r#"{
  "server": {
    "listen": "127.0.0.1:18080",
    "methods": ["POST", "PUT", "PATCH"],
    "max_body_size": "8MiB",
    "max_inflight_bytes": "128MiB",
    "request_timeout": "20s",
    "auth_tokens": ["ingest-secret"]
  },
  "admin": { "listen": "127.0.0.1:19464", "token": "admin-secret" },
  "log": { "level": "debug", "format": "json" },
  "routing": {
    "mode": "active-passive",
    "active": "backup",
    "secondary_wait": "250ms",
    "spooled_status": 201
  },
  "targets": {
    "primary": {
      "url": "http://127.0.0.1:19001/ingest?sig=primary-sas",
      "timeout": "5s",
      "connect_timeout": "1s",
      "headers": { "Authorization": "Bearer primary-secret", "X-Tenant": "acme" },
      "retry_statuses": [429, 503]
    },
    "backup": {
      "url": "http://127.0.0.1:19002",
      "buffer": { "max_size": "2MiB", "when_full": "drop_newest", "fsync": "100ms" }
    }
  },
  "buffer": {
    "dir": "/var/lib/forkd-test/spool",
    "max_size": "512MiB",
    "fsync": "never",
    "drain_concurrency": 4
  },
  "retry": { "initial_backoff": "50ms", "max_backoff": "5m" }
}"#;

/// A small valid active-active config; tests append to or edit it.
const BASE: &str = r#"
[server]
listen = "127.0.0.1:18080"

[admin]
listen = "127.0.0.1:19464"

[targets.primary]
url = "http://127.0.0.1:19001"

[targets.backup]
url = "http://127.0.0.1:19002"

[buffer]
dir = "/var/lib/forkd-test/spool"
"#;

struct Files {
    dir: TempDir,
}

impl Files {
    fn new() -> Self {
        Files {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    }
}

/// Loads with an explicit environment: `env` serves both `${VAR}` lookups and
/// `FORKD__…` overrides; the process environment is never read.
fn load_env(path: &Path, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let map: BTreeMap<String, String> = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let vars = map.clone();
    Config::load_with_env(path, move |name| map.get(name).cloned(), vars)
}

fn load_toml_env(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let files = Files::new();
    let path = files.write("forkd.toml", text);
    load_env(&path, env)
}

fn load_toml(text: &str) -> Result<Config, ConfigError> {
    load_toml_env(text, &[])
}

fn problems(text: &str) -> Vec<String> {
    match load_toml(text) {
        Ok(_) => panic!("expected the config to be refused:\n{text}"),
        Err(e) => e.problems,
    }
}

/// The one problem of a refused config.
fn one_problem(text: &str) -> String {
    let p = problems(text);
    assert_eq!(p.len(), 1, "expected exactly one problem, got {p:#?}");
    p.into_iter().next().unwrap()
}

fn assert_has_line(problems: &[String], prefix: &str) {
    assert!(
        problems.iter().any(|p| p.starts_with(prefix)),
        "no problem line starts with {prefix:?}: {problems:#?}"
    );
}

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

// ---------------------------------------------------------------- formats

#[test]
fn toml_yaml_and_json_files_load_to_the_same_config() {
    let files = Files::new();
    let toml = load_env(&files.write("forkd.toml", FULL_TOML), &[]).unwrap();
    let yaml = load_env(&files.write("forkd.yaml", FULL_YAML), &[]).unwrap();
    let yml = load_env(&files.write("forkd.yml", FULL_YAML), &[]).unwrap();
    let json = load_env(&files.write("forkd.json", FULL_JSON), &[]).unwrap();
    assert_eq!(toml, yaml);
    assert_eq!(toml, yml);
    assert_eq!(toml, json);
}

#[test]
fn a_full_config_loads_every_value_it_sets() {
    let c = load_toml(FULL_TOML).unwrap();
    assert_eq!(c.listen.to_string(), "127.0.0.1:18080");
    assert_eq!(c.admin_listen.to_string(), "127.0.0.1:19464");
    assert_eq!(
        c.methods.iter().map(|m| m.as_str()).collect::<Vec<_>>(),
        ["POST", "PUT", "PATCH"]
    );
    assert_eq!(c.raw.server.max_body_size.as_u64(), 8 * MIB);
    assert_eq!(c.raw.server.max_inflight_bytes.as_u64(), 128 * MIB);
    assert_eq!(c.raw.server.request_timeout, Duration::from_secs(20));
    assert_eq!(c.raw.routing.mode, Mode::ActivePassive);
    assert_eq!(c.raw.routing.active, "backup");
    assert_eq!(c.raw.routing.secondary_wait, Duration::from_millis(250));
    assert_eq!(c.raw.routing.spooled_status, 201);
    assert_eq!(c.raw.retry.initial_backoff, Duration::from_millis(50));
    assert_eq!(c.raw.retry.max_backoff, Duration::from_secs(300));

    let primary = c.target("primary").unwrap();
    assert_eq!(primary.display_url(), "http://127.0.0.1:19001/ingest");
    assert_eq!(
        primary.query,
        vec![("sig".to_owned(), "primary-sas".to_owned())]
    );
    assert_eq!(primary.timeout, Duration::from_secs(5));
    assert_eq!(primary.connect_timeout, Duration::from_secs(1));
    assert_eq!(primary.retry_statuses, vec![429, 503]);
    let headers: BTreeMap<String, String> = primary
        .headers
        .iter()
        .map(|(n, v)| (n.as_str().to_owned(), v.to_str().unwrap().to_owned()))
        .collect();
    assert_eq!(headers["authorization"], "Bearer primary-secret");
    assert_eq!(headers["x-tenant"], "acme");
    assert_eq!(primary.spool.max_size, 512 * MIB);
    assert_eq!(primary.spool.fsync, FsyncPolicy::Never);
    assert_eq!(primary.drain_concurrency, 4);

    let backup = c.target("backup").unwrap();
    assert_eq!(backup.spool.max_size, 2 * MIB);
    assert_eq!(backup.spool.when_full, WhenFull::DropNewest);
    assert_eq!(
        backup.spool.fsync,
        FsyncPolicy::Interval(Duration::from_millis(100))
    );
    assert_eq!(backup.drain_concurrency, 4);
    // Defaults fill what the file leaves out.
    assert_eq!(backup.timeout, Duration::from_secs(10));
    assert_eq!(backup.connect_timeout, Duration::from_secs(3));
    assert_eq!(
        backup.retry_statuses,
        forkd::config::DEFAULT_RETRY_STATUSES.to_vec()
    );
}

#[test]
fn an_unknown_file_extension_is_an_error_naming_the_file() {
    let files = Files::new();
    let path = files.write("forkd.ini", BASE);
    let err = load_env(&path, &[]).unwrap_err();
    assert_eq!(err.problems.len(), 1);
    assert!(err.problems[0].contains("forkd.ini"), "{err}");
}

#[test]
fn a_missing_file_is_an_error_naming_the_file() {
    let files = Files::new();
    let err = load_env(&files.dir.path().join("nope.toml"), &[]).unwrap_err();
    assert_eq!(err.problems.len(), 1);
    assert!(err.problems[0].contains("nope.toml"), "{err}");
}

// ---------------------------------------------------------------- environment

#[test]
fn forkd_section_key_variables_override_the_file() {
    let c = load_toml_env(
        BASE,
        &[
            ("FORKD__SERVER__LISTEN", "127.0.0.1:28080"),
            ("FORKD__ROUTING__MODE", "active-passive"),
            ("FORKD__ROUTING__ACTIVE", "backup"),
            ("FORKD__ROUTING__SPOOLED_STATUS", "200"),
            ("FORKD__BUFFER__MAX_SIZE", "64MiB"),
            ("FORKD__SERVER__METHODS", "POST,PATCH"),
            // Not ours: ignored.
            ("FORKDX__SERVER__LISTEN", "127.0.0.1:1"),
            ("SERVER__LISTEN", "127.0.0.1:2"),
        ],
    )
    .unwrap();
    assert_eq!(c.listen.to_string(), "127.0.0.1:28080");
    assert_eq!(c.raw.routing.mode, Mode::ActivePassive);
    assert_eq!(c.raw.routing.active, "backup");
    assert_eq!(c.raw.routing.spooled_status, 200);
    assert_eq!(c.target("primary").unwrap().spool.max_size, 64 * MIB);
    assert_eq!(
        c.methods.iter().map(|m| m.as_str()).collect::<Vec<_>>(),
        ["POST", "PATCH"]
    );
}

#[test]
fn a_target_key_can_be_overridden_from_the_environment() {
    let c = load_toml_env(BASE, &[("FORKD__TARGETS__BACKUP__TIMEOUT", "42s")]).unwrap();
    assert_eq!(c.target("backup").unwrap().timeout, Duration::from_secs(42));
    assert_eq!(
        c.target("primary").unwrap().timeout,
        Duration::from_secs(10),
        "only the named target changes"
    );
}

#[test]
fn an_override_of_a_string_key_with_a_numeric_value_stays_the_same_string() {
    let c = load_toml_env(
        BASE,
        &[
            ("FORKD__ADMIN__TOKEN", "007"),
            ("FORKD__SERVER__AUTH_TOKENS", "0123,1.50"),
            ("FORKD__TARGETS__BACKUP__HEADERS__X-TENANT", "true"),
        ],
    )
    .unwrap();
    assert_eq!(c.raw.admin.token.as_deref(), Some("007"));
    assert_eq!(c.raw.server.auth_tokens, ["0123", "1.50"]);
    assert_eq!(c.raw.targets["backup"].headers["x-tenant"], "true");
}

#[test]
fn numeric_and_list_keys_take_strings_from_the_environment() {
    let c = load_toml_env(
        BASE,
        &[
            ("FORKD__SERVER__MAX_CONNECTIONS", "77"),
            ("FORKD__SERVER__METHODS", "POST, PATCH"),
            ("FORKD__BUFFER__DRAIN_CONCURRENCY", "3"),
            ("FORKD__TARGETS__BACKUP__RETRY_STATUSES", "429,503"),
            ("FORKD__TARGETS__BACKUP__BUFFER__DRAIN_CONCURRENCY", "5"),
        ],
    )
    .unwrap();
    assert_eq!(c.raw.server.max_connections, 77);
    assert_eq!(
        c.methods.iter().map(|m| m.as_str()).collect::<Vec<_>>(),
        ["POST", "PATCH"]
    );
    assert_eq!(c.target("primary").unwrap().drain_concurrency, 3);
    assert_eq!(c.target("backup").unwrap().drain_concurrency, 5);
    assert_eq!(c.target("backup").unwrap().retry_statuses, [429, 503]);
    assert_eq!(
        c.target("primary").unwrap().retry_statuses,
        forkd::config::DEFAULT_RETRY_STATUSES.to_vec()
    );

    let err =
        load_toml_env(BASE, &[("FORKD__ROUTING__SPOOLED_STATUS", "two hundred")]).unwrap_err();
    assert_eq!(err.problems.len(), 1, "{err}");
    assert!(
        err.problems[0].starts_with("routing.spooled_status: "),
        "{err}"
    );
}

#[test]
fn an_invalid_override_is_reported_under_its_key() {
    let err = load_toml_env(BASE, &[("FORKD__TARGETS__BACKUP__TIMEOUT", "soon")]).unwrap_err();
    assert_eq!(err.problems.len(), 1, "{err}");
    assert!(
        err.problems[0].starts_with("targets.backup.timeout: "),
        "{err}"
    );
}

// ---------------------------------------------------------------- interpolation

#[test]
fn variables_are_interpolated_in_a_header_value_and_in_a_url() {
    let text = BASE.replace(
        "url = \"http://127.0.0.1:19002\"",
        "url = \"http://${BACKUP_HOST}:19002/v1?sv=${SAS}&x=1\"\nheaders = { Authorization = \"Bearer ${BACKUP_TOKEN}\" }",
    );
    let c = load_toml_env(
        &text,
        &[
            ("BACKUP_HOST", "10.1.2.3"),
            ("SAS", "s3cr3t"),
            ("BACKUP_TOKEN", "tok-123"),
        ],
    )
    .unwrap();
    let backup = c.target("backup").unwrap();
    assert_eq!(backup.display_url(), "http://10.1.2.3:19002/v1");
    assert_eq!(
        backup.query,
        vec![
            ("sv".to_owned(), "s3cr3t".to_owned()),
            ("x".to_owned(), "1".to_owned())
        ]
    );
    assert_eq!(backup.headers.len(), 1);
    assert_eq!(backup.headers[0].0, "authorization");
    assert_eq!(backup.headers[0].1, "Bearer tok-123");
}

#[test]
fn an_unset_variable_is_an_error_naming_the_key() {
    let text = BASE.replace(
        "url = \"http://127.0.0.1:19002\"",
        "url = \"http://127.0.0.1:19002\"\nheaders = { Authorization = \"Bearer ${NOT_SET_ANYWHERE}\" }",
    );
    let err = load_toml_env(&text, &[("SOMETHING_ELSE", "x")]).unwrap_err();
    assert_eq!(err.problems.len(), 1, "{err}");
    let line = &err.problems[0];
    assert!(
        line.starts_with("targets.backup.headers.Authorization: "),
        "{line}"
    );
    assert!(line.contains("NOT_SET_ANYWHERE"), "{line}");
}

#[test]
fn every_unset_variable_is_reported() {
    let text = BASE
        .replace(
            "url = \"http://127.0.0.1:19001\"",
            "url = \"http://${PRIMARY_HOST}:19001\"",
        )
        .replace(
            "listen = \"127.0.0.1:19464\"",
            "listen = \"127.0.0.1:19464\"\ntoken = \"${ADMIN_TOKEN}\"",
        );
    let err = load_toml_env(&text, &[]).unwrap_err();
    assert_eq!(err.problems.len(), 2, "{err}");
    assert_has_line(&err.problems, "targets.primary.url: ");
    assert_has_line(&err.problems, "admin.token: ");
}

#[test]
fn a_token_with_spaces_around_it_is_refused_since_it_could_never_match() {
    // A presented bearer token is trimmed like any header value.
    for (listen, token_line, problem) in [
        (
            "18080",
            "auth_tokens = [\"ingest-secret \"]",
            "server.auth_tokens[0]: ",
        ),
        ("19464", "token = \" admin-secret\"", "admin.token: "),
    ] {
        let listen = format!("listen = \"127.0.0.1:{listen}\"");
        let text = BASE.replace(&listen, &format!("{listen}\n{token_line}"));
        assert_ne!(text, BASE);
        let line = one_problem(&text);
        assert!(line.starts_with(problem), "{line}");
    }
}

// ---------------------------------------------------------------- unknown keys

#[test]
fn an_unknown_top_level_key_is_rejected_by_name() {
    let line = one_problem(&format!("{BASE}\n[bogus_section]\nx = 1\n"));
    assert!(line.contains("bogus_section"), "{line}");
}

#[test]
fn an_unknown_key_in_server_is_rejected_by_name() {
    let text = BASE.replace(
        "listen = \"127.0.0.1:18080\"",
        "listen = \"127.0.0.1:18080\"\nmax_body_sise = \"1MiB\"",
    );
    let line = one_problem(&text);
    assert!(line.starts_with("server.max_body_sise: "), "{line}");
    assert!(line.contains("unknown field"), "{line}");
}

#[test]
fn an_unknown_key_in_a_target_is_rejected_by_name() {
    let text = BASE.replace(
        "url = \"http://127.0.0.1:19002\"",
        "url = \"http://127.0.0.1:19002\"\ntimout = \"5s\"",
    );
    let line = one_problem(&text);
    assert!(line.starts_with("targets.backup.timout: "), "{line}");
    assert!(line.contains("unknown field"), "{line}");
}

#[test]
fn an_unknown_key_in_a_target_buffer_is_rejected_by_name() {
    let line = one_problem(&format!(
        "{BASE}\n[targets.backup.buffer]\nmax_sise = \"2MiB\"\n"
    ));
    assert!(
        line.starts_with("targets.backup.buffer.max_sise: "),
        "{line}"
    );
    assert!(line.contains("unknown field"), "{line}");
}

#[test]
fn an_unknown_key_from_the_environment_is_rejected_by_name() {
    let err = load_toml_env(BASE, &[("FORKD__SERVER__LISTN", "127.0.0.1:1")]).unwrap_err();
    assert_eq!(err.problems.len(), 1, "{err}");
    assert!(err.problems[0].contains("listn"), "{err}");
}

// ---------------------------------------------------------------- validation

#[test]
fn validation_reports_every_problem_at_once_one_line_each_naming_the_key() {
    let text = r#"
[server]
listen = "not-an-address"
max_body_size = "0B"

[admin]
listen = "127.0.0.1:19464"

[routing]
active = "primary"
spooled_status = 503

[targets.primary]
url = "http://127.0.0.1:19001"
retry_statuses = [200]

[targets.backup]
url = "ftp://127.0.0.1:19002"
timeout = "0s"

[buffer]
dir = "/var/lib/forkd-test/spool"

[retry]
initial_backoff = "10s"
max_backoff = "1s"
"#;
    let p = problems(text);
    for prefix in [
        "server.listen: ",
        "server.max_body_size: ",
        "routing.spooled_status: ",
        "targets.primary.retry_statuses[0]: ",
        "targets.backup.url: ",
        "targets.backup.timeout: ",
        "retry.max_backoff: ",
    ] {
        assert_has_line(&p, prefix);
    }
    assert_eq!(p.len(), 7, "one line per problem: {p:#?}");
    for line in &p {
        assert!(!line.contains('\n'), "{line:?}");
    }
    // The error's Display is the same lines, one per line.
    let err = load_toml(text).unwrap_err();
    assert_eq!(err.to_string().lines().count(), 7);
}

#[test]
fn a_problem_line_names_the_offending_value() {
    let line = one_problem(&BASE.replace("http://127.0.0.1:19002", "ftp://127.0.0.1:19002"));
    assert!(line.starts_with("targets.backup.url: "), "{line}");
    assert!(line.contains("ftp://127.0.0.1:19002"), "{line}");
}

#[test]
fn one_bad_buffer_default_is_reported_once_under_its_own_key() {
    // Every target inherits [buffer]: the problem is in [buffer], said once.
    let p = problems(&BASE.replace(
        "dir = \"/var/lib/forkd-test/spool\"",
        "dir = \"/var/lib/forkd-test/spool\"\nmax_size = \"512KiB\"\ndrain_concurrency = 0",
    ));
    assert_eq!(
        p,
        vec![
            "buffer.max_size: at least 1MiB".to_owned(),
            "buffer.drain_concurrency: must be between 1 and 1024".to_owned(),
        ]
    );
}

#[test]
fn a_config_without_targets_is_refused() {
    let line = one_problem(
        "[server]\nlisten = \"127.0.0.1:1\"\n[buffer]\ndir = \"/var/lib/forkd-test/spool\"\n",
    );
    assert!(line.starts_with("targets: "), "{line}");
}

#[test]
fn the_same_address_for_server_and_admin_is_refused() {
    let line = one_problem(&BASE.replace("127.0.0.1:19464", "127.0.0.1:18080"));
    assert!(line.starts_with("admin.listen: "), "{line}");
}

#[test]
fn get_and_lowercase_methods_are_refused() {
    let p = problems(&BASE.replace(
        "listen = \"127.0.0.1:18080\"",
        "listen = \"127.0.0.1:18080\"\nmethods = [\"POST\", \"GET\", \"put\"]",
    ));
    assert_eq!(p.len(), 2, "{p:#?}");
    assert_has_line(&p, "server.methods[1]: ");
    assert_has_line(&p, "server.methods[2]: ");
}

#[test]
fn a_target_header_forkd_sets_itself_is_refused() {
    for name in ["Host", "Content-Length", "X-Request-Id", "Connection"] {
        let line = one_problem(&BASE.replace(
            "url = \"http://127.0.0.1:19002\"",
            &format!("url = \"http://127.0.0.1:19002\"\nheaders = {{ {name} = \"1\" }}"),
        ));
        assert!(
            line.starts_with(&format!("targets.backup.headers.{name}: ")),
            "{line}"
        );
    }
}

#[test]
fn a_target_url_with_user_info_is_refused_without_showing_it() {
    let line = one_problem(&BASE.replace(
        "url = \"http://127.0.0.1:19002\"",
        "url = \"http://user:s3cret@127.0.0.1:19002\"",
    ));
    assert!(line.starts_with("targets.backup.url: "), "{line}");
    assert!(line.contains("user info"), "{line}");
    assert!(
        !line.contains("s3cret"),
        "the password is in the message: {line}"
    );
}

// ---------------------------------------------------------------- target names

fn with_target_name(name: &str) -> String {
    format!("{BASE}\n[targets.{name:?}]\nurl = \"http://127.0.0.1:19003\"\n")
}

#[test]
fn target_names_must_match_the_name_pattern() {
    let long = "a".repeat(33);
    for bad in [
        "Backup",
        "BACKUP",
        "1backup",
        "-x",
        "_x",
        "a.b",
        "a b",
        long.as_str(),
    ] {
        let p = problems(&with_target_name(bad));
        assert_eq!(p.len(), 1, "{bad:?}: {p:#?}");
        assert!(
            p[0].starts_with(&format!("targets.{bad}: ")),
            "{bad:?}: {p:#?}"
        );
        assert!(p[0].contains("[a-z][a-z0-9_-]{0,31}"), "{p:#?}");
    }
}

#[test]
fn target_names_matching_the_pattern_are_accepted() {
    let longest = format!("a{}", "b".repeat(31));
    for good in ["a", "eu-west_1", "z9", longest.as_str()] {
        let c = load_toml(&with_target_name(good)).unwrap();
        assert!(c.target(good).is_some(), "{good:?}");
    }
}

#[test]
fn routing_active_must_name_a_configured_target() {
    let line = one_problem(&format!("{BASE}\n[routing]\nactive = \"tertiary\"\n"));
    assert!(line.starts_with("routing.active: "), "{line}");
    assert!(line.contains("tertiary"), "{line}");
}

// ---------------------------------------------------------------- durations and sizes

#[test]
fn durations_and_sizes_are_human_strings() {
    let c = load_toml(&format!(
        "{BASE}\n[routing]\nsecondary_wait = \"1m 30s\"\n[retry]\ninitial_backoff = \"250ms\"\nmax_backoff = \"2h\"\n"
    ))
    .unwrap();
    assert_eq!(c.raw.routing.secondary_wait, Duration::from_secs(90));
    assert_eq!(c.raw.retry.initial_backoff, Duration::from_millis(250));
    assert_eq!(c.raw.retry.max_backoff, Duration::from_secs(7200));

    let c = load_toml(&BASE.replace(
        "dir = \"/var/lib/forkd-test/spool\"",
        "dir = \"/var/lib/forkd-test/spool\"\nmax_size = \"1GiB\"\nsegment_size = \"512KiB\"",
    ))
    .unwrap();
    let t = c.target("primary").unwrap();
    assert_eq!(t.spool.max_size, 1 << 30);
    assert_eq!(t.spool.segment_size, 512 << 10);
}

#[test]
fn an_invalid_duration_is_refused_naming_the_key() {
    for (section, key, value) in [
        ("routing", "secondary_wait", "soon"),
        ("retry", "max_backoff", "30 parsecs"),
        ("server", "request_timeout", "30"),
    ] {
        let text = if section == "server" {
            BASE.replace(
                "listen = \"127.0.0.1:18080\"",
                &format!("listen = \"127.0.0.1:18080\"\n{key} = {value:?}"),
            )
        } else {
            format!("{BASE}\n[{section}]\n{key} = {value:?}\n")
        };
        let line = one_problem(&text);
        assert!(line.starts_with(&format!("{section}.{key}: ")), "{line}");
    }
}

#[test]
fn an_invalid_size_is_refused_naming_the_key() {
    let line = one_problem(&BASE.replace(
        "dir = \"/var/lib/forkd-test/spool\"",
        "dir = \"/var/lib/forkd-test/spool\"\nmax_size = \"lots\"",
    ));
    assert!(line.starts_with("buffer.max_size: "), "{line}");

    let line = one_problem(&BASE.replace(
        "listen = \"127.0.0.1:18080\"",
        "listen = \"127.0.0.1:18080\"\nmax_body_size = \"16 MiBs\"",
    ));
    assert!(line.starts_with("server.max_body_size: "), "{line}");
}

#[test]
fn an_invalid_fsync_policy_is_refused_naming_the_key() {
    let line = one_problem(&BASE.replace(
        "dir = \"/var/lib/forkd-test/spool\"",
        "dir = \"/var/lib/forkd-test/spool\"\nfsync = \"sometimes\"",
    ));
    assert!(line.starts_with("buffer.fsync: "), "{line}");
}

#[test]
fn a_buffer_max_size_below_one_mib_is_refused() {
    let line = one_problem(&BASE.replace(
        "dir = \"/var/lib/forkd-test/spool\"",
        "dir = \"/var/lib/forkd-test/spool\"\nmax_size = \"1023KiB\"",
    ));
    assert!(line.starts_with("buffer.max_size: "), "{line}");

    let line = one_problem(&format!(
        "{BASE}\n[targets.backup.buffer]\nmax_size = \"100KiB\"\n"
    ));
    assert!(
        line.starts_with("targets.backup.buffer.max_size: "),
        "{line}"
    );

    load_toml(&BASE.replace(
        "dir = \"/var/lib/forkd-test/spool\"",
        "dir = \"/var/lib/forkd-test/spool\"\nmax_size = \"1MiB\"",
    ))
    .unwrap();
}

// ---------------------------------------------------------------- buffer overrides and defaults

#[test]
fn a_per_target_buffer_override_applies_to_that_target_only() {
    let c = load_toml(&format!(
        "{}\nmax_size = \"100MiB\"\nfsync = \"always\"\n\n[targets.backup.buffer]\nmax_size = \"5MiB\"\nfsync = \"never\"\ndrain_concurrency = 8\nwhen_full = \"drop_newest\"\n",
        BASE.trim_end()
    ))
    .unwrap();
    let primary = c.target("primary").unwrap();
    let backup = c.target("backup").unwrap();
    assert_eq!(primary.spool.max_size, 100 * MIB);
    assert_eq!(primary.spool.fsync, FsyncPolicy::Always);
    assert_eq!(primary.drain_concurrency, 1);
    assert_eq!(primary.spool.when_full, WhenFull::Reject);
    assert_eq!(backup.spool.max_size, 5 * MIB);
    assert_eq!(backup.spool.fsync, FsyncPolicy::Never);
    assert_eq!(backup.drain_concurrency, 8);
    assert_eq!(backup.spool.when_full, WhenFull::DropNewest);
}

#[test]
fn dir_is_not_allowed_in_a_target_buffer() {
    let line = one_problem(&format!(
        "{BASE}\n[targets.backup.buffer]\ndir = \"/tmp/elsewhere\"\n"
    ));
    assert!(line.starts_with("targets.backup.buffer.dir: "), "{line}");
    assert!(line.contains("unknown field"), "{line}");
}

#[test]
fn when_full_defaults_to_reject_for_the_active_target_and_drop_oldest_for_others() {
    let c = load_toml(&format!(
        "{BASE}\n[targets.third]\nurl = \"http://127.0.0.1:19003\"\n"
    ))
    .unwrap();
    assert_eq!(
        c.target("primary").unwrap().spool.when_full,
        WhenFull::Reject
    );
    assert_eq!(
        c.target("backup").unwrap().spool.when_full,
        WhenFull::DropOldest
    );
    assert_eq!(
        c.target("third").unwrap().spool.when_full,
        WhenFull::DropOldest
    );
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);

    let c = load_toml(&format!(
        "{BASE}\n[routing]\nmode = \"active-passive\"\nactive = \"backup\"\n"
    ))
    .unwrap();
    assert_eq!(
        c.target("primary").unwrap().spool.when_full,
        WhenFull::DropOldest
    );
    assert_eq!(
        c.target("backup").unwrap().spool.when_full,
        WhenFull::Reject
    );
}

#[test]
fn buffer_when_full_applies_to_every_target_that_does_not_override_it() {
    let c = load_toml(&format!(
        "{}\nwhen_full = \"drop_newest\"\n",
        BASE.trim_end()
    ))
    .unwrap();
    for t in &c.targets {
        assert_eq!(t.spool.when_full, WhenFull::DropNewest, "{}", t.name);
    }
}

#[test]
fn reject_on_a_secondary_target_in_active_active_is_a_warning() {
    let c = load_toml(&format!(
        "{BASE}\n[targets.backup.buffer]\nwhen_full = \"reject\"\n"
    ))
    .unwrap();
    assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
    assert!(
        c.warnings[0].starts_with("targets.backup: "),
        "{:?}",
        c.warnings
    );
    assert!(c.warnings[0].contains("reject"), "{:?}", c.warnings);

    // From [buffer] it concerns every secondary target, not the active one.
    let c = load_toml(&format!("{}\nwhen_full = \"reject\"\n", BASE.trim_end())).unwrap();
    assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
    assert!(
        c.warnings[0].starts_with("targets.backup: "),
        "{:?}",
        c.warnings
    );

    // In active-passive a secondary target gets no new requests: no warning.
    let c = load_toml(&format!(
        "{BASE}\n[routing]\nmode = \"active-passive\"\n[targets.backup.buffer]\nwhen_full = \"reject\"\n"
    ))
    .unwrap();
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
}

// ---------------------------------------------------------------- redaction

#[test]
fn normalized_redacted_hides_every_secret() {
    let c = load_toml(FULL_TOML).unwrap();
    let out = c.normalized_redacted();
    for secret in [
        "primary-secret",
        "acme",
        "ingest-secret",
        "admin-secret",
        "primary-sas",
        "sig=",
    ] {
        assert!(!out.contains(secret), "{secret:?} shows in:\n{out}");
    }
    assert!(out.contains(REDACTED), "{out}");
    // Header names stay, their values do not.
    assert!(out.contains("Authorization"), "{out}");
    assert!(out.contains("X-Tenant"), "{out}");
}

#[test]
fn normalized_redacted_shows_everything_else() {
    let c = load_toml(FULL_TOML).unwrap();
    let out = c.normalized_redacted();
    for shown in [
        "127.0.0.1:18080",
        "127.0.0.1:19464",
        "active-passive",
        "http://127.0.0.1:19001/ingest?",
        "http://127.0.0.1:19002",
        "/var/lib/forkd-test/spool",
        "drop_newest",
        "PATCH",
        "250ms",
        "debug",
    ] {
        assert!(out.contains(shown), "{shown:?} missing from:\n{out}");
    }
    // It is TOML, with the defaults filled in.
    let parsed: toml::Table = out.parse().unwrap();
    assert_eq!(
        parsed["server"]["max_connections"].as_integer(),
        Some(10_000)
    );
    assert_eq!(parsed["targets"]["backup"]["timeout"].as_str(), Some("10s"));
}

#[test]
fn normalized_output_without_secrets_loads_back_to_the_same_config() {
    let files = Files::new();
    let original = load_env(&files.write("a.toml", BASE), &[]).unwrap();
    let normalized = original.normalized_redacted();
    let reloaded = load_env(&files.write("b.toml", &normalized), &[]).unwrap();
    assert_eq!(original, reloaded, "{normalized}");
}

// ---------------------------------------------------------------- shipped configs

#[test]
fn the_shipped_active_active_config_is_valid() {
    let c = load_env(&repo_file("config/forkd.toml"), &[]).unwrap();
    assert_eq!(c.raw.routing.mode, Mode::ActiveActive);
    assert_eq!(c.targets.len(), 2);
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
}

#[test]
fn the_shipped_active_passive_config_is_valid() {
    let c = load_env(&repo_file("config/active-passive.toml"), &[]).unwrap();
    assert_eq!(c.raw.routing.mode, Mode::ActivePassive);
    assert_eq!(c.raw.routing.active, "primary");
    assert_eq!(c.targets.len(), 2);
}

#[test]
fn the_shipped_config_states_every_default() {
    // config/forkd.toml says "every key is shown with its default".
    let files = Files::new();
    let shipped = load_env(&repo_file("config/forkd.toml"), &[]).unwrap();
    let minimal = load_env(
        &files.write(
            "min.toml",
            "[server]\nlisten = \"127.0.0.1:8080\"\n[targets.primary]\nurl = \"http://127.0.0.1:19001\"\n[targets.backup]\nurl = \"http://127.0.0.1:19002\"\n",
        ),
        &[],
    )
    .unwrap();
    assert_eq!(shipped.targets, minimal.targets);
    assert_eq!(shipped.raw.server, minimal.raw.server);
    assert_eq!(shipped.raw.routing, minimal.raw.routing);
    assert_eq!(shipped.raw.retry, minimal.raw.retry);
    assert_eq!(shipped.raw.admin, minimal.raw.admin);
    assert_eq!(shipped.raw.log, minimal.raw.log);
}
