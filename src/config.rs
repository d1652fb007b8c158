//! Configuration: load (TOML, YAML or JSON by extension, `FORKD__SECTION__KEY`
//! environment overrides, `${VAR}` interpolation), validate, normalize, redact.
//!
//! Loading is two steps. [`RawConfig`] is what the file says, deserialized with
//! unknown keys rejected. [`RawConfig::validate`] checks every rule and reports
//! every problem at once, one line each, naming the key; only then is a
//! [`Config`] built, so the rest of the daemon never sees an invalid value.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytesize::ByteSize;
use http::{HeaderName, HeaderValue, Method, Uri};
use serde::{Deserialize, Serialize};

use crate::spool::{FsyncPolicy, SpoolOptions, WhenFull};

/// Environment variable prefix for overrides: `FORKD__SERVER__LISTEN`.
pub const ENV_PREFIX: &str = "FORKD";
/// Separator between levels in override names.
pub const ENV_SEPARATOR: &str = "__";
/// Smallest `buffer.max_size` accepted.
pub const MIN_BUFFER_SIZE: u64 = 1 << 20;
/// Largest body a spool record can hold.
pub const MAX_BODY_LIMIT: u64 = 1 << 30;
/// Text that replaces secret values in `forkd check` output.
pub const REDACTED: &str = "<redacted>";

/// Failure to load or validate a config: every problem, one line each.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", problems.join("\n"))]
pub struct ConfigError {
    pub problems: Vec<String>,
}

impl ConfigError {
    fn one(problem: impl Into<String>) -> Self {
        ConfigError {
            problems: vec![problem.into()],
        }
    }
}

/// `[server]`
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: String,
    #[serde(deserialize_with = "lenient::strings")]
    pub methods: Vec<String>,
    pub max_body_size: ByteSize,
    pub max_inflight_bytes: ByteSize,
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Time allowed for a client to send a request's headers; a keep-alive
    /// connection idle this long between requests is closed too.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Client connections served at once; more wait in the kernel's backlog.
    #[serde(deserialize_with = "lenient::usize")]
    pub max_connections: usize,
    /// How long shutdown waits for in-flight requests.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    pub tls: Option<TlsConfig>,
    #[serde(deserialize_with = "lenient::strings")]
    pub auth_tokens: Vec<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "0.0.0.0:8080".into(),
            methods: vec!["POST".into(), "PUT".into()],
            max_body_size: ByteSize::mib(16),
            max_inflight_bytes: ByteSize::mib(256),
            request_timeout: Duration::from_secs(30),
            header_read_timeout: Duration::from_secs(10),
            max_connections: 10_000,
            shutdown_timeout: Duration::from_secs(30),
            tls: None,
            auth_tokens: Vec::new(),
        }
    }
}

/// `[server.tls]`
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// `[admin]`
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub listen: String,
    pub token: Option<String>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: "127.0.0.1:9464".into(),
            token: None,
        }
    }
}

/// `[log]`
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub level: String,
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

/// `routing.mode`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    ActiveActive,
    ActivePassive,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::ActiveActive => "active-active",
            Mode::ActivePassive => "active-passive",
        })
    }
}

/// `[routing]`
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    pub mode: Mode,
    pub active: String,
    #[serde(with = "humantime_serde")]
    pub secondary_wait: Duration,
    #[serde(deserialize_with = "lenient::u16")]
    pub spooled_status: u16,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            mode: Mode::ActiveActive,
            active: "primary".into(),
            secondary_wait: Duration::from_secs(1),
            spooled_status: 202,
        }
    }
}

/// Default `retry_statuses`: transient answers that are spooled and retried.
pub const DEFAULT_RETRY_STATUSES: [u16; 9] = [401, 403, 404, 408, 429, 500, 502, 503, 504];

/// `[targets.<name>]`
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    pub url: String,
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(
        default = "default_retry_statuses",
        deserialize_with = "lenient::statuses"
    )]
    pub retry_statuses: Vec<u16>,
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    #[serde(default)]
    pub buffer: BufferOverride,
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(3)
}
fn default_retry_statuses() -> Vec<u16> {
    DEFAULT_RETRY_STATUSES.to_vec()
}

