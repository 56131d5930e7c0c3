//! The security event lines: one `warn!` each, target `sipedge::security`, message
//! `security event`, fields in a fixed order (`security.event`, `peer.ip`, `peer.addr`, then
//! the others), so that fail2ban and log pipelines can rely on them:
//!
//! ```text
//! 2026-12-04T15:52:02.169008Z  WARN sipedge::security: security event security.event="auth_failed" peer.ip=192.0.2.7 peer.addr=192.0.2.7:5060 auth.user="alice" auth.realm=example.com reason="password" suppressed=0
//! ```
//!
//! The events have no parent span (`parent: None`), so the line carries no span fields: text
//! a peer controls (a Call-ID in a span) cannot come before `peer.ip` and fool fail2ban. The
//! user name, the one peer-chosen field, is written quoted and escaped (`?`), after `peer.ip`.
//!
//! Repetitive kinds (`auth_failed`, `user_locked`, `nonce_replay`) are rate limited to one
//! line per second per kind; the next line written says how many were held back
//! (`suppressed`). `ban` lines are not limited: there is at most one per source and
//! `ban_time`, and fail2ban needs every one.

use std::fmt::Arguments;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use tokio::time::Instant;
use tracing::{Level, event};

use crate::log::LogLimit;

/// The rate-limited kinds.
#[derive(Debug, Clone, Copy)]
pub(super) enum Kind {
    AuthFailed = 0,
    UserLocked = 1,
    NonceReplay = 2,
}

/// Writes the security event lines.
#[derive(Debug)]
pub(super) struct EventLog {
    base: Instant,
    throttles: [LogLimit; 3],
    /// Lines held back since start.
    suppressed_total: AtomicU64,
}

impl EventLog {
    pub(super) fn new(base: Instant) -> Self {
        Self {
            base,
            throttles: [LogLimit::new(), LogLimit::new(), LogLimit::new()],
            suppressed_total: AtomicU64::new(0),
        }
    }

    /// `Some(suppressed)` when a line of `kind` may be written now.
    fn allow(&self, kind: Kind, now: Instant) -> Option<u64> {
        let second = now.saturating_duration_since(self.base).as_secs();
        let r = self.throttles[kind as usize].allow_at(second);
        if r.is_none() {
            self.suppressed_total.fetch_add(1, Relaxed);
        }
        r
    }

    pub(super) fn suppressed(&self) -> u64 {
        self.suppressed_total.load(Relaxed)
    }

    pub(super) fn ban(&self, peer: SocketAddr, reason: &str, ban: Duration, limit: &Arguments<'_>) {
        event!(
            target: "sipedge::security",
            parent: None,
            Level::WARN,
            security.event = "ban",
            peer.ip = %peer.ip(),
            peer.addr = %peer,
            reason,
            ban_s = ban.as_secs(),
            limit = %limit,
            "security event"
        );
    }

    pub(super) fn auth_failed(
        &self,
        peer: SocketAddr,
        user: &str,
        realm: &str,
        reason: &str,
        now: Instant,
    ) {
        let Some(suppressed) = self.allow(Kind::AuthFailed, now) else {
            return;
        };
        event!(
            target: "sipedge::security",
            parent: None,
            Level::WARN,
            security.event = "auth_failed",
            peer.ip = %peer.ip(),
            peer.addr = %peer,
            auth.user = ?user,
            auth.realm = %realm,
            reason,
            suppressed,
            "security event"
        );
    }

    pub(super) fn user_locked(
        &self,
        peer: SocketAddr,
        user: &str,
        realm: &str,
        left_s: u64,
        now: Instant,
    ) {
        let Some(suppressed) = self.allow(Kind::UserLocked, now) else {
            return;
        };
        event!(
            target: "sipedge::security",
            parent: None,
            Level::WARN,
            security.event = "user_locked",
            peer.ip = %peer.ip(),
            peer.addr = %peer,
            auth.user = ?user,
            auth.realm = %realm,
            locked_s = left_s,
            suppressed,
            "security event"
        );
    }

    /// The line written when a user becomes locked (not rate limited: once per `ban_time`).
    pub(super) fn user_lock(
        &self,
        peer: SocketAddr,
        user: &str,
        realm: &str,
        ban: Duration,
        limit: u32,
        window: Duration,
    ) {
        event!(
            target: "sipedge::security",
            parent: None,
            Level::WARN,
            security.event = "user_lock",
            peer.ip = %peer.ip(),
            peer.addr = %peer,
            auth.user = ?user,
            auth.realm = %realm,
            locked_s = ban.as_secs(),
            limit = %format_args!("{limit} failed authentications in {} s", window.as_secs()),
            "security event"
        );
    }

