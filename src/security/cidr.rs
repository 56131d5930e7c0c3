//! `ADDRESS/PREFIX` networks (`10.0.0.0/8`, `2001:db8::/32`), for `security.trusted`.

use std::net::IpAddr;

/// An IPv4 or IPv6 network. A bare address is a network of one (`/32`, `/128`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    /// The network address, with the host bits cleared.
    addr: IpAddr,
    /// The prefix length: at most 32 for IPv4, 128 for IPv6.
    prefix: u8,
}

impl Cidr {
    /// True when `ip` lies in this network. An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`,
    /// what a dual-stack socket reports for an IPv4 peer) is compared as the IPv4 address.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(a)) => {
                mask_v4(u32::from(a), self.prefix) == u32::from(net)
            }
            (IpAddr::V6(net), IpAddr::V6(a)) => {
                mask_v6(u128::from(a), self.prefix) == u128::from(net)
            }
            _ => false,
        }
    }
}

fn mask_v4(a: u32, prefix: u8) -> u32 {
    match prefix {
        0 => 0,
        p => a & (u32::MAX << (32 - u32::from(p.min(32)))),
    }
}

fn mask_v6(a: u128, prefix: u8) -> u128 {
    match prefix {
        0 => 0,
        p => a & (u128::MAX << (128 - u32::from(p.min(128)))),
    }
}

/// The IPv6 /64 that holds `ip` (what one customer or host usually gets), or the IPv4
/// address itself: per-source limits count an IPv6 source by its /64, so that one host cannot
/// escape them (or fill the tables) by walking through its 2^64 addresses.
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(mask_v6(u128::from(v6), 64).into()),
        v4 => v4,
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not ADDRESS/PREFIX"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: the prefix must be 0 to {max}"))?,
        };
        let addr = match addr {
            IpAddr::V4(a) => IpAddr::V4(mask_v4(u32::from(a), prefix).into()),
            IpAddr::V6(a) => IpAddr::V6(mask_v6(u128::from(a), prefix).into()),
        };
        Ok(Self { addr, prefix })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parse_and_contain() {
        let n: Cidr = "10.1.2.3/8".parse().unwrap();
        assert_eq!(n.to_string(), "10.0.0.0/8", "host bits are cleared");
        assert!(n.contains(ip("10.255.0.1")));
        assert!(!n.contains(ip("11.0.0.1")));
        assert!(n.contains(ip("::ffff:10.9.9.9")), "IPv4-mapped IPv6");
        assert!(!n.contains(ip("2001:db8::1")));

        let one: Cidr = "192.0.2.7".parse().unwrap();
        assert_eq!(one.to_string(), "192.0.2.7/32");
        assert!(one.contains(ip("192.0.2.7")));
        assert!(!one.contains(ip("192.0.2.8")));

        let v6: Cidr = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains(ip("2001:db8:ffff::1")));
        assert!(!v6.contains(ip("2001:db9::1")));
        assert!(!v6.contains(ip("10.0.0.1")));

        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("203.0.113.1")));
    }

    #[test]
    fn bad_networks() {
        for s in [
            "10.0.0.0/33",
            "::/129",
            "10.0.0/8",
            "x",
            "10.0.0.0/",
            "10.0.0.0/-1",
        ] {
            assert!(s.parse::<Cidr>().is_err(), "{s}");
        }
    }

    #[test]
    fn ipv6_sources_count_by_their_64() {
        assert_eq!(source_key(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(
            source_key(ip("2001:db8:1:2:bbbb::9")),
            source_key(ip("2001:db8:1:2:aaaa::1"))
        );
        assert_eq!(source_key(ip("192.0.2.1")), ip("192.0.2.1"));
        assert_eq!(source_key(ip("::ffff:192.0.2.1")), ip("192.0.2.1"));
    }
}
