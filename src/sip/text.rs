//! Addresses written into SIP text (`received=`, flow tokens, Record-Route, branch MACs,
//! CDR rows), fast. The standard library's `Display` for an IPv4 address formats each octet
//! through the formatter's padding machinery: ~1,300 instructions an address, written four
//! to six times per proxied call — 2.5 % of a call's instructions under callgrind (issue
//! #15). These write the same text (IPv6 goes to the standard library: rare, and its
//! compression rules are not worth a copy).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// An IP address as `Display` writes it (`192.0.2.1`, `2001:db8::1`).
#[derive(Debug, Clone, Copy)]
pub struct Ip(pub IpAddr);

/// A socket address as `Display` writes it (`192.0.2.1:5060`, `[2001:db8::1]:5060`).
#[derive(Debug, Clone, Copy)]
pub struct Addr(pub SocketAddr);

/// Room for `255.255.255.255:65535`.
const V4_PORT: usize = 21;

/// Appends `n` in decimal to `buf` at `at`; the new end.
fn decimal(buf: &mut [u8; V4_PORT], at: usize, n: u16) -> usize {
    let mut digits = [0u8; 5];
    let mut len = 0;
    let mut n = n;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for (i, d) in digits[..len].iter().rev().enumerate() {
        buf[at + i] = *d;
    }
    at + len
}

/// Writes `ip` (and `:port`) into `buf`; the length written.
fn v4(buf: &mut [u8; V4_PORT], ip: Ipv4Addr, port: Option<u16>) -> usize {
    let mut at = 0;
    for (i, octet) in ip.octets().into_iter().enumerate() {
        if i > 0 {
            buf[at] = b'.';
            at += 1;
        }
        at = decimal(buf, at, u16::from(octet));
    }
    if let Some(port) = port {
        buf[at] = b':';
        at = decimal(buf, at + 1, port);
    }
    at
}

/// Writes what `v4` put in `buf` (ASCII digits, dots and a colon: always UTF-8).
fn pad(f: &mut fmt::Formatter<'_>, buf: &[u8]) -> fmt::Result {
    f.pad(std::str::from_utf8(buf).unwrap_or_default())
}

impl fmt::Display for Ip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            IpAddr::V4(ip) => {
                let mut buf = [0u8; V4_PORT];
                let n = v4(&mut buf, ip, None);
                pad(f, &buf[..n])
            }
            IpAddr::V6(ip) => ip.fmt(f),
        }
    }
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            SocketAddr::V4(a) => {
                let mut buf = [0u8; V4_PORT];
                let n = v4(&mut buf, *a.ip(), Some(a.port()));
                pad(f, &buf[..n])
            }
            SocketAddr::V6(a) => a.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_text_as_the_standard_library() {
        let ips = [
            "0.0.0.0",
            "255.255.255.255",
            "10.0.0.1",
            "192.0.2.100",
            "100.64.9.99",
            "2001:db8::1",
            "::ffff:192.0.2.1",
            "::",
        ];
        for ip in ips {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(Ip(ip).to_string(), ip.to_string());
            for port in [0, 9, 10, 99, 100, 5060, 9999, 10000, 65535] {
                let a = SocketAddr::new(ip, port);
                assert_eq!(Addr(a).to_string(), a.to_string());
            }
        }
        let scoped: SocketAddr = "[fe80::1%2]:5060".parse().unwrap();
        assert_eq!(Addr(scoped).to_string(), scoped.to_string());
        // Width and alignment are honoured as by the standard library.
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(format!("{:>12}|", Ip(ip)), format!("{ip:>12}|"));
    }
}