/// `[buffer]`: defaults for every target's spool.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BufferConfig {
    pub dir: PathBuf,
    pub max_size: ByteSize,
    /// Unset: `reject` for the active target, `drop_oldest` for the others.
    pub when_full: Option<WhenFull>,
    pub fsync: FsyncPolicy,
    #[serde(deserialize_with = "lenient::usize")]
    pub drain_concurrency: usize,
    pub segment_size: ByteSize,
    pub rejected_max_size: ByteSize,
}

impl Default for BufferConfig {
    fn default() -> Self {
        BufferConfig {
            dir: PathBuf::from("/var/lib/forkd/spool"),
            max_size: ByteSize::gib(1),
            when_full: None,
            fsync: FsyncPolicy::Always,
            drain_concurrency: 1,
            segment_size: ByteSize::mib(64),
            rejected_max_size: ByteSize::mib(64),
        }
    }
}

/// `[targets.<name>.buffer]`: per-target override of any buffer key but `dir`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BufferOverride {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_size: Option<ByteSize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when_full: Option<WhenFull>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fsync: Option<FsyncPolicy>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "lenient::some_usize"
    )]
    pub drain_concurrency: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segment_size: Option<ByteSize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected_max_size: Option<ByteSize>,
}

/// `[retry]`
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    #[serde(with = "humantime_serde")]
    pub initial_backoff: Duration,
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(30),
        }
    }
}

/// The config file as written (after overrides and interpolation).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub routing: RoutingConfig,
    #[serde(default)]
    pub targets: BTreeMap<String, TargetConfig>,
    #[serde(default)]
    pub buffer: BufferConfig,
    #[serde(default)]
    pub retry: RetryConfig,
}

/// A validated target.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub name: String,
    /// Target URL without its query string.
    pub base: Uri,
    /// Query parameters of the target URL, applied at every send.
    pub query: Vec<(String, String)>,
    pub timeout: Duration,
    pub connect_timeout: Duration,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub retry_statuses: Vec<u16>,
    pub ca_file: Option<PathBuf>,
    /// Certificates of `ca_file`, trusted in addition to the system's roots.
    pub ca_certs: Vec<rustls::pki_types::CertificateDer<'static>>,
    /// Spool options; `spool.when_full` is resolved for the configured active target.
    pub spool: SpoolOptions,
    /// `when_full` as written (target override, else `[buffer]`); unset means
    /// by role: `reject` for the active target, `drop_oldest` for the others.
    pub when_full: Option<WhenFull>,
    pub drain_concurrency: usize,
}

impl Target {
    /// The `when_full` policy for this target in a role.
    pub fn when_full_for(&self, is_active: bool) -> WhenFull {
        self.when_full.unwrap_or(if is_active {
            WhenFull::Reject
        } else {
            WhenFull::DropOldest
        })
    }

    /// The URL as shown in `/status` and logs: no query string (it may hold credentials).
    pub fn display_url(&self) -> String {
        self.base.to_string()
    }
}

/// A validated config: the only form the daemon runs on.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub raw: RawConfig,
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub methods: Vec<Method>,
    /// Targets in name order.
    pub targets: Vec<Target>,
    /// Warnings found while validating (printed by `check`, logged by `run`).
    pub warnings: Vec<String>,
}

impl Config {
    /// Loads, interpolates, overrides and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::load_with_env(path, |name| std::env::var(name).ok(), std::env::vars())
    }

    /// [`Config::load`] with the environment passed in (for tests).
    pub fn load_with_env(
        path: &Path,
        lookup: impl Fn(&str) -> Option<String>,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let raw = RawConfig::load_with_env(path, lookup, vars)?;
        raw.validate()
    }

    /// Parses and validates a config text (see [`RawConfig::from_text`]).
    pub fn from_text(
        text: &str,
        format: ConfigFormat,
        lookup: impl Fn(&str) -> Option<String>,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        RawConfig::from_text(text, format, "config", lookup, vars)?.validate()
    }

    pub fn target(&self, name: &str) -> Option<&Target> {
        self.targets.iter().find(|t| t.name == name)
    }

    /// The config as `check` prints it: defaults filled in, secrets redacted.
    pub fn normalized_redacted(&self) -> String {
        let mut raw = self.raw.clone();
        for t in raw.targets.values_mut() {
            for v in t.headers.values_mut() {
                *v = REDACTED.into();
            }
            t.url = redact_url_query(&t.url);
        }
        for tok in &mut raw.server.auth_tokens {
            *tok = REDACTED.into();
        }
        if raw.admin.token.is_some() {
            raw.admin.token = Some(REDACTED.into());
        }
        toml::to_string(&raw).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

/// Replaces the query string of a URL (which may hold a SAS token or key) with `<redacted>`.
pub fn redact_url_query(url: &str) -> String {
    match url.split_once('?') {
        Some((base, _)) => format!("{base}?{REDACTED}"),
        None => url.to_owned(),
    }
}

/// The syntax of a config text, picked from the file's extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigFormat {
    Toml,
    Yaml,
    Json,
}

