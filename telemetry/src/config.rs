//! Exporter settings from the standard `OTEL_*` environment variables.
//!
//! Traces are off unless an endpoint is set. Only OTLP over HTTP with JSON
//! bodies (`http/json`) is spoken: OpenTelemetry collectors, Jaeger and
//! Tempo take it on their OTLP/HTTP port (4318) next to protobuf. Any other
//! protocol is refused at start rather than silently not exported.

use std::time::Duration;

/// Why a telemetry variable cannot be used. The value is not repeated (a
/// header may hold a secret).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("environment variable {var} is invalid: {detail}")]
pub struct ConfigError {
    pub var: String,
    pub detail: String,
}

/// Which traces are exported (`OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG`).
/// The decision is taken on the trace id, which every service derives from
/// the same root event: a trace is exported by all services or by none.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampler {
    AlwaysOn,
    AlwaysOff,
    /// The fraction of traces kept, 0.0–1.0.
    Ratio(f64),
}

/// OTLP exporter settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The full URL spans are POSTed to (`…/v1/traces`); `None`: traces off.
    pub endpoint: Option<String>,
    /// Extra request headers (`OTEL_EXPORTER_OTLP_HEADERS`), e.g. an API key.
    pub headers: Vec<(String, String)>,
    /// Per export request (`OTEL_EXPORTER_OTLP_TIMEOUT`, ms).
    pub timeout: Duration,
    /// How long finished spans wait to be sent together (`OTEL_BSP_SCHEDULE_DELAY`, ms).
    pub schedule_delay: Duration,
    /// Spans waiting beyond this many are dropped and counted (`OTEL_BSP_MAX_QUEUE_SIZE`).
    pub max_queue: usize,
    /// At most this many spans per request (`OTEL_BSP_MAX_EXPORT_BATCH_SIZE`).
    pub max_batch: usize,
    pub sampler: Sampler,
    /// `service.name` (`OTEL_SERVICE_NAME`); unset: the binary's name.
    pub service_name: Option<String>,
    /// More resource attributes (`OTEL_RESOURCE_ATTRIBUTES`, `k=v,k=v`).
    pub resource: Vec<(String, String)>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            endpoint: None,
            headers: Vec::new(),
            timeout: Duration::from_secs(10),
            schedule_delay: Duration::from_secs(5),
            max_queue: 2048,
            max_batch: 512,
            sampler: Sampler::AlwaysOn,
            service_name: None,
            resource: Vec::new(),
        }
    }
}

