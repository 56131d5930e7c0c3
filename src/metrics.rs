//! The counters registry: one place every layer reports into, read by the shutdown line,
//! `sipedge show` and the Prometheus endpoint.
//!
//! The layers keep their own counters where they are updated (plain atomics next to the code
//! that counts, or a size read from a map) and register a *reader* here under a stable name;
//! nothing is copied on the hot path. Values owned by another thread (the relay's sessions and
//! ports) are brought up to date by a [`Refresh`] hook before each read. The text encoding is
//! prometheus-client's (OpenMetrics text, with `# HELP`, `# TYPE`, escaping and `# EOF`).
//!
//! A utility at the bottom of the layers: it uses nothing of the crate.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// Every metric name starts with this.
pub const PREFIX: &str = "sipedge_";

/// Whether a value only grows (since start) or goes up and down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

type Read = Box<dyn Fn() -> u64 + Send + Sync>;

/// One registered value.
struct Entry {
    /// Without [`PREFIX`], e.g. `transport_udp_send_dropped`; counters without `_total` (the
    /// encoder adds it).
    name: String,
    help: String,
    kind: Kind,
    labels: Vec<(String, String)>,
    read: Read,
}

/// One value read from the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub kind: Kind,
    pub value: u64,
}

/// Brings values owned elsewhere up to date before a read (the relay's counts are a round
/// trip to its control thread).
pub trait Refresh: Send + Sync {
    fn refresh(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
}

/// The registry. Registration happens at start-up; reads take a shared lock.
#[derive(Default)]
pub struct Registry {
    entries: RwLock<Vec<Entry>>,
    refreshers: RwLock<Vec<Arc<dyn Refresh>>>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.entries.read().map_or(0, |e| e.len());
        f.debug_struct("Registry").field("entries", &n).finish()
    }
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a value that only grows.
    pub fn counter(&self, name: &str, help: &str, read: impl Fn() -> u64 + Send + Sync + 'static) {
        self.add(name, help, Kind::Counter, &[], Box::new(read));
    }

    /// Registers a value that goes up and down.
    pub fn gauge(&self, name: &str, help: &str, read: impl Fn() -> u64 + Send + Sync + 'static) {
        self.add(name, help, Kind::Gauge, &[], Box::new(read));
    }

    /// Registers one labelled member of a family (e.g. `reason="busy"`); members of a family
    /// share name, help and kind.
    pub fn labelled(
        &self,
        name: &str,
        help: &str,
        kind: Kind,
        labels: &[(&str, &str)],
        read: impl Fn() -> u64 + Send + Sync + 'static,
    ) {
        self.add(name, help, kind, labels, Box::new(read));
    }

    fn add(&self, name: &str, help: &str, kind: Kind, labels: &[(&str, &str)], read: Read) {
        let entry = Entry {
            name: name.to_owned(),
            help: help.to_owned(),
            kind,
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            read,
        };
        // A poisoned lock means a reader panicked; the entries themselves are intact.
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        entries.push(entry);
    }

    /// Adds a hook run by [`Registry::refresh`].
    pub fn on_refresh(&self, r: Arc<dyn Refresh>) {
        let mut list = self.refreshers.write().unwrap_or_else(|e| e.into_inner());
        list.push(r);
    }

    /// Runs every refresh hook (call before [`Registry::snapshot`] or [`Registry::encode`]
    /// when values owned by other threads matter).
    pub async fn refresh(&self) {
        let hooks: Vec<Arc<dyn Refresh>> = self
            .refreshers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for h in hooks {
            h.refresh().await;
        }
    }

    /// Every value now, in registration order.
    pub fn snapshot(&self) -> Vec<Sample> {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        entries
            .iter()
            .map(|e| Sample {
                name: e.name.clone(),
                labels: e.labels.clone(),
                kind: e.kind,
                value: (e.read)(),
            })
            .collect()
    }

    /// One value by name (the first registered under it), or `None`.
    pub fn get(&self, name: &str) -> Option<u64> {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        entries.iter().find(|e| e.name == name).map(|e| (e.read)())
    }