impl ConfigFormat {
    /// `.toml` (or no extension), `.yaml`/`.yml`, `.json`; `None` for anything else.
    pub fn from_path(path: &Path) -> Option<Self> {
        match path.extension().and_then(|e| e.to_str()) {
            Some("toml") | None => Some(ConfigFormat::Toml),
            Some("yaml" | "yml") => Some(ConfigFormat::Yaml),
            Some("json") => Some(ConfigFormat::Json),
            Some(_) => None,
        }
    }

    fn file_format(self) -> config::FileFormat {
        match self {
            ConfigFormat::Toml => config::FileFormat::Toml,
            ConfigFormat::Yaml => config::FileFormat::Yaml,
            ConfigFormat::Json => config::FileFormat::Json,
        }
    }
}

impl RawConfig {
    /// Reads the file with environment overrides and `${VAR}` interpolation.
    pub fn load_with_env(
        path: &Path,
        lookup: impl Fn(&str) -> Option<String>,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<RawConfig, ConfigError> {
        let Some(format) = ConfigFormat::from_path(path) else {
            let ext = path
                .extension()
                .map(|e| e.to_string_lossy().into_owned())
                .unwrap_or_default();
            return Err(ConfigError::one(format!(
                "{}: unknown config format {ext:?} (use .toml, .yaml or .json)",
                path.display()
            )));
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::one(format!("{}: {e}", path.display())))?;
        Self::from_text(&text, format, &path.display().to_string(), lookup, vars)
    }

    /// Parses a config text with environment overrides and `${VAR}`
    /// interpolation, as [`RawConfig::load_with_env`] does for a file;
    /// `origin` names the text in error messages.
    pub fn from_text(
        text: &str,
        format: ConfigFormat,
        origin: &str,
        lookup: impl Fn(&str) -> Option<String>,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<RawConfig, ConfigError> {
        let overrides: config::Map<String, String> = vars
            .into_iter()
            .filter_map(|(k, v)| {
                let rest = k.strip_prefix(ENV_PREFIX)?.strip_prefix(ENV_SEPARATOR)?;
                (!rest.is_empty()).then(|| (rest.to_owned(), v))
            })
            .collect();
        // Override values stay strings: guessing types here would turn a token
        // such as "007" into the number 7. Numeric and list keys accept strings
        // when deserialized (see `lenient`).
        let env = config::Environment::default()
            .separator(ENV_SEPARATOR)
            .try_parsing(false)
            .source(Some(overrides));
        let built = config::Config::builder()
            .add_source(config::File::from_str(text, format.file_format()))
            .add_source(env)
            .build()
            .map_err(|e| ConfigError::one(format!("{origin}: {e}")))?;
        let mut value: serde_json::Value = built
            .try_deserialize()
            .map_err(|e| ConfigError::one(format!("{origin}: {e}")))?;
        let mut problems = Vec::new();
        interpolate(&mut value, &lookup, String::new(), &mut problems);
        if !problems.is_empty() {
            return Err(ConfigError { problems });
        }
        serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            ConfigError::one(if path == "." {
                inner.to_string()
            } else {
                format!("{path}: {inner}")
            })
        })
    }

