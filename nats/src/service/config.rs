//! Layered configuration: defaults, then the `CONV_CONFIG` TOML file, then
//! environment variables, validated at start.

use std::net::SocketAddr;
use std::path::Path;
use std::str::FromStr;

use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::connect::NatsConfig;
use crate::topology::TopologyConfig;

/// Env var naming an optional TOML config file.
pub const CONFIG_FILE_ENV: &str = "CONV_CONFIG";

/// Why configuration was refused at start.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("config file {path} is invalid: {detail}")]
    Parse { path: String, detail: String },
    /// The value is not repeated: it may be a secret.
    #[error("environment variable {var} is invalid: {detail}")]
    Env { var: String, detail: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// A setting that cannot be used, and why (for the operator; no value is
/// repeated that could be a secret).
pub use conv_contracts::Invalid;

impl From<Invalid> for ConfigError {
    fn from(e: Invalid) -> Self {
        ConfigError::Invalid(e.0)
    }
}

/// Log output format. Env override: `CONV_LOG_FORMAT` (`pretty` or `json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Pretty,
    Json,
}

impl FromStr for LogFormat {
    type Err = Invalid;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "pretty" | "text" => Ok(LogFormat::Pretty),
            "json" => Ok(LogFormat::Json),
            other => Err(Invalid(format!("expected `pretty` or `json`, got {other:?}"))),
        }
    }
}

/// Source of environment variables (a function so tests need not mutate the process env).
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The process environment.
pub fn process_env(var: &str) -> Option<String> {
    std::env::var(var).ok()
}

/// The environment overrides of a settings section, named after its fields:
/// `env_overrides!(env, self, "CONV_RUNTIME_": heartbeat_ms, instance)`
/// reads `CONV_RUNTIME_HEARTBEAT_MS` into `self.heartbeat_ms`, and so on
/// ([`env_override`] each, `?` on the first error).
/// `test_util::assert_every_key_has_env` checks that every field has one.
#[macro_export]
macro_rules! env_overrides {
    ($env:expr, $this:expr, $prefix:literal : $($field:ident),+ $(,)?) => {
        $(
            $crate::service::env_override(
                $env,
                &::std::format!("{}{}", $prefix, ::std::stringify!($field).to_ascii_uppercase()),
                &mut $this.$field,
            )?;
        )+
    };
}