    /// The non-zero values as `name=value` (labels as `name{k=v}`), space-separated: the
    /// shutdown line.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        for s in self.snapshot().into_iter().filter(|s| s.value != 0) {
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str(&s.name);
            if !s.labels.is_empty() {
                let labels: Vec<String> =
                    s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                out.push('{');
                out.push_str(&labels.join(","));
                out.push('}');
            }
            out.push('=');
            out.push_str(&s.value.to_string());
        }
        out
    }

    /// The OpenMetrics text exposition of every value, ending in `# EOF`.
    pub fn encode(&self) -> String {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(Snapshot(self.snapshot_with_help())));
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }

    fn snapshot_with_help(&self) -> Vec<(Sample, String)> {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        entries
            .iter()
            .map(|e| {
                let s = Sample {
                    name: e.name.clone(),
                    labels: e.labels.clone(),
                    kind: e.kind,
                    value: (e.read)(),
                };
                (s, e.help.clone())
            })
            .collect()
    }
}

/// Values read at one instant, as a prometheus-client collector.
#[derive(Debug)]
struct Snapshot(Vec<(Sample, String)>);

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        // Members of a family are encoded under one descriptor, in registration order of the
        // family's first member.
        let mut done = vec![false; self.0.len()];
        for i in 0..self.0.len() {
            if done[i] {
                continue;
            }
            let (first, help) = &self.0[i];
            let name = format!("{PREFIX}{}", first.name);
            let kind = match first.kind {
                Kind::Counter => MetricType::Counter,
                Kind::Gauge => MetricType::Gauge,
            };
            let mut family = encoder.encode_descriptor(&name, help, None, kind)?;
            for (j, (s, _)) in self.0.iter().enumerate().skip(i) {
                if s.name != first.name || done[j] {
                    continue;
                }
                done[j] = true;
                let member = family.encode_family(&s.labels)?;
                match s.kind {
                    Kind::Counter => ConstCounter::new(s.value).encode(member)?,
                    Kind::Gauge => ConstGauge::new(i64::try_from(s.value).unwrap_or(i64::MAX))
                        .encode(member)?,
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

    use super::*;

    #[test]
    fn readers_are_read_at_snapshot_time_and_encoded_as_openmetrics() {
        let r = Registry::new();
        let dropped = Arc::new(AtomicU64::new(0));
        let d = dropped.clone();
        r.counter(
            "transport_udp_send_dropped",
            "Datagrams dropped.",
            move || d.load(Relaxed),
        );
        r.gauge("registrar_bindings", "Bindings now.", || 7);
        r.labelled(
            "media_refused",
            "Streams refused.",
            Kind::Counter,
            &[("reason", "busy")],
            || 2,
        );
        r.labelled(
            "media_refused",
            "Streams refused.",
            Kind::Counter,
            &[("reason", "caller_limit")],
            || 3,
        );
        dropped.store(5, Relaxed);
        assert_eq!(r.get("transport_udp_send_dropped"), Some(5));
        assert_eq!(r.get("nothing"), None);
        let text = r.encode();
        assert!(
            text.contains("# TYPE sipedge_transport_udp_send_dropped counter\n"),
            "{text}"
        );
        assert!(
            text.contains("sipedge_transport_udp_send_dropped_total 5\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE sipedge_registrar_bindings gauge\n"),
            "{text}"
        );
        assert!(text.contains("sipedge_registrar_bindings 7\n"), "{text}");
        assert!(
            text.contains("sipedge_media_refused_total{reason=\"busy\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("sipedge_media_refused_total{reason=\"caller_limit\"} 3\n"),
            "{text}"
        );
        assert_eq!(
            text.matches("# TYPE sipedge_media_refused").count(),
            1,
            "one descriptor per family: {text}"
        );
        assert!(text.ends_with("# EOF\n"));
        assert_eq!(
            r.summary(),
            "transport_udp_send_dropped=5 registrar_bindings=7 media_refused{reason=busy}=2 \
             media_refused{reason=caller_limit}=3"
        );
    }

    struct Bump(Arc<AtomicU64>);
    impl Refresh for Bump {
        fn refresh(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
            Box::pin(async move {
                self.0.fetch_add(1, Relaxed);
            })
        }
    }

    #[tokio::test]
    async fn refresh_hooks_run_before_a_read() {
        let r = Registry::new();
        let v = Arc::new(AtomicU64::new(0));
        let v2 = v.clone();
        r.gauge("relay_sessions", "Sessions.", move || v2.load(Relaxed));
        r.on_refresh(Arc::new(Bump(v.clone())));
        assert_eq!(r.get("relay_sessions"), Some(0));
        r.refresh().await;
        assert_eq!(r.get("relay_sessions"), Some(1));
    }
}