    /// Checks every rule; returns every problem, one line each, naming the key.
    pub fn validate(self) -> Result<Config, ConfigError> {
        let mut p = Vec::new();
        let mut warnings = Vec::new();
        let listen = parse_addr(&self.server.listen, "server.listen", &mut p);
        let admin_listen = parse_addr(&self.admin.listen, "admin.listen", &mut p);
        if let (Some(a), Some(b)) = (listen, admin_listen)
            && a == b
            && a.port() != 0
        {
            p.push("admin.listen: must differ from server.listen".into());
        }
        let mut methods = Vec::new();
        for (i, m) in self.server.methods.iter().enumerate() {
            match Method::from_bytes(m.as_bytes()) {
                Ok(method) if method == Method::GET || method == Method::HEAD => p.push(format!(
                    "server.methods[{i}]: {m} is always proxied to the active target, not forked; remove it"
                )),
                Ok(method) if m.bytes().all(|b| b.is_ascii_uppercase()) => methods.push(method),
                _ => p.push(format!("server.methods[{i}]: {m:?} is not an upper-case HTTP method")),
            }
        }
        if methods.is_empty() && self.server.methods.is_empty() {
            p.push("server.methods: must name at least one method".into());
        }
        let max_body = self.server.max_body_size.as_u64();
        let inflight = self.server.max_inflight_bytes.as_u64();
        if max_body == 0 {
            p.push("server.max_body_size: must be above zero".into());
        }
        if max_body > MAX_BODY_LIMIT {
            p.push(format!(
                "server.max_body_size: at most {}",
                ByteSize::b(MAX_BODY_LIMIT).display().iec()
            ));
        }
        if inflight < max_body {
            p.push("server.max_inflight_bytes: must be at least server.max_body_size".into());
        }
        for (key, d) in [
            ("server.request_timeout", self.server.request_timeout),
            (
                "server.header_read_timeout",
                self.server.header_read_timeout,
            ),
        ] {
            if d.is_zero() {
                p.push(format!("{key}: must be above zero"));
            }
        }
        if self.server.max_connections == 0 {
            p.push("server.max_connections: must be above zero".into());
        }
        if let Some(tls) = &self.server.tls {
            if let Err(e) = crate::tls::load_certs(&tls.cert) {
                p.push(format!("server.tls.cert: {e}"));
            } else if let Err(e) = crate::tls::load_key(&tls.key) {
                p.push(format!("server.tls.key: {e}"));
            } else if let Err(e) = crate::tls::server_config(tls) {
                p.push(format!("server.tls: {e}"));
            }
        }
        // A presented token is trimmed (header values are), so one with
        // spaces around it could never match: every request would be refused.
        let token_ok = |t: &str| {
            !t.is_empty() && t.trim() == t && HeaderValue::from_str(&format!("Bearer {t}")).is_ok()
        };
        for (i, t) in self.server.auth_tokens.iter().enumerate() {
            if !token_ok(t) {
                p.push(format!(
                    "server.auth_tokens[{i}]: must be a non-empty header-safe string without \
                     spaces around it"
                ));
            }
        }
        if let Some(tok) = &self.admin.token
            && !token_ok(tok)
        {
            p.push(
                "admin.token: must be a non-empty header-safe string without spaces around it \
                 (remove the key to disable it)"
                    .into(),
            );
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            p.push(format!("log.level: {e}"));
        }
        if !(200..=299).contains(&self.routing.spooled_status) {
            p.push(format!(
                "routing.spooled_status: {} is not a 2xx status",
                self.routing.spooled_status
            ));
        }
        if self.targets.is_empty() {
            p.push("targets: at least one target is needed".into());
        } else if !self.targets.contains_key(&self.routing.active) {
            p.push(format!(
                "routing.active: {:?} is not a configured target (have: {})",
                self.routing.active,
                self.targets.keys().cloned().collect::<Vec<_>>().join(", ")
            ));
        }
        if self.retry.initial_backoff.is_zero() {
            p.push("retry.initial_backoff: must be above zero".into());
        }
        if self.retry.max_backoff < self.retry.initial_backoff {
            p.push("retry.max_backoff: must be at least retry.initial_backoff".into());
        }
        if self.buffer.dir.as_os_str().is_empty() {
            p.push("buffer.dir: must be set".into());
        }
        check_buffer_values(
            "buffer",
            Some(self.buffer.max_size.as_u64()),
            Some(self.buffer.drain_concurrency),
            Some(self.buffer.segment_size.as_u64()),
            Some(self.buffer.rejected_max_size.as_u64()),
            &mut p,
        );
        let mut targets = Vec::new();
        for (name, t) in &self.targets {
            let key = format!("targets.{name}");
            if !valid_target_name(name) {
                p.push(format!(
                    "{key}: target names must match [a-z][a-z0-9_-]{{0,31}}"
                ));
            }
            let is_active = *name == self.routing.active;
            if let Some(target) =
                self.validate_target(name, t, is_active, &key, &mut p, &mut warnings)
            {
                targets.push(target);
            }
        }
        if !p.is_empty() {
            return Err(ConfigError { problems: p });
        }
        let (Some(listen), Some(admin_listen)) = (listen, admin_listen) else {
            return Err(ConfigError::one("server.listen: invalid"));
        };
        Ok(Config {
            raw: self,
            listen,
            admin_listen,
            methods,
            targets,
            warnings,
        })
    }

