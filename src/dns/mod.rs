//! Next hops by name (RFC 3263 §4): NAPTR → SRV → A/AAAA through `hickory-resolver`, whose
//! cache keeps each answer for its TTL. The decisions (which lookup, which NAPTR, the SRV
//! order) are pure, in [`select`]; this shell only asks the questions.
//!
//! `[dns] servers` names the name servers (tests point it at a server on loopback); empty, the
//! system's `/etc/resolv.conf` is read.

pub mod select;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::NetError;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{RData, RecordType};
use tracing::{debug, warn};

use self::select::{Naptr, SplitMix, Srv, Step};
use crate::config::DnsConfig;
use crate::metrics::Registry;
use crate::transport::Proto;

/// Addresses one next hop expands to at most (SRV targets × their addresses): the failover
/// list of a branch is bounded whatever the zone says.
pub const MAX_TARGETS: usize = 16;

/// One place to send a request: an address and the transport to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Next {
    pub addr: SocketAddr,
    pub proto: Proto,
}

/// Why a name gave no address.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// The resolver could not be built (unreadable /etc/resolv.conf).
    #[error("cannot set up the resolver: {0}")]
    Setup(String),
    /// The name has no usable records.
    #[error("no address for {0}")]
    NoAddress(String),
    /// A lookup failed (timeout, SERVFAIL, unreachable server).
    #[error("lookup of {name} failed: {reason}")]
    Lookup { name: String, reason: String },
}

/// The resolver's counters.
#[derive(Debug, Default)]
pub struct DnsStats {
    /// Lookups asked of the resolver (NAPTR, SRV, A/AAAA; cache hits included).
    pub queries: AtomicU64,
    /// Lookups that failed for another reason than "no such record".
    pub failures: AtomicU64,
}

/// The RFC 3263 resolver. Cheap to share (`Arc`).
pub struct Resolver {
    inner: TokioResolver,
    /// SplitMix64 state for the weighted SRV draws, advanced atomically (shared by tasks).
    seed: AtomicU64,
    stats: DnsStats,
}

impl Resolver {
    /// A resolver for `[dns]`: its servers, else the system's.
    pub fn new(cfg: &DnsConfig) -> Result<Self, DnsError> {
        let provider = TokioRuntimeProvider::default();
        let mut builder = if cfg.servers.is_empty() {
            match TokioResolver::builder(provider.clone()) {
                Ok(b) => b,
                Err(error) => {
                    // A host without /etc/resolv.conf still serves addresses; names fail.
                    warn!(%error, "cannot read the system's DNS configuration: next hops by name will not resolve (set [dns] servers)");
                    TokioResolver::builder_with_config(
                        ResolverConfig::from_name_servers(Vec::new()),
                        provider,
                    )
                }
            }
        } else {
            let servers = cfg
                .servers
                .iter()
                .map(|s| {
                    let mut udp = ConnectionConfig::udp();
                    udp.port = s.port();
                    let mut tcp = ConnectionConfig::tcp();
                    tcp.port = s.port();
                    NameServerConfig::new(s.ip(), true, vec![udp, tcp])
                })
                .collect();
            TokioResolver::builder_with_config(ResolverConfig::from_name_servers(servers), provider)
        };
        let opts = builder.options_mut();
        opts.timeout = cfg.timeout;
        opts.attempts = cfg.attempts;
        opts.cache_size = cfg.cache_size;
        let inner = builder
            .build()
            .map_err(|e| DnsError::Setup(e.to_string()))?;
        Ok(Self {
            inner,
            seed: AtomicU64::new(SplitMix::from_entropy().0),
            stats: DnsStats::default(),
        })
    }

    /// The resolver's counters.
    pub fn stats(&self) -> &DnsStats {
        &self.stats
    }

    /// Registers `dns_queries` and `dns_failures`.
    pub fn register_metrics(self: &Arc<Self>, m: &Registry) {
        type Field = fn(&DnsStats) -> &AtomicU64;
        let counters: [(&str, &str, Field); 2] = [
            (
                "dns_queries",
                "DNS lookups for next hops (NAPTR, SRV, A/AAAA; cache hits included).",
                |s| &s.queries,
            ),
            (
                "dns_failures",
                "DNS lookups for next hops that failed (timeout, server failure), not counting names without records.",
                |s| &s.failures,
            ),
        ];
        for (name, help, field) in counters {
            let r = Arc::downgrade(self);
            m.counter(name, help, move || {
                r.upgrade().map_or(0, |r| field(&r.stats).load(Relaxed))
            });
        }
    }