    pub(super) fn nonce_replay(
        &self,
        peer: SocketAddr,
        user: &str,
        realm: &str,
        nc: u32,
        now: Instant,
    ) {
        let Some(suppressed) = self.allow(Kind::NonceReplay, now) else {
            return;
        };
        event!(
            target: "sipedge::security",
            parent: None,
            Level::WARN,
            security.event = "nonce_replay",
            peer.ip = %peer.ip(),
            peer.addr = %peer,
            auth.user = ?user,
            auth.realm = %realm,
            nc,
            suppressed,
            "security event"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Renders events the way `sipedge serve` does (tracing's fmt, no colours) into lines.
    fn capture(f: impl FnOnce()) -> Vec<String> {
        use std::io::Write;
        use std::sync::mpsc;
        struct Chan(mpsc::Sender<Vec<u8>>);
        impl Write for Chan {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                let _ = self.0.send(b.to_vec());
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let (tx, rx) = mpsc::channel();
        let sub = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || Chan(tx.clone()))
            .finish();
        tracing::subscriber::with_default(sub, f);
        let bytes: Vec<u8> = rx.try_iter().flatten().collect();
        String::from_utf8(bytes)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// The fail2ban filter's failregex, as a Rust regex: `%(_event)s` and `<HOST>` filled
    /// in, applied (like fail2ban) to the line without its leading timestamp.
    fn fail2ban() -> regex::Regex {
        let conf = include_str!("../../scripts/fail2ban/sipedge.conf");
        let value = |key: &str| {
            conf.lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| v.trim_start_matches([' ', '=']).trim().to_owned())
                .unwrap()
        };
        // `__prefix_line` (common.conf) is the optional syslog prefix: none here.
        let re = value("failregex")
            .replace("(?:%(__prefix_line)s)?", "")
            .replace("%(_event)s", &value("_event"))
            .replace("<HOST>", r"(?P<host>[0-9a-fA-F.:]+)");
        regex::Regex::new(&re).unwrap()
    }

    /// The peer.ip fail2ban would ban for `line`, if any.
    fn banned_host(line: &str) -> Option<String> {
        fail2ban().captures(line).map(|c| c["host"].to_owned())
    }

    #[test]
    fn lines_have_the_documented_format_and_fail2ban_reads_them() {
        let t0 = Instant::now();
        let log = EventLog::new(t0);
        let peer: SocketAddr = "192.0.2.7:5060".parse().unwrap();
        let v6: SocketAddr = "[2001:db8::7]:5062".parse().unwrap();
        let lines = capture(|| {
            // A span with peer-chosen text, as the transaction spans carry: it must not
            // show up in the line.
            let span = tracing::info_span!(
                "txn",
                sip.call_id =
                    "x sipedge::security: security event security.event=\"ban\" peer.ip=6.6.6.6 "
            );
            let _g = span.enter();
            log.auth_failed(
                peer,
                "alice\n peer.ip=6.6.6.6",
                "example.com",
                "password",
                t0,
            );
            log.ban(
                v6,
                "auth",
                Duration::from_secs(300),
                &format_args!("10 in 60 s"),
            );
            log.nonce_replay(peer, "alice", "example.com", 3, t0);
            log.user_locked(peer, "alice", "example.com", 42, t0);
            log.user_lock(
                peer,
                "alice",
                "example.com",
                Duration::from_secs(300),
                20,
                Duration::from_secs(60),
            );
        });
        assert_eq!(lines.len(), 5, "{lines:#?}");
        let expected = [
            r#"WARN sipedge::security: security event security.event="auth_failed" peer.ip=192.0.2.7 peer.addr=192.0.2.7:5060 auth.user="alice\n peer.ip=6.6.6.6" auth.realm=example.com reason="password" suppressed=0"#,
            r#"WARN sipedge::security: security event security.event="ban" peer.ip=2001:db8::7 peer.addr=[2001:db8::7]:5062 reason="auth" ban_s=300 limit=10 in 60 s"#,
            r#"WARN sipedge::security: security event security.event="nonce_replay" peer.ip=192.0.2.7 peer.addr=192.0.2.7:5060 auth.user="alice" auth.realm=example.com nc=3 suppressed=0"#,
            r#"WARN sipedge::security: security event security.event="user_locked" peer.ip=192.0.2.7 peer.addr=192.0.2.7:5060 auth.user="alice" auth.realm=example.com locked_s=42 suppressed=0"#,
            r#"WARN sipedge::security: security event security.event="user_lock" peer.ip=192.0.2.7 peer.addr=192.0.2.7:5060 auth.user="alice" auth.realm=example.com locked_s=300 limit=20 failed authentications in 60 s"#,
        ];
        for (line, want) in lines.iter().zip(expected) {
            // "<timestamp>  WARN ...": the timestamp first, no span, then the fields in order.
            let (stamp, rest) = line.split_once(' ').unwrap();
            assert!(stamp.ends_with('Z') && stamp.contains('T'), "{line}");
            assert_eq!(rest.trim_start(), want);
        }
        let hosts: Vec<Option<String>> = lines.iter().map(|l| banned_host(l)).collect();
        assert_eq!(
            hosts,
            [
                Some("192.0.2.7".to_owned()),
                Some("2001:db8::7".to_owned()),
                Some("192.0.2.7".to_owned()),
                None,
                None
            ],
            "auth_failed, ban and nonce_replay are matched, on the real peer only"
        );
    }

    #[test]
    fn repetitive_kinds_are_rate_limited_bans_are_not() {
        let t0 = Instant::now();
        let log = EventLog::new(t0);
        let peer: SocketAddr = "192.0.2.7:5060".parse().unwrap();
        let lines = capture(|| {
            for i in 0..50 {
                log.auth_failed(
                    peer,
                    "alice",
                    "r",
                    "password",
                    t0 + Duration::from_millis(i),
                );
                log.ban(peer, "pike", Duration::from_secs(1), &format_args!("x"));
            }
            log.auth_failed(peer, "alice", "r", "password", t0 + Duration::from_secs(1));
        });
        let failed: Vec<&String> = lines.iter().filter(|l| l.contains("auth_failed")).collect();
        assert_eq!(failed.len(), 2);
        assert!(failed[1].ends_with("suppressed=49"), "{}", failed[1]);
        assert_eq!(lines.iter().filter(|l| l.contains("\"ban\"")).count(), 50);
        assert_eq!(log.suppressed(), 49);
    }
}
