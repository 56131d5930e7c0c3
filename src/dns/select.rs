//! Locating a SIP server, the decisions of RFC 3263 §4 and RFC 2782 without the lookups:
//! what to ask first for a next hop ([`first_step`]), which NAPTR records name a transport we
//! speak ([`naptr_services`]), the SRV names to try without NAPTR ([`srv_fallback`]) and the
//! order of SRV targets ([`order_srv`]: priority, then weighted random within a priority).
//! Pure: the random source is a parameter ([`Random`]), so tests are deterministic; the
//! lookups are done by the shell in [`super`].

use std::net::{IpAddr, SocketAddr};

use crate::transport::Proto;

/// The port of SIP when neither the URI nor SRV gives one (RFC 3261 §19.1.2).
pub const SIP_PORT: u16 = 5060;

/// A uniform random source.
pub trait Random {
    /// A number in `0..n` (`n > 0`).
    fn below(&mut self, n: u32) -> u32;
}

/// What to look up first for `host[:port][;transport=]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// An IP address: nothing to resolve (RFC 3263 §4.2: port or 5060, transport or UDP).
    Addr(SocketAddr, Proto),
    /// A name with a port: A/AAAA only, no SRV (RFC 3263 §4.2).
    Host(String, u16, Proto),
    /// A name with a transport but no port: the SRV records of that transport (RFC 3263
    /// §4.2), then A/AAAA on 5060.
    Srv(Proto, String),
    /// A name alone: NAPTR (RFC 3263 §4.1), then SRV per transport, then A/AAAA on 5060.
    Naptr(String),
}

/// RFC 3263 §4.1/§4.2: the first lookup for a next hop.
pub fn first_step(host: &str, port: Option<u16>, transport: Option<Proto>) -> Step {
    let proto = transport.unwrap_or(Proto::Udp);
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Step::Addr(
            SocketAddr::new(ip, port.unwrap_or(proto.default_port())),
            proto,
        );
    }
    match (port, transport) {
        (Some(p), _) => Step::Host(host.to_owned(), p, proto),
        (None, Some(t)) => Step::Srv(t, srv_name(t, host)),
        (None, None) => Step::Naptr(host.to_owned()),
    }
}

/// `_sip._udp.host` / `_sip._tcp.host` / `_sips._tcp.host` (RFC 3263 §4.2).
pub fn srv_name(proto: Proto, host: &str) -> String {
    let label = match proto {
        Proto::Udp => "_sip._udp",
        Proto::Tcp => "_sip._tcp",
        Proto::Tls => "_sips._tcp",
    };
    format!("{label}.{host}")
}

/// Without NAPTR records, the SRV names to try in our order of preference; the first that
/// has records decides the transport (RFC 3263 §4.1), and with none, UDP. TLS comes last: a
/// `sip:` URI does not ask for it, and a `sips:` one never gets here (its transport is TLS).
pub fn srv_fallback(host: &str) -> Vec<(Proto, String)> {
    [Proto::Udp, Proto::Tcp, Proto::Tls]
        .into_iter()
        .map(|p| (p, srv_name(p, host)))
        .collect()
}

/// One NAPTR record (RFC 2915), as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Naptr {
    pub order: u16,
    pub preference: u16,
    pub flags: String,
    pub services: String,
    /// The SRV name the record points to.
    pub replacement: String,
}

/// RFC 3263 §4.1: the NAPTR records with flag "S" and a service we speak, in (order,
/// preference) order, as (transport, SRV name). `SIP+D2U` is UDP, `SIP+D2T` TCP and
/// `SIPS+D2T` TLS.
pub fn naptr_services(mut records: Vec<Naptr>) -> Vec<(Proto, String)> {
    records.sort_by_key(|r| (r.order, r.preference));
    records
        .into_iter()
        .filter(|r| r.flags.eq_ignore_ascii_case("s"))
        .filter_map(|r| {
            let proto = match r.services.to_ascii_uppercase().as_str() {
                "SIP+D2U" => Proto::Udp,
                "SIP+D2T" => Proto::Tcp,
                "SIPS+D2T" => Proto::Tls,
                _ => return None,
            };
            let name = r.replacement.trim_end_matches('.').to_owned();
            (!name.is_empty()).then_some((proto, name))
        })
        .collect()
}