    /// RFC 3263 §4: the places to try for `host[:port][;transport=]`, in order (at most
    /// [`MAX_TARGETS`]). An address is returned as is.
    pub async fn resolve(
        &self,
        host: &str,
        port: Option<u16>,
        transport: Option<Proto>,
    ) -> Result<Vec<Next>, DnsError> {
        // `first_only`: SRV names from our fallback list, not from NAPTR.
        let (services, first_only) = match select::first_step(host, port, transport) {
            Step::Addr(addr, proto) => return Ok(vec![Next { addr, proto }]),
            Step::Host(name, port, proto) => return self.addresses(&name, port, proto).await,
            Step::Srv(proto, name) => (vec![(proto, name)], true),
            Step::Naptr(name) => {
                let naptr = self.naptr(&name).await?;
                if naptr.is_empty() {
                    (select::srv_fallback(&name), true)
                } else {
                    (naptr, false)
                }
            }
        };
        let mut out = Vec::new();
        let mut last_error = None;
        for (proto, name) in services {
            let records = match self.srv(&name).await {
                Ok(r) => r,
                Err(e) => {
                    last_error = Some(e);
                    continue;
                }
            };
            if records.is_empty() {
                continue;
            }
            let ordered = select::order_srv(records, &mut self.rng());
            for s in ordered {
                match self.addresses(&s.target, s.port, proto).await {
                    Ok(addrs) => out.extend(addrs),
                    Err(e) => last_error = Some(e),
                }
                if out.len() >= MAX_TARGETS {
                    break;
                }
            }
            // Without NAPTR, the first transport whose SRV records exist is the one (RFC
            // 3263 §4.1); with NAPTR, each record in turn adds its targets (failover).
            if !out.is_empty() && first_only {
                break;
            }
        }
        if out.is_empty() {
            if let Some(e @ DnsError::Lookup { .. }) = last_error {
                return Err(e);
            }
            // No SRV at all: A/AAAA of the name itself, on 5060 (RFC 3263 §4.2).
            let proto = transport.unwrap_or(Proto::Udp);
            return self.addresses(host, proto.default_port(), proto).await;
        }
        out.truncate(MAX_TARGETS);
        debug!(%host, targets = out.len(), "next hop resolved");
        Ok(out)
    }

    /// A weighted-draw source for one SRV ordering.
    fn rng(&self) -> SplitMix {
        let s = self.seed.fetch_add(0x9E37_79B9_7F4A_7C15, Relaxed);
        SplitMix(select::mix(s))
    }

    /// The NAPTR records of `name` that we use; none is not an error.
    async fn naptr(&self, name: &str) -> Result<Vec<(Proto, String)>, DnsError> {
        let Some(lookup) = self.lookup(name, RecordType::NAPTR).await? else {
            return Ok(Vec::new());
        };
        let records = lookup
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::NAPTR(n) => Some(Naptr {
                    order: n.order,
                    preference: n.preference,
                    flags: String::from_utf8_lossy(&n.flags).into_owned(),
                    services: String::from_utf8_lossy(&n.services).into_owned(),
                    replacement: n.replacement.to_ascii(),
                }),
                _ => None,
            })
            .collect();
        Ok(select::naptr_services(records))
    }

    async fn srv(&self, name: &str) -> Result<Vec<Srv>, DnsError> {
        let Some(lookup) = self.lookup(name, RecordType::SRV).await? else {
            return Ok(Vec::new());
        };
        Ok(lookup
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::SRV(s) => Some(Srv {
                    priority: s.priority,
                    weight: s.weight,
                    port: s.port,
                    target: s.target.to_ascii().trim_end_matches('.').to_owned(),
                }),
                _ => None,
            })
            .collect())
    }

    /// A/AAAA of `name`, each address on `port` over `proto`.
    async fn addresses(&self, name: &str, port: u16, proto: Proto) -> Result<Vec<Next>, DnsError> {
        self.stats.queries.fetch_add(1, Relaxed);
        match self.inner.lookup_ip(name).await {
            Ok(ips) => {
                let out: Vec<Next> = ips
                    .iter()
                    .take(MAX_TARGETS)
                    .map(|ip| Next {
                        addr: SocketAddr::new(ip, port),
                        proto,
                    })
                    .collect();
                if out.is_empty() {
                    Err(DnsError::NoAddress(name.to_owned()))
                } else {
                    Ok(out)
                }
            }
            Err(e) => Err(self.failed(name, &e)),
        }
    }

    /// A lookup; `None` when the name or the record type does not exist.
    async fn lookup(
        &self,
        name: &str,
        kind: RecordType,
    ) -> Result<Option<hickory_resolver::lookup::Lookup>, DnsError> {
        self.stats.queries.fetch_add(1, Relaxed);
        match self.inner.lookup(name, kind).await {
            Ok(l) => Ok(Some(l)),
            Err(e) if e.is_no_records_found() => Ok(None),
            Err(e) => Err(self.failed(name, &e)),
        }
    }

    fn failed(&self, name: &str, e: &NetError) -> DnsError {
        if e.is_no_records_found() {
            return DnsError::NoAddress(name.to_owned());
        }
        self.stats.failures.fetch_add(1, Relaxed);
        DnsError::Lookup {
            name: name.to_owned(),
            reason: e.to_string(),
        }
    }
}