/// The help lines of the variables read here.
pub const ENV_HELP: &str = "\
  OTEL_EXPORTER_OTLP_ENDPOINT         OTLP/HTTP base URL (e.g. http://collector:4318); traces are off when unset
  OTEL_EXPORTER_OTLP_TRACES_ENDPOINT  the full traces URL instead (e.g. http://collector:4318/v1/traces)
  OTEL_EXPORTER_OTLP_PROTOCOL         http/json (the only one spoken)
  OTEL_EXPORTER_OTLP_HEADERS          request headers, k=v,k=v (values percent-encoded)
  OTEL_EXPORTER_OTLP_TIMEOUT          per request, ms (10000)
  OTEL_TRACES_SAMPLER                 always_on | always_off | traceidratio (parentbased_* alike)
  OTEL_TRACES_SAMPLER_ARG             the ratio for traceidratio, 0-1
  OTEL_SERVICE_NAME                   service.name (the binary's name)
  OTEL_RESOURCE_ATTRIBUTES            more resource attributes, k=v,k=v
  OTEL_BSP_SCHEDULE_DELAY             spans are sent at least this often, ms (5000)
  OTEL_BSP_MAX_QUEUE_SIZE             spans waiting beyond this are dropped (2048)
  OTEL_BSP_MAX_EXPORT_BATCH_SIZE      spans per request (512)
  OTEL_SDK_DISABLED                   true: no traces whatever else is set";

impl Config {
    /// Applies the `OTEL_*` variables (an empty value counts as unset).
    /// Nothing else is read, or refused, unless an endpoint is set and
    /// `OTEL_SDK_DISABLED` is not `true`: variables a platform sets for
    /// every process never stop a service whose traces are off.
    pub fn apply_env(&mut self, env: &dyn Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        let get = |var: &str| env(var).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());
        let bad = |var: &str, detail: String| ConfigError { var: var.to_owned(), detail };
        if get("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
            self.endpoint = None;
            return Ok(());
        }
        if let Some(url) = get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
            self.endpoint = Some(check_url("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", &url)?);
        } else if let Some(base) = get("OTEL_EXPORTER_OTLP_ENDPOINT") {
            let base = check_url("OTEL_EXPORTER_OTLP_ENDPOINT", &base)?;
            self.endpoint = Some(format!("{}/v1/traces", base.trim_end_matches('/')));
        }
        if self.endpoint.is_none() {
            return Ok(());
        }
        for var in ["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"] {
            if let Some(protocol) = get(var) {
                if protocol != "http/json" {
                    return Err(bad(
                        var,
                        format!(
                            "{protocol:?} is not spoken; conv exports OTLP over HTTP with JSON bodies: set http/json (collectors take it on their OTLP/HTTP port, 4318)"
                        ),
                    ));
                }
                break;
            }
        }
        for var in ["OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_TRACES_HEADERS"] {
            if let Some(list) = get(var) {
                self.headers.extend(pairs(var, &list)?);
            }
        }
        for var in ["OTEL_EXPORTER_OTLP_TIMEOUT", "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT"] {
            if let Some(ms) = get(var) {
                self.timeout = Duration::from_millis(number(var, &ms)?);
            }
        }
        if let Some(ms) = get("OTEL_BSP_SCHEDULE_DELAY") {
            self.schedule_delay = Duration::from_millis(number("OTEL_BSP_SCHEDULE_DELAY", &ms)?);
        }
        if let Some(n) = get("OTEL_BSP_MAX_QUEUE_SIZE") {
            self.max_queue = usize::try_from(number("OTEL_BSP_MAX_QUEUE_SIZE", &n)?).unwrap_or(usize::MAX);
        }
        if let Some(n) = get("OTEL_BSP_MAX_EXPORT_BATCH_SIZE") {
            self.max_batch = usize::try_from(number("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", &n)?).unwrap_or(usize::MAX);
        }
        if let Some(sampler) = get("OTEL_TRACES_SAMPLER") {
            let ratio = || -> Result<f64, ConfigError> {
                let Some(arg) = get("OTEL_TRACES_SAMPLER_ARG") else { return Ok(1.0) };
                match arg.parse::<f64>() {
                    Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
                    _ => Err(bad("OTEL_TRACES_SAMPLER_ARG", "must be a number from 0 to 1".into())),
                }
            };
            self.sampler = match sampler.as_str() {
                "always_on" | "parentbased_always_on" => Sampler::AlwaysOn,
                "always_off" | "parentbased_always_off" => Sampler::AlwaysOff,
                "traceidratio" | "parentbased_traceidratio" => Sampler::Ratio(ratio()?),
                other => {
                    return Err(bad(
                        "OTEL_TRACES_SAMPLER",
                        format!(
                            "{other:?} is not one of always_on, always_off, traceidratio (or parentbased_ of them)"
                        ),
                    ));
                }
            };
        }
        if let Some(name) = get("OTEL_SERVICE_NAME") {
            self.service_name = Some(name);
        }
        if let Some(list) = get("OTEL_RESOURCE_ATTRIBUTES") {
            self.resource.extend(pairs("OTEL_RESOURCE_ATTRIBUTES", &list)?);
        }
        self.validate()
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |var: &str, detail: &str| ConfigError { var: var.to_owned(), detail: detail.to_owned() };
        if self.max_batch == 0 {
            return Err(bad("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "the export batch must hold at least one span"));
        }
        if self.max_queue == 0 {
            return Err(bad("OTEL_BSP_MAX_QUEUE_SIZE", "the span queue must hold at least one span"));
        }
        if self.schedule_delay.is_zero() {
            return Err(bad("OTEL_BSP_SCHEDULE_DELAY", "must be at least 1 ms"));
        }
        Ok(())
    }

    /// Whether spans are exported at all.
    pub fn enabled(&self) -> bool {
        self.endpoint.is_some() && self.sampler != Sampler::AlwaysOff
    }
}

/// `url` without user and password, for logs.
pub(crate) fn redacted(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.to_string()
        }
        Err(_) => "(not a URL)".into(),
    }
}

fn check_url(var: &str, url: &str) -> Result<String, ConfigError> {
    let parsed =
        reqwest::Url::parse(url).map_err(|e| ConfigError { var: var.to_owned(), detail: format!("not a URL: {e}") })?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(ConfigError { var: var.to_owned(), detail: "must be an http:// or https:// URL".into() });
    }
    Ok(url.to_owned())
}