/// One SRV record (RFC 2782).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Srv {
    pub priority: u16,
    pub weight: u16,
    pub port: u16,
    /// The target name, without the trailing dot.
    pub target: String,
}

/// RFC 2782's order of SRV targets: lowest priority first; within a priority, each next
/// target is drawn at random with a chance proportional to its weight. A target "." means
/// the service is not offered there (dropped).
///
/// RFC 2782 draws a number in `0..=sum` and takes the first running sum ≥ it, which gives a
/// weight-0 record placed first a chance and skews the others (3:1 becomes 4:1). We draw in
/// `1..=sum` when the weights sum to more than 0, so weights are exact proportions, and
/// weight-0 records come after the weighted ones in random order (RFC 2782: "very small
/// chance"), as Kamailio and most resolvers do.
pub fn order_srv(records: Vec<Srv>, rng: &mut impl Random) -> Vec<Srv> {
    let mut records: Vec<Srv> = records
        .into_iter()
        .filter(|r| !r.target.is_empty() && r.target != ".")
        .collect();
    records.sort_by_key(|r| r.priority);
    let mut out = Vec::with_capacity(records.len());
    let mut rest = records.as_slice();
    while let Some(first) = rest.first() {
        let n = rest
            .iter()
            .position(|r| r.priority != first.priority)
            .unwrap_or(rest.len());
        let (group, tail) = rest.split_at(n);
        let mut group = group.to_vec();
        while !group.is_empty() {
            let sum: u32 = group.iter().map(|r| u32::from(r.weight)).sum();
            let pick = if sum == 0 {
                rng.below(group.len() as u32) as usize
            } else {
                let r = rng.below(sum) + 1;
                let mut running = 0u32;
                group
                    .iter()
                    .position(|s| {
                        running += u32::from(s.weight);
                        running >= r
                    })
                    .unwrap_or(0)
            };
            out.push(group.remove(pick));
        }
        rest = tail;
    }
    out
}

/// A small SplitMix64 generator: the production [`Random`] (seeded from the hasher's random
/// keys, no dependency) and a seedable one for tests.
#[derive(Debug, Clone)]
pub struct SplitMix(pub u64);

impl SplitMix {
    /// Seeded from the process's random hash keys.
    pub fn from_entropy() -> Self {
        use std::hash::BuildHasher;
        Self(std::collections::hash_map::RandomState::new().hash_one(0x5150_u64))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }
}