    fn validate_target(
        &self,
        name: &str,
        t: &TargetConfig,
        is_active: bool,
        key: &str,
        p: &mut Vec<String>,
        warnings: &mut Vec<String>,
    ) -> Option<Target> {
        let before = p.len();
        let (base, query) = match parse_target_url(&t.url) {
            Ok(v) => v,
            Err(e) => {
                p.push(format!("{key}.url: {e}"));
                (Uri::default(), Vec::new())
            }
        };
        if t.timeout.is_zero() {
            p.push(format!("{key}.timeout: must be above zero"));
        }
        if t.connect_timeout.is_zero() {
            p.push(format!("{key}.connect_timeout: must be above zero"));
        }
        let mut headers = Vec::new();
        for (hn, hv) in &t.headers {
            match (
                HeaderName::from_bytes(hn.as_bytes()),
                HeaderValue::from_str(hv),
            ) {
                (Ok(n), Ok(v)) => {
                    // A second Content-Length makes the request invalid, a
                    // second X-Request-Id defeats a target's duplicate check.
                    if crate::proxy_headers::set_by_forkd(&n) {
                        p.push(format!("{key}.headers.{hn}: forkd sets this header itself"));
                    } else {
                        headers.push((n, v));
                    }
                }
                (Err(_), _) => p.push(format!("{key}.headers.{hn}: not a valid header name")),
                (_, Err(_)) => p.push(format!(
                    "{key}.headers.{hn}: value is not a valid header value"
                )),
            }
        }
        for (i, s) in t.retry_statuses.iter().enumerate() {
            if !(100..=599).contains(s) || (200..=299).contains(s) {
                p.push(format!(
                    "{key}.retry_statuses[{i}]: {s} is not a non-2xx HTTP status"
                ));
            }
        }
        let mut ca_certs = Vec::new();
        if let Some(ca) = &t.ca_file {
            match crate::tls::load_certs(ca).and_then(|certs| {
                crate::tls::client_config(&certs)?;
                Ok(certs)
            }) {
                Ok(certs) => ca_certs = certs,
                Err(e) => p.push(format!("{key}.ca_file: {e}")),
            }
        }
        let b = &self.buffer;
        let o = &t.buffer;
        let max_size = o.max_size.unwrap_or(b.max_size).as_u64();
        let when_full = o.when_full.or(b.when_full).unwrap_or(if is_active {
            WhenFull::Reject
        } else {
            WhenFull::DropOldest
        });
        let fsync = o.fsync.unwrap_or(b.fsync);
        let drain_concurrency = o.drain_concurrency.unwrap_or(b.drain_concurrency);
        let segment_size = o.segment_size.unwrap_or(b.segment_size).as_u64();
        let rejected_max_size = o.rejected_max_size.unwrap_or(b.rejected_max_size).as_u64();
        // The [buffer] defaults are checked once, in `validate`; only the
        // overrides this target sets are checked here, under its own key.
        check_buffer_values(
            &format!("{key}.buffer"),
            o.max_size.map(|v| v.as_u64()),
            o.drain_concurrency,
            o.segment_size.map(|v| v.as_u64()),
            o.rejected_max_size.map(|v| v.as_u64()),
            p,
        );
        if when_full == WhenFull::Reject && !is_active && self.routing.mode == Mode::ActiveActive {
            warnings.push(format!(
                "{key}: when_full = \"reject\" on a secondary target: a full backup spool makes clients get 503"
            ));
        }
        if p.len() > before {
            return None;
        }
        Some(Target {
            name: name.to_owned(),
            base,
            query,
            timeout: t.timeout,
            connect_timeout: t.connect_timeout,
            headers,
            retry_statuses: t.retry_statuses.clone(),
            ca_file: t.ca_file.clone(),
            ca_certs,
            spool: SpoolOptions {
                max_size,
                segment_size,
                when_full,
                fsync,
                rejected_max_size,
                ..SpoolOptions::default()
            },
            when_full: o.when_full.or(b.when_full),
            drain_concurrency,
        })
    }
}