/// Overrides `target` with the parsed value of `var` when it is set.
pub fn env_override<T: FromStr>(env: Env<'_>, var: &str, target: &mut T) -> Result<(), ConfigError>
where
    T::Err: std::fmt::Display,
{
    if let Some(value) = env(var) {
        *target = value.parse().map_err(|e: T::Err| ConfigError::Env { var: var.to_owned(), detail: e.to_string() })?;
    }
    Ok(())
}

/// Settings every service has. TOML section `[service]`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceConfig {
    /// Where `/healthz`, `/readyz`, `/metrics` (and for HTTP services the API)
    /// listen. Unset means the service's pinned default address.
    pub http_addr: Option<SocketAddr>,
    pub log_format: LogFormat,
    /// Limits of the HTTP listener (`[service.http]`).
    pub http: crate::http::HttpLimits,
    /// Trace export: from the standard `OTEL_*` variables only (off unless
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` is set).
    #[serde(skip)]
    pub telemetry: conv_telemetry::Config,
}

/// Service-specific settings: the `[options]` section of a service's
/// config file, with its own env overrides and validation.
pub trait Options: DeserializeOwned + Default + Clone + std::fmt::Debug + Send + 'static {
    /// Applies the service's own environment variables.
    fn apply_env(&mut self, env: Env<'_>) -> Result<(), ConfigError> {
        let _ = env;
        Ok(())
    }

    fn validate(&self) -> Result<(), Invalid> {
        Ok(())
    }
}

/// No service-specific settings.
impl Options for () {}

/// The sections every service's configuration file has: `[service]`,
/// `[nats]`, `[topology]`, plus the service's own `[options]`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default, bound(deserialize = "O: Options"))]
pub struct Settings<O = ()> {
    pub service: ServiceConfig,
    pub nats: NatsConfig,
    pub topology: TopologyConfig,
    pub options: O,
}

/// What distinguishes one service binary from another at start.
#[derive(Debug, Clone, Copy)]
pub struct Identity {
    /// Binary name, e.g. `conv-runtime`.
    pub name: &'static str,
    /// One line on what the service does (for `--help`).
    pub about: &'static str,
    /// The pinned env var of its address, e.g. `CONV_RUNTIME_ADDR`.
    pub addr_env: &'static str,
    /// The pinned default address.
    pub default_addr: SocketAddr,
    /// Help lines for the service's own env variables (`  VAR   what`), or "".
    pub options_help: &'static str,
}

impl<O: Options> Settings<O> {
    /// Defaults → TOML file (`CONV_CONFIG`) → env → validate.
    pub fn load(id: &Identity, env: Env<'_>) -> Result<Self, ConfigError> {
        let mut settings: Settings<O> = load_file(env, Settings::default())?;
        let mut addr = settings.service.http_addr.unwrap_or(id.default_addr);
        env_override(env, id.addr_env, &mut addr)?;
        settings.service.http_addr = Some(addr);
        env_override(env, "CONV_LOG_FORMAT", &mut settings.service.log_format)?;
        settings.service.http.apply_env(env)?;
        settings.service.telemetry.apply_env(env).map_err(|e| ConfigError::Env { var: e.var, detail: e.detail })?;
        settings.nats.apply_env(env)?;
        settings.topology.apply_env(env)?;
        settings.options.apply_env(env)?;
        settings.validate()?;
        Ok(settings)
    }

    /// Settings for a test: the given NATS and a free-port address.
    pub fn for_test(nats: NatsConfig, http_addr: SocketAddr) -> Self {
        Settings {
            service: ServiceConfig { http_addr: Some(http_addr), ..Default::default() },
            nats,
            topology: TopologyConfig::default(),
            options: O::default(),
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.nats.validate()?;
        self.topology.validate()?;
        self.options.validate()?;
        self.service.http.validate()?;
        if self.service.http_addr.is_none() {
            return Err(ConfigError::Invalid("service.http_addr is not set".into()));
        }
        Ok(())
    }

    /// The listen address (always set after [`Settings::load`]).
    pub fn http_addr(&self) -> SocketAddr {
        self.service.http_addr.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)))
    }
}

impl crate::http::HttpLimits {
    /// Applies `CONV_HTTP_HEADER_TIMEOUT_MS` and `CONV_HTTP_MAX_CONNECTIONS`.
    pub fn apply_env(&mut self, env: Env<'_>) -> Result<(), ConfigError> {
        crate::env_overrides!(env, self, "CONV_HTTP_": header_timeout_ms, max_connections);
        Ok(())
    }
}

impl NatsConfig {
    /// Applies `NATS_URL`, `NATS_USER`, `NATS_PASSWORD`, `NATS_CREDS`,
    /// `CONV_NATS_CONNECT_TIMEOUT_MS`, `CONV_NATS_REQUEST_TIMEOUT_MS`.
    pub fn apply_env(&mut self, env: Env<'_>) -> Result<(), ConfigError> {
        crate::env_overrides!(env, self, "NATS_": url, user, password, creds);
        crate::env_overrides!(env, self, "CONV_NATS_": connect_timeout_ms, request_timeout_ms);
        Ok(())
    }
}

impl TopologyConfig {
    /// Applies `CONV_<KEY>` for every `[topology]` key (`CONV_PARTITIONS`,
    /// `CONV_REPLICAS`, `CONV_JOURNAL_MAX_AGE_HOURS`, …).
    pub fn apply_env(&mut self, env: Env<'_>) -> Result<(), ConfigError> {
        crate::env_overrides!(env, self, "CONV_": partitions, replicas, journal_max_age_hours, journal_max_bytes,
            audit_max_age_hours, audit_max_bytes, dlq_max_age_hours, dlq_max_bytes, duplicate_window_secs,
            max_deliver, ack_wait_secs, runtime_ack_wait_secs, effects_ack_wait_secs, projections_ack_wait_secs,
            pinned_ttl_secs, owner_ttl_secs, max_msg_bytes, runtime_max_ack_pending, effects_max_ack_pending,
            projections_max_ack_pending, entries_history);
        Ok(())
    }
}

/// Reads `T` from the TOML file named by `CONV_CONFIG` (if set), else starts
/// from `defaults`. Layering: defaults → file → env (applied by the caller) → validate.
pub fn load_file<T: DeserializeOwned>(env: Env<'_>, defaults: T) -> Result<T, ConfigError> {
    match env(CONFIG_FILE_ENV) {
        Some(path) if !path.is_empty() => read_toml(Path::new(&path)),
        _ => Ok(defaults),
    }
}

/// Parses a TOML config file; unknown keys are errors.
pub fn read_toml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: shown.clone(), source })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse { path: shown, detail: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A service `conv-x` on `CONV_X_ADDR`, default 127.0.0.1:9100.
    fn identity() -> Identity {
        Identity {
            name: "conv-x",
            about: "test",
            addr_env: "CONV_X_ADDR",
            default_addr: "127.0.0.1:9100".parse().expect("addr"),
            options_help: "",
        }
    }

    #[test]
    fn layered_settings() {
        let id = identity();
        let none = |_: &str| None;
        let s = Settings::<()>::load(&id, &none).expect("defaults are valid");
        assert_eq!(s.http_addr().port(), 9100);
        assert_eq!(s.nats.url, crate::connect::DEFAULT_URL);

        let vars: HashMap<&str, &str> = [
            ("CONV_X_ADDR", "127.0.0.1:9999"),
            ("CONV_LOG_FORMAT", "json"),
            ("NATS_URL", "nats://h:1"),
            ("CONV_PARTITIONS", "4"),
        ]
        .into();
        let env = |k: &str| vars.get(k).map(|v| v.to_string());
        let s = Settings::<()>::load(&id, &env).expect("valid");
        assert_eq!(s.http_addr().port(), 9999);
        assert_eq!(s.service.log_format, LogFormat::Json);
        assert_eq!(s.nats.url, "nats://h:1");
        assert_eq!(s.topology.partitions, 4);

        let bad: HashMap<&str, &str> = [("CONV_X_ADDR", "not-an-addr")].into();
        let env = |k: &str| bad.get(k).map(|v| v.to_string());
        let err = Settings::<()>::load(&id, &env).expect_err("refused");
        assert!(matches!(err, ConfigError::Env { ref var, .. } if var == "CONV_X_ADDR"));
        assert!(!err.to_string().contains("not-an-addr"), "the value is not repeated: {err}");

        // Credentials come from the environment and never print.
        let creds: HashMap<&str, &str> = [("NATS_USER", "runtime"), ("NATS_PASSWORD", "hunter2")].into();
        let env = |k: &str| creds.get(k).map(|v| v.to_string());
        let s = Settings::<()>::load(&id, &env).expect("valid");
        assert_eq!((s.nats.user.as_str(), s.nats.password.expose()), ("runtime", "hunter2"));
        assert!(!format!("{s:?}").contains("hunter2"));
        let half: HashMap<&str, &str> = [("NATS_PASSWORD", "hunter2")].into();
        let env = |k: &str| half.get(k).map(|v| v.to_string());
        let err = Settings::<()>::load(&id, &env).expect_err("a password needs a user");
        assert!(!err.to_string().contains("hunter2"));

        let bad: HashMap<&str, &str> = [("CONV_PARTITIONS", "0")].into();
        let env = |k: &str| bad.get(k).map(|v| v.to_string());
        assert!(matches!(Settings::<()>::load(&id, &env), Err(ConfigError::Invalid(_))));
    }

    #[test]
    fn every_setting_has_an_env_override() {
        use crate::test_util::assert_every_key_has_env;
        // `--help` names NATS_* and CONV_PARTITIONS / CONV_REPLICAS, and
        // "CONV_<KEY>" for the other [topology] keys: not each variable.
        assert_every_key_has_env(TopologyConfig::apply_env, None);
        assert_every_key_has_env(NatsConfig::apply_env, None);
        assert_every_key_has_env(crate::http::HttpLimits::apply_env, None);
        // `[service]`: the address has the service's own variable, the
        // limits are checked above.
        assert_eq!(
            crate::test_util::section_keys::<ServiceConfig>(),
            ["http_addr", "log_format", "http"],
            "a new [service] key needs its variable in Settings::load"
        );
    }

    #[test]
    fn limits_reach_the_declared_objects() {
        let cfg = TopologyConfig {
            journal_max_bytes: 5 << 30,
            dlq_max_age_hours: 12,
            dlq_max_bytes: 64 << 20,
            audit_max_bytes: 1 << 30,
            runtime_max_ack_pending: 77,
            effects_max_ack_pending: 999,
            projections_max_ack_pending: 1234,
            entries_history: 3,
            ..Default::default()
        };
        cfg.validate().expect("valid");
        let t = crate::topology::Topology::declare(&cfg);
        let stream = |name: &str| t.streams.iter().find(|s| s.name == name).expect("declared");
        assert_eq!(stream("CONV_IN").max_bytes, 5 << 30);
        assert_eq!(stream("CONV_OUT").max_bytes, 5 << 30);
        assert_eq!(stream("CONV_AUDIT").max_bytes, 1 << 30);
        assert_eq!((stream("CONV_DLQ").max_bytes, stream("CONV_DLQ").max_age.as_secs()), (64 << 20, 12 * 3600));
        let consumer = |name: &str| t.consumers.iter().find(|c| c.config.durable_name.as_deref() == Some(name));
        assert_eq!(consumer("runtime-p0").expect("declared").config.max_ack_pending, 77);
        assert_eq!(consumer("effects").expect("declared").config.max_ack_pending, 999);
        assert_eq!(consumer("projections-p3").expect("declared").config.max_ack_pending, 1234);
        let entries = t.kv.iter().find(|k| k.bucket == crate::topology::KV_ENTRIES).expect("declared");
        assert_eq!(entries.history, 3);

        let small = TopologyConfig { dlq_max_bytes: 1000, ..Default::default() };
        assert!(small.validate().expect_err("below one message").0.contains("dlq_max_bytes"));
        let none = TopologyConfig { effects_max_ack_pending: 0, ..Default::default() };
        assert!(none.validate().is_err());
    }

    #[test]
    fn config_file_layer() {
        let dir = std::env::temp_dir().join(format!("conv-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("service.toml");
        std::fs::write(&path, "[service]\nhttp_addr = \"127.0.0.1:7000\"\n[topology]\npartitions = 8\n")
            .expect("write");
        let id = identity();
        let p = path.display().to_string();
        let env = |k: &str| (k == CONFIG_FILE_ENV).then(|| p.clone());
        let s = Settings::<()>::load(&id, &env).expect("valid");
        assert_eq!((s.http_addr().port(), s.topology.partitions), (7000, 8));
        std::fs::write(&path, "[service]\nhttp_adr = \"127.0.0.1:7000\"\n").expect("write");
        assert!(matches!(Settings::<()>::load(&id, &env), Err(ConfigError::Parse { .. })), "typos are refused");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