/// SplitMix64's output function.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Random for SplitMix {
    fn below(&mut self, n: u32) -> u32 {
        // Lemire's multiply-shift: unbiased enough for load spreading.
        (((self.next_u64() >> 32) * u64::from(n)) >> 32) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Returns the numbers it is given, in turn.
    struct Script(Vec<u32>);

    impl Random for Script {
        fn below(&mut self, n: u32) -> u32 {
            let v = self.0.remove(0);
            assert!(v < n, "scripted {v} is not below {n}");
            v
        }
    }

    fn srv(priority: u16, weight: u16, target: &str) -> Srv {
        Srv {
            priority,
            weight,
            port: 5060,
            target: target.into(),
        }
    }

    fn targets(v: &[Srv]) -> Vec<&str> {
        v.iter().map(|s| s.target.as_str()).collect()
    }

    #[test]
    fn an_address_is_not_resolved_and_defaults_to_5060_udp() {
        assert_eq!(
            first_step("192.0.2.1", None, None),
            Step::Addr("192.0.2.1:5060".parse().unwrap(), Proto::Udp)
        );
        assert_eq!(
            first_step("::1", Some(5070), Some(Proto::Tcp)),
            Step::Addr("[::1]:5070".parse().unwrap(), Proto::Tcp)
        );
    }

    #[test]
    fn an_explicit_port_skips_naptr_and_srv() {
        assert_eq!(
            first_step("pbx.example.net", Some(5070), None),
            Step::Host("pbx.example.net".into(), 5070, Proto::Udp)
        );
        assert_eq!(
            first_step("pbx.example.net", Some(5070), Some(Proto::Tcp)),
            Step::Host("pbx.example.net".into(), 5070, Proto::Tcp)
        );
    }

    #[test]
    fn a_transport_without_port_asks_its_srv_and_a_bare_name_asks_naptr() {
        assert_eq!(
            first_step("example.net", None, Some(Proto::Tcp)),
            Step::Srv(Proto::Tcp, "_sip._tcp.example.net".into())
        );
        assert_eq!(
            first_step("example.net", None, None),
            Step::Naptr("example.net".into())
        );
        assert_eq!(
            srv_fallback("example.net"),
            vec![
                (Proto::Udp, "_sip._udp.example.net".to_owned()),
                (Proto::Tcp, "_sip._tcp.example.net".to_owned()),
                (Proto::Tls, "_sips._tcp.example.net".to_owned())
            ]
        );
        // A sips: URI asks for TLS only; an address over TLS defaults to 5061.
        assert_eq!(
            first_step("example.net", None, Some(Proto::Tls)),
            Step::Srv(Proto::Tls, "_sips._tcp.example.net".into())
        );
        assert_eq!(
            first_step("192.0.2.1", None, Some(Proto::Tls)),
            Step::Addr("192.0.2.1:5061".parse().unwrap(), Proto::Tls)
        );
    }

    #[test]
    fn naptr_keeps_sip_services_in_order_and_preference() {
        let n = |order, preference, flags: &str, services: &str, replacement: &str| Naptr {
            order,
            preference,
            flags: flags.into(),
            services: services.into(),
            replacement: replacement.into(),
        };
        let got = naptr_services(vec![
            n(20, 10, "s", "SIP+D2U", "_sip._udp.example.net."),
            n(10, 20, "S", "SIP+D2T", "_sip._tcp.example.net."),
            n(10, 10, "s", "SIPS+D2T", "_sips._tcp.example.net."),
            n(5, 10, "u", "E2U+sip", "!^.*$!sip:x@example.net!"),
            n(15, 10, "s", "SIP+D2S", "_sip._sctp.example.net."),
        ]);
        assert_eq!(
            got,
            vec![
                (Proto::Tls, "_sips._tcp.example.net".to_owned()),
                (Proto::Tcp, "_sip._tcp.example.net".to_owned()),
                (Proto::Udp, "_sip._udp.example.net".to_owned())
            ]
        );
    }

    #[test]
    fn srv_priority_first_then_weighted_draws() {
        let records = vec![
            srv(20, 0, "backup"),
            srv(10, 3, "a"),
            srv(10, 1, "b"),
            srv(30, 5, "."),
        ];
        // Draw 1..=4 → 3 (a's running sum is 3): a; then b alone (draw 1 of 1).
        let got = order_srv(records.clone(), &mut Script(vec![2, 0, 0]));
        assert_eq!(targets(&got), ["a", "b", "backup"]);
        // Draw 4 → b; then a alone.
        let got = order_srv(records, &mut Script(vec![3, 0, 0]));
        assert_eq!(targets(&got), ["b", "a", "backup"]);
    }

    #[test]
    fn srv_weights_are_proportions() {
        let records = vec![srv(10, 3, "a"), srv(10, 1, "b")];
        let mut rng = SplitMix(42);
        let firsts = (0..4000)
            .filter(|_| order_srv(records.clone(), &mut rng)[0].target == "a")
            .count();
        // 3:1 → 3000 of 4000; binomial σ ≈ 27.
        assert!((2850..=3150).contains(&firsts), "{firsts}");
    }

    #[test]
    fn zero_weights_are_drawn_uniformly() {
        let records = vec![srv(1, 0, "a"), srv(1, 0, "b")];
        let got = order_srv(records.clone(), &mut Script(vec![1, 0]));
        assert_eq!(targets(&got), ["b", "a"]);
        let got = order_srv(records, &mut Script(vec![0, 0]));
        assert_eq!(targets(&got), ["a", "b"]);
    }
}