/// Checks the buffer values that are set, naming them under `prefix`
/// (`buffer` or `targets.<name>.buffer`).
fn check_buffer_values(
    prefix: &str,
    max_size: Option<u64>,
    drain_concurrency: Option<usize>,
    segment_size: Option<u64>,
    rejected_max_size: Option<u64>,
    p: &mut Vec<String>,
) {
    if max_size.is_some_and(|v| v < MIN_BUFFER_SIZE) {
        p.push(format!("{prefix}.max_size: at least 1MiB"));
    }
    if drain_concurrency.is_some_and(|v| !(1..=1024).contains(&v)) {
        p.push(format!(
            "{prefix}.drain_concurrency: must be between 1 and 1024"
        ));
    }
    if segment_size.is_some_and(|v| v < crate::spool::MIN_SEGMENT_SIZE) {
        p.push(format!("{prefix}.segment_size: at least 64KiB"));
    }
    if rejected_max_size == Some(0) {
        p.push(format!("{prefix}.rejected_max_size: must be above zero"));
    }
}

/// True when `name` matches `[a-z][a-z0-9_-]{0,31}`.
pub fn valid_target_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 32
        && b[0].is_ascii_lowercase()
        && b[1..]
            .iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_' || *c == b'-')
}

fn parse_addr(s: &str, key: &str, p: &mut Vec<String>) -> Option<SocketAddr> {
    match s.parse() {
        Ok(a) => Some(a),
        Err(_) => {
            p.push(format!(
                "{key}: {s:?} is not an address such as \"0.0.0.0:8080\""
            ));
            None
        }
    }
}

/// Splits a target URL into its base (no query) and its query parameters.
pub fn parse_target_url(url: &str) -> Result<(Uri, Vec<(String, String)>), String> {
    let uri: Uri = url
        .parse()
        .map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err(format!("{url:?}: scheme must be http or https")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("{url:?}: has no host"));
    }
    // It would reach the target as its Host header (and its logs); a
    // target's credentials go in `headers` or the URL's query.
    if let Some((_, host)) = uri.authority().and_then(|a| a.as_str().rsplit_once('@')) {
        return Err(format!(
            "\"{}://{REDACTED}@{host}\": must not have user info (user@); use `headers` for credentials",
            uri.scheme_str().unwrap_or("http")
        ));
    }
    if url.contains('#') {
        return Err(format!("{url:?}: must not have a fragment"));
    }
    let query = uri
        .query()
        .map(|q| {
            q.split('&')
                .filter(|kv| !kv.is_empty())
                .map(|kv| match kv.split_once('=') {
                    Some((k, v)) => (k.to_owned(), v.to_owned()),
                    None => (kv.to_owned(), String::new()),
                })
                .collect()
        })
        .unwrap_or_default();
    let mut parts = uri.into_parts();
    let path = parts
        .path_and_query
        .as_ref()
        .map(|pq| pq.path().trim_end_matches('/').to_owned())
        .unwrap_or_default();
    parts.path_and_query = Some(
        (if path.is_empty() {
            "/".to_owned()
        } else {
            path
        })
        .parse()
        .map_err(|e| format!("{url:?}: {e}"))?,
    );
    let base = Uri::from_parts(parts).map_err(|e| format!("{url:?}: {e}"))?;
    Ok((base, query))
}

