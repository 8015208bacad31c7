//! Logs, traces and metrics.
//!
//! Servers log JSON, the CLI logs for humans. When `OTEL_EXPORTER_OTLP_ENDPOINT` is set, spans
//! are exported over OTLP/gRPC, and W3C trace context travels in gRPC metadata and in queue
//! messages (`traceparent`), so one trace follows a shard through every stage.
use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TracerProvider as _;
use std::collections::HashMap;
use std::net::SocketAddr;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Human,
}

impl LogFormat {
    /// `auto` means JSON unless stderr is a terminal.
    pub fn parse(s: &str) -> Self {
        use std::io::IsTerminal;
        match s {
            "json" => LogFormat::Json,
            "human" => LogFormat::Human,
            _ if std::io::stderr().is_terminal() => LogFormat::Human,
            _ => LogFormat::Json,
        }
    }
}

/// Whether human logs may colour: only on a terminal, and never when `NO_COLOR` is set to
/// anything but the empty string (<https://no-color.org>).
pub fn use_colour(is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// Flushes pending spans when dropped.
#[must_use = "dropping the guard stops trace export"]
pub struct TelemetryGuard {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take()
            && let Err(e) = p.shutdown()
        {
            eprintln!("warning: trace export shutdown: {e}");
        }
    }
}

/// Installs the global subscriber. `RUST_LOG` overrides `level`.
pub fn init(service: &str, format: LogFormat, level: &str) -> anyhow::Result<TelemetryGuard> {
    let filter = EnvFilter::try_from_default_env().or_else(|_| EnvFilter::try_new(level))?;
    let fmt = match format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Human => {
            use std::io::IsTerminal;
            let colour = use_colour(
                std::io::stderr().is_terminal(),
                std::env::var_os("NO_COLOR").as_deref(),
            );
            tracing_subscriber::fmt::layer()
                .with_target(false)
                .with_ansi(colour)
                .with_writer(std::io::stderr)
                .boxed()
        }
    };
    let mut provider = None;
    let otel = match std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT") {
        Ok(endpoint) if !endpoint.is_empty() => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .build()
                .map_err(|e| anyhow::anyhow!("OTLP exporter for {endpoint}: {e}"))?;
            let p = opentelemetry_sdk::trace::SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(
                    opentelemetry_sdk::Resource::builder()
                        .with_service_name(format!("davinci-{service}"))
                        .build(),
                )
                .build();
            let tracer = p.tracer("davinci");
            opentelemetry::global::set_tracer_provider(p.clone());
            provider = Some(p);
            Some(tracing_opentelemetry::layer().with_tracer(tracer))
        }
        _ => None,
    };
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init()
        .map_err(|e| anyhow::anyhow!("installing the log subscriber: {e}"))?;
    Ok(TelemetryGuard { provider })
}

/// Buckets of every `*_seconds` histogram, from a fast RPC to a long job step.
const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 1800.0,
];

/// Serves Prometheus `/metrics` on `listen` for every `metrics::` macro in the process.
/// Histograms are exported as buckets (not summaries), so `histogram_quantile` can aggregate
/// them across replicas.
pub fn install_metrics(listen: SocketAddr) -> anyhow::Result<()> {
    use metrics_exporter_prometheus::Matcher;
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(listen)
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
        .map_err(|e| anyhow::anyhow!("histogram buckets: {e}"))?
        .install()
        .map_err(|e| anyhow::anyhow!("starting /metrics on {listen}: {e}"))
}

struct MapCarrier<'a>(&'a mut HashMap<String, String>);

impl Injector for MapCarrier<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_string(), value);
    }
}

struct HeaderCarrier<'a>(&'a http::HeaderMap);

impl Extractor for HeaderCarrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct OneCarrier<'a>(&'a str);

impl Extractor for OneCarrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == "traceparent").then_some(self.0)
    }
    fn keys(&self) -> Vec<&str> {
        vec!["traceparent"]
    }
}

/// The W3C `traceparent` of the current span, for queue messages and outgoing calls.
pub fn current_traceparent() -> Option<String> {
    let cx = tracing::Span::current().context();
    let mut map = HashMap::new();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&cx, &mut MapCarrier(&mut map))
    });
    map.remove("traceparent")
}

/// Makes `span` a child of the trace a queue message (or any producer) carried.
pub fn set_parent_from_traceparent(span: &tracing::Span, traceparent: &str) {
    let cx =
        opentelemetry::global::get_text_map_propagator(|p| p.extract(&OneCarrier(traceparent)));
    let _ = span.set_parent(cx);
}

/// The span of one incoming gRPC request, joined to the caller's trace when it sent one.
pub fn grpc_request_span(req: &http::Request<()>) -> tracing::Span {
    let span = tracing::info_span!("grpc", rpc = %req.uri().path());
    let cx = opentelemetry::global::get_text_map_propagator(|p| {
        p.extract(&HeaderCarrier(req.headers()))
    });
    let _ = span.set_parent(cx);
    span
}

/// Adds the current trace context to outgoing gRPC metadata.
pub fn inject_grpc_metadata(meta: &mut tonic::metadata::MetadataMap) {
    if let Some(tp) = current_traceparent()
        && let Ok(v) = tp.parse()
    {
        meta.insert("traceparent", v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(use_colour(true, None));
        assert!(use_colour(true, Some(OsStr::new(""))));
        assert!(!use_colour(true, Some(OsStr::new("1"))));
        assert!(!use_colour(false, None));
        assert!(!use_colour(false, Some(OsStr::new(""))));
    }
}
