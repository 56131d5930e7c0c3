//! The limiter, bans and locks on virtual time (`t0 + Duration`), no sockets, no sleeps.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::time::Instant;

use super::*;
use crate::config::Config;

fn cfg(extra: &str) -> SecurityConfig {
    Config::from_toml(&format!("[security]\n{extra}"), || {
        "192.0.2.10".parse().unwrap()
    })
    .unwrap()
    .security
}

fn peer(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// How many of `n` messages at `at` pass.
fn burst(sec: &Security, p: SocketAddr, n: u32, at: Instant) -> u32 {
    (0..n).filter(|_| sec.allow(p, at)).count() as u32
}

#[test]
fn rate_limit_allows_the_budget_then_bans() {
    let t0 = Instant::now();
    let sec = Security::new(
        cfg("pike_requests = 10\npike_window = 2\nban_time = 60"),
        t0,
    );
    let a = peer("203.0.113.5:5060");
    assert_eq!(
        burst(&sec, a, 10, t0),
        10,
        "a burst of pike_requests passes"
    );
    assert!(!sec.is_banned(a.ip(), t0));
    assert!(!sec.allow(a, t0), "the next one bans");
    assert!(sec.is_banned(a.ip(), t0));
    assert!(!sec.is_banned("203.0.113.6".parse().unwrap(), t0));
    let s = sec.stats(t0);
    assert_eq!((s.bans_pike, s.bans_active, s.dropped), (1, 1, 1));
    // Banned: everything dropped for ban_time, even at a polite rate.
    for i in 1..60 {
        assert!(!sec.allow(a, t0 + Duration::from_secs(i)), "second {i}");
    }
    assert_eq!(sec.stats(t0 + Duration::from_secs(59)).dropped, 60);
    // After ban_time, a fresh budget.
    let later = t0 + Duration::from_secs(60);
    assert_eq!(burst(&sec, a, 10, later), 10);
    assert_eq!(sec.stats(later).bans_active, 0);
    // Another source was never affected.
    assert_eq!(burst(&sec, peer("203.0.113.6:5060"), 10, t0), 10);
}

#[test]
fn a_steady_rate_within_the_limit_is_never_banned() {
    let t0 = Instant::now();
    // 10 per 2 s = one per 200 ms; a phone or PBX sending exactly that forever is fine.
    let sec = Security::new(cfg("pike_requests = 10\npike_window = 2"), t0);
    let a = peer("203.0.113.5:5060");
    for i in 0..1000 {
        assert!(sec.allow(a, t0 + ms(200 * i)), "message {i}");
    }
    // Slightly faster than allowed (one per 150 ms) is caught once the burst is spent.
    let b = peer("203.0.113.7:5060");
    let first_refused = (0..1000).find(|i| !sec.allow(b, t0 + ms(150 * i)));
    // Budget 10 and a refill of 0.75 per message: refused at about message 40.
    assert!(matches!(first_refused, Some(30..=45)), "{first_refused:?}");
    assert_eq!(sec.stats(t0).bans_pike, 1);
}

#[test]
fn ports_do_not_matter_and_ipv6_counts_by_64() {
    let t0 = Instant::now();
    let sec = Security::new(cfg("pike_requests = 4\npike_window = 2"), t0);
    // Four ports of one address share the budget.
    for port in 1..=4 {
        assert!(sec.allow(peer(&format!("198.51.100.1:{port}")), t0));
    }
    assert!(!sec.allow(peer("198.51.100.1:5"), t0));
    // So do four addresses of one /64.
    for host in 1..=4 {
        assert!(sec.allow(peer(&format!("[2001:db8:1:2::{host}]:5060")), t0));
    }
    assert!(!sec.allow(peer("[2001:db8:1:2:ffff::1]:5060"), t0));
    assert!(
        sec.allow(peer("[2001:db8:1:3::1]:5060"), t0),
        "the next /64"
    );
}

#[test]
fn trusted_sources_are_never_limited_banned_or_locked() {
    let t0 = Instant::now();
    let sec = Security::new(
        cfg(
            "pike_requests = 2\nauth_failures = 1\nauth_failures_user = 1\ntrusted = [\"10.0.0.0/8\"]",
        ),
        t0,
    );
    let pbx = peer("10.1.2.3:5060");
    assert_eq!(burst(&sec, pbx, 10_000, t0), 10_000);
    let v = sec.auth_failed(pbx, "alice", Some("example.com"), "r", "password", t0);
    assert_eq!(v, FailureVerdict::default());
    assert!(sec.allow(pbx, t0));
    assert!(!sec.user_locked(pbx, "alice", "example.com", "r", t0));
    let s = sec.stats(t0);
    assert_eq!((s.auth_failures, s.bans_auth, s.user_locks), (1, 0, 0));
    assert_eq!(s.sources_tracked, 0, "trusted sources take no entry");
    // The default trusts loopback.
    let sec = Security::new(cfg("pike_requests = 1"), t0);
    assert_eq!(burst(&sec, peer("127.0.0.1:5060"), 100, t0), 100);
    assert_eq!(burst(&sec, peer("[::1]:5060"), 100, t0), 100);
}

#[test]
fn pike_off_means_no_rate_limit_and_no_entries() {
    let t0 = Instant::now();
    let sec = Security::new(cfg("pike_requests = 0\ntrusted = []"), t0);
    let a = peer("203.0.113.5:5060");
    assert_eq!(burst(&sec, a, 10_000, t0), 10_000);
    assert_eq!(sec.stats(t0).sources_tracked, 0);
}

#[test]
fn failed_authentications_ban_the_source() {
    let t0 = Instant::now();
    let sec = Security::new(
        cfg(
            "pike_requests = 0\nauth_failures = 5\nauth_window = 60\nban_time = 300\nauth_failures_user = 0",
        ),
        t0,
    );
    let a = peer("203.0.113.5:5060");
    for i in 0..4 {
        let v = sec.auth_failed(a, "alice", Some("example.com"), "r", "password", t0 + ms(i));
        assert!(!v.source_banned, "failure {i}");
        assert!(sec.allow(a, t0 + ms(i)));
    }
    let v = sec.auth_failed(
        a,
        "alice",
        Some("example.com"),
        "r",
        "password",
        t0 + ms(10),
    );
    assert!(v.source_banned, "the fifth bans");
    assert!(!v.user_locked, "per-user locks are off");
    assert!(
        !sec.allow(a, t0 + ms(11)),
        "packets of a banned source are dropped"
    );
    assert!(
        !sec.allow(peer("203.0.113.5:1"), t0 + ms(12)),
        "whatever the port"
    );
    assert!(
        sec.allow(peer("203.0.113.9:5060"), t0 + ms(12)),
        "others pass"
    );
    assert!(!sec.allow(a, t0 + Duration::from_secs(299)));
    let s = sec.stats(t0 + ms(20));
    assert_eq!((s.auth_failures, s.bans_auth, s.bans_active), (5, 1, 1));
    assert!(sec.allow(a, t0 + Duration::from_secs(301)), "the ban ends");
    assert_eq!(sec.stats(t0 + Duration::from_secs(301)).bans_active, 0);
    // The count starts again: four more failures are challenged, the fifth bans again.
    let after = t0 + Duration::from_secs(302);
    for _ in 0..4 {
        let v = sec.auth_failed(a, "alice", Some("example.com"), "r", "password", after);
        assert!(!v.source_banned);
    }
    let v = sec.auth_failed(a, "alice", Some("example.com"), "r", "password", after);
    assert!(v.source_banned);
    assert_eq!(sec.stats(after).bans_auth, 2);
}

#[test]
fn failures_spread_over_more_than_the_window_do_not_ban() {
    let t0 = Instant::now();
    let sec = Security::new(cfg("auth_failures = 3\nauth_window = 60"), t0);
    let a = peer("203.0.113.5:5060");
    // A phone with a stale password retrying every 40 s: two per window at most.
    for i in 0..20 {
        let v = sec.auth_failed(
            a,
            "bob",
            Some("example.com"),
            "r",
            "password",
            t0 + Duration::from_secs(40 * i),
        );
        assert!(!v.source_banned, "failure {i}");
    }
}

#[test]
fn success_resets_the_counts() {
    let t0 = Instant::now();
    let sec = Security::new(cfg("auth_failures = 3\nauth_failures_user = 3"), t0);
    let a = peer("203.0.113.5:5060");
    for round in 0..5 {
        for _ in 0..2 {
            let v = sec.auth_failed(a, "bob", Some("example.com"), "r", "password", t0);
            assert_eq!(v, FailureVerdict::default(), "round {round}");
        }
        sec.auth_ok(a, "bob", "EXAMPLE.com");
    }
    assert!(sec.allow(a, t0));
    assert!(!sec.user_locked(a, "bob", "example.com", "r", t0));
}

#[test]
fn failures_of_one_user_from_many_sources_lock_the_user() {
    let t0 = Instant::now();
    let sec = Security::new(
        cfg("auth_failures = 100\nauth_failures_user = 4\nban_time = 120"),
        t0,
    );
    let mut last = FailureVerdict::default();
    for i in 0..4 {
        assert!(!last.user_locked);
        let p = peer(&format!("203.0.113.{}:5060", i + 1));
        last = sec.auth_failed(p, "alice", Some("example.com"), "r", "password", t0);
    }
    assert!(
        last.user_locked,
        "the fourth failure from a fourth source locks alice"
    );
    assert!(!last.source_banned);
    let elsewhere = peer("198.51.100.1:5060");
    assert!(sec.user_locked(elsewhere, "alice", "example.com", "r", t0 + ms(1)));
    assert!(!sec.user_locked(elsewhere, "bob", "example.com", "r", t0 + ms(1)));
    assert!(!sec.user_locked(elsewhere, "alice", "other.example", "r", t0 + ms(1)));
    assert!(sec.allow(elsewhere, t0), "a lock is not a source ban");
    assert!(!sec.user_locked(
        elsewhere,
        "alice",
        "example.com",
        "r",
        t0 + Duration::from_secs(121)
    ));
    let s = sec.stats(t0 + ms(2));
    assert_eq!(
        (s.user_locks, s.users_locked, s.auth_refused_locked),
        (1, 1, 1)
    );
    // Unknown users are counted per source only: made-up names take no user entry.
    for i in 0..10 {
        sec.auth_failed(elsewhere, &format!("u{i}"), None, "r", "unknown_user", t0);
    }
    assert_eq!(sec.users.len(), 1);
}

#[test]
fn the_source_map_is_bounded() {
    let t0 = Instant::now();
    let sec = Security::new(
        cfg("pike_requests = 2\npike_window = 2\nmax_tracked = 100\ntrusted = []"),
        t0,
    );
    // A spoofed flood: every packet from a new address.
    for i in 0..1000u32 {
        let ip = std::net::Ipv4Addr::from(0x0a00_0000 + i);
        assert!(
            sec.allow(SocketAddr::new(ip.into(), 5060), t0),
            "fail open for new sources"
        );
    }
    let s = sec.stats(t0);
    assert_eq!(s.sources_tracked, 100);
    assert_eq!(s.untracked, 900);
    // Once they are idle (budget refilled), the next sweep makes room.
    let later = t0 + Duration::from_secs(3);
    assert!(sec.allow(peer("203.0.113.1:5060"), later));
    let s = sec.stats(later);
    assert_eq!(s.sources_tracked, 1, "idle entries swept");
    assert_eq!(s.untracked, 900);
    // Bans survive a sweep.
    let bad = peer("203.0.113.2:5060");
    assert_eq!(burst(&sec, bad, 3, later), 2);
    for i in 0..200u32 {
        let ip = std::net::Ipv4Addr::from(0x0b00_0000 + i);
        sec.allow(
            SocketAddr::new(ip.into(), 5060),
            later + Duration::from_secs(4),
        );
    }
    assert!(
        !sec.allow(bad, later + Duration::from_secs(5)),
        "still banned"
    );
}

#[test]
fn sweeps_are_rate_limited() {
    let t0 = Instant::now();
    let sec = Security::new(cfg("max_tracked = 1\ntrusted = []"), t0);
    assert!(sec.sweep_due(&sec.last_sweep_sources, t0));
    assert!(!sec.sweep_due(&sec.last_sweep_sources, t0 + ms(999)));
    assert!(sec.sweep_due(&sec.last_sweep_sources, t0 + ms(1000)));
    assert!(!sec.sweep_due(&sec.last_sweep_sources, t0 + ms(1500)));
}

/// The cost of the check every received message pays. Run by hand:
/// `cargo test --release --lib security::tests::allow_cost -- --ignored --nocapture`.
#[test]
#[ignore]
fn allow_cost() {
    let t0 = Instant::now();
    let sec = Security::new(
        cfg("pike_requests = 1000000\npike_window = 1\ntrusted = []"),
        t0,
    );
    let sources: Vec<SocketAddr> = (0..10_000u32)
        .map(|i| SocketAddr::new(std::net::Ipv4Addr::from(0xcb00_7100 + i).into(), 5060))
        .collect();
    let n = 10_000_000u32;
    #[allow(clippy::disallowed_methods)] // a measurement, not protocol logic
    let start = std::time::Instant::now();
    let mut passed = 0u32;
    for i in 0..n {
        let p = sources[(i as usize) % sources.len()];
        passed += u32::from(sec.allow(p, t0 + Duration::from_micros(u64::from(i))));
    }
    let ns = start.elapsed().as_nanos() / u128::from(n);
    println!("Security::allow: {ns} ns per message over 10,000 sources ({passed} passed)");
    assert_eq!(passed, n);
}

/// A reload's new thresholds apply from the next message; a ban in progress runs to its end.
#[test]
fn new_thresholds_apply_at_once_and_bans_in_progress_stay() {
    let t0 = Instant::now();
    let sec = Security::new(
        cfg("pike_requests = 4\npike_window = 2\nban_time = 60\ntrusted = []"),
        t0,
    );
    let (a, b) = (peer("203.0.113.5:5060"), peer("203.0.113.6:5060"));
    assert_eq!(burst(&sec, a, 5, t0), 4, "banned at the fifth");
    sec.set_config(cfg(
        "pike_requests = 20\npike_window = 2\nban_time = 60\ntrusted = [\"203.0.113.6/32\"]",
    ));
    assert_eq!(burst(&sec, b, 100, t0), 100, "newly trusted");
    let c = peer("203.0.113.7:5060");
    assert_eq!(burst(&sec, c, 21, t0), 20, "the new budget");
    assert!(!sec.allow(a, t0 + Duration::from_secs(30)), "still banned");
    assert!(sec.allow(a, t0 + Duration::from_secs(61)));
}