/// Replaces `${NAME}` in every string value; an unset variable is a problem.
fn interpolate(
    v: &mut serde_json::Value,
    lookup: &impl Fn(&str) -> Option<String>,
    key: String,
    problems: &mut Vec<String>,
) {
    match v {
        serde_json::Value::String(s) if s.contains("${") => match interpolate_str(s, lookup) {
            Ok(out) => *s = out,
            Err(e) => problems.push(format!("{key}: {e}")),
        },
        serde_json::Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                interpolate(item, lookup, format!("{key}[{i}]"), problems);
            }
        }
        serde_json::Value::Object(map) => {
            for (k, item) in map.iter_mut() {
                let child = if key.is_empty() {
                    k.clone()
                } else {
                    format!("{key}.{k}")
                };
                interpolate(item, lookup, child, problems);
            }
        }
        _ => {}
    }
}

/// Expands `${NAME}` references in one string.
pub fn interpolate_str(
    s: &str,
    lookup: &impl Fn(&str) -> Option<String>,
) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            return Err("unterminated ${ in value".into());
        };
        let name = &after[..end];
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(format!("${{{name}}} is not a valid variable reference"));
        }
        match lookup(name) {
            Some(val) => out.push_str(&val),
            None => return Err(format!("environment variable {name} is not set")),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Deserializers for numeric and list keys that also take the strings an
/// environment override gives (`FORKD__ROUTING__SPOOLED_STATUS=200`,
/// `FORKD__SERVER__METHODS=POST,PUT`).
mod lenient {
    use std::fmt;
    use std::marker::PhantomData;

    use serde::de::{self, Deserializer, SeqAccess, Unexpected, Visitor};

    struct Int<T> {
        max: u64,
        _t: PhantomData<T>,
    }

    impl<'de, T: TryFrom<u64>> Visitor<'de> for Int<T> {
        type Value = T;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "an integer from 0 to {}", self.max)
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
            if v > self.max {
                return Err(E::invalid_value(Unexpected::Unsigned(v), &self));
            }
            T::try_from(v).map_err(|_| E::invalid_value(Unexpected::Unsigned(v), &self))
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
            match u64::try_from(v) {
                Ok(u) => self.visit_u64(u),
                Err(_) => Err(E::invalid_value(Unexpected::Signed(v), &self)),
            }
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
            match v.trim().parse::<u64>() {
                Ok(u) => self.visit_u64(u),
                Err(_) => Err(E::invalid_value(Unexpected::Str(v), &self)),
            }
        }
    }

    fn int<'de, D: Deserializer<'de>, T: TryFrom<u64>>(d: D, max: u64) -> Result<T, D::Error> {
        d.deserialize_any(Int {
            max,
            _t: PhantomData,
        })
    }

    pub fn u16<'de, D: Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
        int(d, u64::from(u16::MAX))
    }

    pub fn usize<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
        int(d, u64::try_from(usize::MAX).unwrap_or(u64::MAX))
    }

    pub fn some_usize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
        usize(d).map(Some)
    }

    /// A `u16` element of a list.
    struct Status(u16);

    impl<'de> de::Deserialize<'de> for Status {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            u16(d).map(Status)
        }
    }

    struct List<T>(PhantomData<T>);

    impl<'de> Visitor<'de> for List<String> {
        type Value = Vec<String>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a list of strings, or one string of comma-separated values")
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Vec<String>, E> {
            Ok(split(v).map(str::to_owned).collect())
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<String>, A::Error> {
            let mut out = Vec::new();
            while let Some(s) = seq.next_element::<String>()? {
                out.push(s);
            }
            Ok(out)
        }
    }

    impl<'de> Visitor<'de> for List<u16> {
        type Value = Vec<u16>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a list of HTTP statuses, or one string of comma-separated statuses")
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Vec<u16>, E> {
            split(v)
                .map(|s| {
                    s.parse::<u16>()
                        .map_err(|_| E::invalid_value(Unexpected::Str(s), &self))
                })
                .collect()
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u16>, A::Error> {
            let mut out = Vec::new();
            while let Some(Status(s)) = seq.next_element::<Status>()? {
                out.push(s);
            }
            Ok(out)
        }
    }

    fn split(v: &str) -> impl Iterator<Item = &str> {
        v.split(',').map(str::trim).filter(|s| !s.is_empty())
    }

    pub fn strings<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
        d.deserialize_any(List::<String>(PhantomData))
    }

    pub fn statuses<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u16>, D::Error> {
        d.deserialize_any(List::<u16>(PhantomData))
    }
}