fn number(var: &str, value: &str) -> Result<u64, ConfigError> {
    value.parse().map_err(|_| ConfigError { var: var.to_owned(), detail: "must be a whole number".into() })
}

/// `k=v,k=v` with percent-encoded values (the OTel list format).
fn pairs(var: &str, list: &str) -> Result<Vec<(String, String)>, ConfigError> {
    list.split(',')
        .filter(|item| !item.trim().is_empty())
        .map(|item| {
            let (k, v) = item
                .split_once('=')
                .ok_or_else(|| ConfigError { var: var.to_owned(), detail: "every item must be key=value".into() })?;
            let value = percent_encoding::percent_decode_str(v.trim()).decode_utf8_lossy().into_owned();
            Ok((k.trim().to_owned(), value))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn load(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let vars: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let mut c = Config::default();
        c.apply_env(&|k| vars.get(k).cloned())?;
        Ok(c)
    }

    #[test]
    fn off_unless_an_endpoint_is_set() {
        assert!(!load(&[]).expect("valid").enabled());
        assert!(!load(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "")]).expect("valid").enabled());
        let c = load(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/")]).expect("valid");
        assert_eq!(c.endpoint.as_deref(), Some("http://collector:4318/v1/traces"));
        let c = load(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://a:4318"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "https://b/traces"),
        ])
        .expect("valid");
        assert_eq!(c.endpoint.as_deref(), Some("https://b/traces"), "the signal's own URL is used as is");
        let c =
            load(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://a:4318"), ("OTEL_SDK_DISABLED", "true")]).expect("valid");
        assert!(!c.enabled());
        let c = load(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://a:4318"), ("OTEL_TRACES_SAMPLER", "always_off")])
            .expect("valid");
        assert!(!c.enabled());
    }

    #[test]
    fn refuses_what_it_cannot_do() {
        let e = load(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4317"), ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")])
            .expect_err("not a URL");
        assert_eq!(e.var, "OTEL_EXPORTER_OTLP_ENDPOINT");
        let e = load(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"), ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")])
            .expect_err("grpc");
        assert!(e.detail.contains("http/json"), "{e}");
        let on = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318");
        assert!(load(&[on, ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")]).is_ok());
        let e =
            load(&[on, ("OTEL_TRACES_SAMPLER", "traceidratio"), ("OTEL_TRACES_SAMPLER_ARG", "2")]).expect_err("ratio");
        assert_eq!(e.var, "OTEL_TRACES_SAMPLER_ARG");
        let e = load(&[on, ("OTEL_EXPORTER_OTLP_HEADERS", "novalue")]).expect_err("pairs");
        assert!(!e.to_string().contains("novalue"), "the value is not repeated: {e}");
        assert!(load(&[on, ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "0")]).is_err());
        assert!(load(&[on, ("OTEL_BSP_SCHEDULE_DELAY", "0")]).is_err());
        // With traces off, what a platform sets for every process is not read.
        for (var, value) in [
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_TRACES_SAMPLER", "jaeger_remote"),
            ("OTEL_BSP_SCHEDULE_DELAY", "0"),
        ] {
            assert!(load(&[(var, value)]).is_ok(), "{var} with traces off");
            assert!(load(&[on, (var, value), ("OTEL_SDK_DISABLED", "true")]).is_ok(), "{var} with traces disabled");
        }
        assert_eq!(redacted("https://user:secret@collector:4318/v1/traces"), "https://collector:4318/v1/traces");
    }

    #[test]
    fn reads_the_rest() {
        let c = load(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "x-api-key=a%20b, tenant=t1"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "1500"),
            ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "0.25"),
            ("OTEL_SERVICE_NAME", "conv-edge"),
            ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=prod"),
            ("OTEL_BSP_SCHEDULE_DELAY", "200"),
        ])
        .expect("valid");
        assert_eq!(c.headers, vec![("x-api-key".into(), "a b".into()), ("tenant".into(), "t1".into())]);
        assert_eq!(c.timeout, Duration::from_millis(1500));
        assert_eq!(c.sampler, Sampler::Ratio(0.25));
        assert_eq!(c.service_name.as_deref(), Some("conv-edge"));
        assert_eq!(c.resource, vec![("deployment.environment".into(), "prod".into())]);
        assert_eq!(c.schedule_delay, Duration::from_millis(200));
    }
}
