//! The REGISTER client of one trunk (Kamailio's `uac_reg`), sans-IO: it registers the trunk's
//! account at the provider (RFC 3261 §10.2), answers a 401/407 with the trunk's credentials
//! (RFC 3261 §22.2, [`crate::auth::digest::authorization`]), refreshes before the granted
//! expiry runs out, retries with a growing back-off after a failure, and unregisters
//! (`Expires: 0`) when asked.
//!
//! [`RegClient`] is fed with [`RegClient::handle_response`] and [`RegClient::handle_timeout`]
//! (each with `now`) and drained with [`RegClient::poll_transmit`], [`RegClient::poll_event`]
//! and [`RegClient::poll_timeout`]. Retransmissions and Timer F are the non-INVITE client
//! transaction's ([`ClientTxn`]). No clock, no socket: [`super`] is the shell.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::auth::digest::{self, Challenge};
use crate::config::{Registration, Trunk};
use crate::sip::{HeaderName, Message};
use crate::transaction::{ClientAction, ClientTxn, Kind, Timers};

/// Branch prefix of our REGISTERs (magic cookie first): `z9hG4bK-tr-<trunk index>-<salt>-<CSeq>`,
/// so that the driver hands their responses here before the proxy looks for a transaction.
pub const BRANCH_PREFIX: &str = "z9hG4bK-tr-";

/// The first retry after a failure; each further one doubles, up to [`RETRY_MAX`].
pub const RETRY_FIRST: Duration = Duration::from_secs(30);
pub const RETRY_MAX: Duration = Duration::from_secs(1800);

/// Where a trunk's registration stands (the `trunk_registered` gauge and `show`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegState {
    /// A REGISTER is under way (first one, or after a failure).
    Registering,
    /// The provider granted the registration (a refresh may be under way).
    Registered,
    /// The last attempt failed; a retry is scheduled.
    Failed,
    /// Unregistered (`Expires: 0` answered), at shutdown.
    Unregistered,
}

/// What happened, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegEvent {
    /// The provider granted `expires` seconds.
    Registered { expires: u64 },
    /// The attempt failed with this status (408 for no answer, 503 when it could not be sent,
    /// the 401/407 itself when the credentials were refused).
    Failed { status: u16 },
    /// The unregistration was answered.
    Unregistered,
}

/// The trunk's REGISTER client. See the module documentation.
#[derive(Debug)]
pub struct RegClient {
    trunk: Arc<Trunk>,
    /// The trunk's index in the configuration (in our branches).
    idx: usize,
    reg: Registration,
    /// Our address in Via and Contact (`server.advertise`, the UDP socket's port).
    via: SocketAddr,
    /// `<trunk index>-<salt>`: the part of our branches that names this client.
    tag: String,
    call_id: String,
    cseq: u32,
    timers: Timers,
    /// The REGISTER under way and its branch.
    txn: Option<(ClientTxn, String)>,
    /// The Expires of the REGISTER under way (0: unregistering).
    asked: u64,
    /// The challenge answered by the REGISTER under way, and its nonce count.
    answered: Option<(Challenge, bool, u32)>,
    state: RegState,
    /// When the next REGISTER goes (refresh or retry).
    next: Option<Instant>,
    failures: u32,
    out: VecDeque<Vec<u8>>,
    events: VecDeque<RegEvent>,
}

impl RegClient {
    /// A client for `trunk` (which must have a registration: `None` otherwise), index `idx` in
    /// the trunk list, sending from `via`; `salt` keeps Call-ID and branches unique across
    /// restarts. The first REGISTER goes at `now`.
    pub fn new(
        trunk: Arc<Trunk>,
        idx: usize,
        via: SocketAddr,
        salt: &str,
        timers: Timers,
        now: Instant,
    ) -> Option<Self> {
        let reg = trunk.registration.clone()?;
        Some(Self {
            call_id: format!("tr{idx}-{salt}@{}", via.ip()),
            tag: format!("{idx}-{salt}"),
            asked: reg.expires.as_secs(),
            reg,
            trunk,
            idx,
            via,
            cseq: 0,
            timers,
            txn: None,
            answered: None,
            state: RegState::Registering,
            next: Some(now),
            failures: 0,
            out: VecDeque::new(),
            events: VecDeque::new(),
        })
    }

    /// The trunk's name.
    pub fn name(&self) -> &str {
        &self.trunk.name
    }

    /// The trunk's index in the configuration.
    pub fn index(&self) -> usize {
        self.idx
    }

    pub fn state(&self) -> RegState {
        self.state
    }

    /// The trunk index in a branch of ours (`None`: not a REGISTER branch of ours).
    pub fn index_of_branch(branch: &str) -> Option<usize> {
        branch
            .strip_prefix(BRANCH_PREFIX)?
            .split('-')
            .next()?
            .parse()
            .ok()
    }

    /// A response whose top Via carries one of our branches.
    pub fn handle_response(&mut self, now: Instant, resp: Message) {
        let branch = resp
            .top_via()
            .ok()
            .and_then(|v| v.branch().map(str::to_owned));
        match &mut self.txn {
            Some((txn, b)) if branch.as_deref() == Some(b.as_str()) => txn.on_response(resp, now),
            // A late answer to an earlier REGISTER: its transaction is gone.
            _ => return,
        }
        self.drain(now);
    }

    /// The deadline of [`RegClient::poll_timeout`] passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some((txn, _)) = &mut self.txn {
            txn.on_timer(now);
        }
        self.drain(now);
        if self.txn.is_none() && self.next.is_some_and(|n| n <= now) {
            self.next = None;
            self.answered = None;
            self.send(self.reg.expires.as_secs(), now);
        }
    }

    /// The REGISTER could not be sent (the registrar's name does not resolve, the socket
    /// refused): the attempt fails as 503.
    pub fn handle_send_error(&mut self, now: Instant) {
        if let Some((txn, _)) = &mut self.txn {
            txn.on_transport_error(now);
        }
        self.drain(now);
    }

    /// Unregisters (`Expires: 0`) when registered; the answer is not waited for by anyone, so
    /// a challenge is answered at once with the last nonce (nonce count + 1).
    pub fn unregister(&mut self, now: Instant) {
        if self.state != RegState::Registered {
            return;
        }
        self.next = None;
        self.txn = None;
        self.answered = self
            .answered
            .take()
            .map(|(c, proxy, nc)| (c, proxy, nc + 1));
        self.send(0, now);
    }

    /// The next REGISTER to send (to the registrar).
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.out.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<RegEvent> {
        self.events.pop_front()
    }

    /// When [`RegClient::handle_timeout`] is due next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let txn = self.txn.as_ref().and_then(|(t, _)| t.poll_timeout());
        match (txn, self.next) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Where the REGISTERs go: the registrar's host and port.
    pub fn registrar(&self) -> (&str, u16) {
        (&self.reg.host, self.reg.port)
    }

    /// Starts a REGISTER transaction asking for `expires` seconds, with credentials when a
    /// challenge is being answered.
    fn send(&mut self, expires: u64, now: Instant) {
        self.cseq += 1;
        self.asked = expires;
        let branch = format!("{BRANCH_PREFIX}{}-{}", self.tag, self.cseq);
        let bytes = self.request(&branch, expires);
        let txn = ClientTxn::new(Kind::NonInvite, bytes, false, self.timers, now);
        self.txn = Some((txn, branch));
        self.drain(now);
    }

    /// The Request-URI: `sip:host[:port]` (RFC 3261 §10.2: the registrar's domain).
    fn request_uri(&self) -> String {
        match self.reg.port {
            5060 => format!("sip:{}", self.reg.host),
            p => format!("sip:{}:{p}", self.reg.host),
        }
    }

    fn request(&self, branch: &str, expires: u64) -> Vec<u8> {
        let ruri = self.request_uri();
        let aor = format!("sip:{}@{}", self.trunk.username, self.reg.host);
        let host = match self.via {
            SocketAddr::V6(v6) => format!("[{}]", v6.ip()),
            SocketAddr::V4(v4) => v4.ip().to_string(),
        };
        let port = self.via.port();
        let mut auth = String::new();
        if let Some((ch, proxy, nc)) = &self.answered {
            let value = digest::authorization(
                ch,
                &digest::Answer {
                    username: &self.trunk.auth_username,
                    password: &self.trunk.password,
                    method: "REGISTER",
                    uri: &ruri,
                    // Unpredictable enough for a client nonce, and never repeated: it changes
                    // with every CSeq.
                    cnonce: &format!("{:08x}{}", self.cseq, self.tag.replace('-', "")),
                    nc: *nc,
                },
            );
            let name = if *proxy {
                "Proxy-Authorization"
            } else {
                "Authorization"
            };
            auth = format!("{name}: {value}\r\n");
        }
        format!(
            "REGISTER {ruri} SIP/2.0\r\n\
             Via: SIP/2.0/UDP {host}:{port};branch={branch};rport\r\n\
             Max-Forwards: 70\r\n\
             From: <{aor}>;tag={tag}\r\n\
             To: <{aor}>\r\n\
             Call-ID: {call_id}\r\n\
             CSeq: {cseq} REGISTER\r\n\
             Contact: <sip:{user}@{host}:{port}>\r\n\
             Expires: {expires}\r\n\
             {auth}\
             User-Agent: sipedge\r\n\
             Content-Length: 0\r\n\r\n",
            tag = self.tag,
            call_id = self.call_id,
            cseq = self.cseq,
            user = self.reg.contact_user,
        )
        .into_bytes()
    }

    fn drain(&mut self, now: Instant) {
        while let Some(a) = self.txn.as_mut().and_then(|(t, _)| t.poll_action()) {
            match a {
                ClientAction::Send(bytes) => self.out.push_back(bytes),
                ClientAction::PassUp(resp) => self.on_final(resp, now),
                // RFC 3261 §17.1.2.2 Timer F: no final answer.
                ClientAction::Timeout => self.fail(408, now),
                ClientAction::TransportError => self.fail(503, now),
                ClientAction::Terminated => self.txn = None,
            }
        }
    }

    fn on_final(&mut self, resp: Message, now: Instant) {
        let status = resp.status().unwrap_or(0);
        match status {
            100..=199 => {}
            200..=299 => {
                self.failures = 0;
                if self.asked == 0 {
                    self.state = RegState::Unregistered;
                    self.events.push_back(RegEvent::Unregistered);
                    return;
                }
                let granted = granted_expires(&resp, self.asked);
                self.state = RegState::Registered;
                self.events
                    .push_back(RegEvent::Registered { expires: granted });
                self.next = Some(now + refresh_after(granted));
            }
            401 | 407 => {
                // One answer per attempt, unless the server says only the nonce was stale.
                let proxy = status == 407;
                let name = if proxy {
                    HeaderName::ProxyAuthenticate
                } else {
                    HeaderName::WwwAuthenticate
                };
                let realm = self.trunk.realm.as_deref();
                let challenge = resp
                    .headers_named(name)
                    .filter_map(|h| resp.str_at(h.value.clone()))
                    .filter_map(|v| digest::parse_challenge(v).ok())
                    .find(|c| realm.is_none_or(|r| r == c.realm));
                let retry = match (&challenge, &self.answered) {
                    (Some(_), None) => true,
                    (Some(c), Some(_)) => c.stale,
                    (None, _) => false,
                };
                match challenge {
                    Some(c) if retry => {
                        self.answered = Some((c, proxy, 1));
                        self.txn = None;
                        self.send(self.asked, now);
                    }
                    _ => self.fail(status, now),
                }
            }
            // RFC 3261 §10.2.8: too brief; ask again for the registrar's minimum, once.
            423 => match min_expires(&resp).filter(|m| *m > self.asked) {
                Some(min) => {
                    self.txn = None;
                    self.send(min, now);
                }
                None => self.fail(status, now),
            },
            _ => self.fail(status, now),
        }
    }

    fn fail(&mut self, status: u16, now: Instant) {
        if self.asked == 0 {
            // Unregistering at shutdown: nothing to retry.
            self.state = RegState::Unregistered;
            return;
        }
        self.failures += 1;
        self.state = RegState::Failed;
        self.answered = None;
        self.events.push_back(RegEvent::Failed { status });
        self.next = Some(now + backoff(self.failures));
    }
}

/// When to refresh a registration granted for `expires` seconds: at 90 %, and at least 30 s
/// before it runs out when that is earlier (never sooner than 1 s).
pub fn refresh_after(expires: u64) -> Duration {
    let at = (expires * 9 / 10).min(expires.saturating_sub(30)).max(1);
    Duration::from_secs(at)
}

/// The wait before retry number `failures` (1-based): 30 s, doubling, at most 30 min.
pub fn backoff(failures: u32) -> Duration {
    let shift = failures.saturating_sub(1).min(16);
    RETRY_FIRST.saturating_mul(1 << shift).min(RETRY_MAX)
}

/// The expiry the registrar granted (RFC 3261 §10.2.4): our Contact's `expires` parameter in
/// the 200 (there is only our Contact in the account we own, or the first one), else the
/// Expires header, else what we asked.
fn granted_expires(resp: &Message, asked: u64) -> u64 {
    let from_contact = resp
        .headers_named(HeaderName::Contact)
        .filter_map(|h| resp.str_at(h.value.clone()))
        .find_map(|v| {
            v.split(';')
                .skip(1)
                .filter_map(|p| p.split_once('='))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("expires"))
                .and_then(|(_, v)| v.trim().trim_end_matches(',').parse::<u64>().ok())
        });
    from_contact
        .or_else(|| {
            resp.header_str(HeaderName::Expires)
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(asked)
}

fn min_expires(resp: &Message) -> Option<u64> {
    resp.headers_other("Min-Expires")
        .next()
        .and_then(|h| resp.str_at(h.value.clone()))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DigestAlgorithm;
    use crate::sip::{Framing, reply};

    const VIA: &str = "198.51.100.1:5060";

    fn trunk(realm: Option<&str>) -> Arc<Trunk> {
        Arc::new(Trunk {
            name: "carrier".into(),
            username: "acct1".into(),
            auth_username: "acct1".into(),
            password: "s3cret".into(),
            realm: realm.map(str::to_owned),
            registration: Some(Registration {
                host: "voip.example.net".into(),
                port: 5070,
                expires: Duration::from_secs(600),
                contact_user: "acct1".into(),
            }),
        })
    }

    #[allow(clippy::disallowed_methods)] // tests only: the origin of virtual time
    fn t0() -> Instant {
        Instant::now()
    }

    fn parse(b: &[u8]) -> Message {
        Message::parse(b, Framing::Datagram).unwrap()
    }

    fn client(t0: Instant) -> RegClient {
        let mut c = RegClient::new(
            trunk(None),
            2,
            VIA.parse().unwrap(),
            "s4lt",
            Timers::default(),
            t0,
        )
        .unwrap();
        assert_eq!(c.poll_timeout(), Some(t0));
        c.handle_timeout(t0);
        c
    }

    fn answer(req: &Message, status: u16, extra: &[(&str, &str)]) -> Message {
        parse(&reply::response(
            req,
            VIA.parse().unwrap(),
            status,
            reply::reason(status),
            extra,
        ))
    }

    fn challenge(nonce: &str, stale: bool) -> String {
        digest::challenge(DigestAlgorithm::Md5, "voip.example.net", nonce, "", stale)
    }

    /// The REGISTER with credentials the provider verifies with our server-side digest code.
    fn verified(req: &Message, password: &str) -> bool {
        let Some(v) = req.header_str(HeaderName::Authorization) else {
            return false;
        };
        let c = digest::parse_credentials(v).unwrap();
        assert_eq!(c.uri, "sip:voip.example.net:5070");
        let ha1 = digest::ha1(c.algorithm, "acct1", "voip.example.net", password);
        digest::verify(&ha1, "REGISTER", &c)
    }

    #[test]
    fn registers_through_a_challenge_and_refreshes_before_expiry() {
        let t0 = t0();
        let mut c = client(t0);
        let first = parse(&c.poll_transmit().expect("REGISTER"));
        assert_eq!(first.request_uri(), Some("sip:voip.example.net:5070"));
        assert_eq!(first.header_str(HeaderName::Expires), Some("600"));
        let branch = first.top_via().unwrap().branch().unwrap().to_owned();
        assert_eq!(RegClient::index_of_branch(&branch), Some(2));
        assert!(first.header(HeaderName::Authorization).is_none());
        assert_eq!(c.state(), RegState::Registering);

        c.handle_response(
            t0,
            answer(
                &first,
                401,
                &[("WWW-Authenticate", &challenge("n1", false))],
            ),
        );
        let second = parse(&c.poll_transmit().expect("REGISTER with credentials"));
        assert_eq!(second.cseq().unwrap().seq, 2);
        assert_eq!(second.call_id().unwrap(), first.call_id().unwrap());
        assert!(verified(&second, "s3cret"));

        c.handle_response(
            t0,
            answer(
                &second,
                200,
                &[("Contact", "<sip:acct1@198.51.100.1:5060>;expires=300")],
            ),
        );
        assert_eq!(c.poll_event(), Some(RegEvent::Registered { expires: 300 }));
        assert_eq!(c.state(), RegState::Registered);
        // Timer K ends the transaction; then the refresh, 30 s before the granted 300 s run
        // out (90 % would be later).
        assert_eq!(c.poll_timeout(), Some(t0 + Duration::from_secs(5)));
        c.handle_timeout(t0 + Duration::from_secs(5));
        assert_eq!(c.poll_timeout(), Some(t0 + Duration::from_secs(270)));
        c.handle_timeout(t0 + Duration::from_secs(270));
        let refresh = parse(&c.poll_transmit().expect("refresh"));
        assert_eq!(refresh.cseq().unwrap().seq, 3);
        assert!(
            refresh.header(HeaderName::Authorization).is_none(),
            "a new attempt"
        );
        // A late answer to an old REGISTER changes nothing.
        c.handle_response(t0, answer(&first, 500, &[]));
        assert_eq!(c.poll_event(), None);
    }

    #[test]
    fn refused_credentials_fail_and_retry_with_backoff() {
        let t0 = t0();
        let mut c = client(t0);
        let first = parse(&c.poll_transmit().unwrap());
        c.handle_response(
            t0,
            answer(
                &first,
                401,
                &[("WWW-Authenticate", &challenge("n1", false))],
            ),
        );
        let second = parse(&c.poll_transmit().unwrap());
        c.handle_response(
            t0,
            answer(
                &second,
                401,
                &[("WWW-Authenticate", &challenge("n2", false))],
            ),
        );
        assert_eq!(c.poll_event(), Some(RegEvent::Failed { status: 401 }));
        assert_eq!(c.state(), RegState::Failed);
        assert!(
            c.poll_transmit().is_none(),
            "no third try in the same attempt"
        );
        c.handle_timeout(t0 + Duration::from_secs(5));
        let retry = t0 + Duration::from_secs(30);
        assert_eq!(c.poll_timeout(), Some(retry));
        c.handle_timeout(retry);
        let again = parse(&c.poll_transmit().unwrap());
        assert!(again.header(HeaderName::Authorization).is_none());
        c.handle_response(retry, answer(&again, 403, &[]));
        assert_eq!(c.poll_event(), Some(RegEvent::Failed { status: 403 }));
        c.handle_timeout(retry + Duration::from_secs(5));
        assert_eq!(c.poll_timeout(), Some(retry + Duration::from_secs(60)));
    }

    #[test]
    fn a_stale_nonce_is_answered_again() {
        let t0 = t0();
        let mut c = client(t0);
        let first = parse(&c.poll_transmit().unwrap());
        c.handle_response(
            t0,
            answer(
                &first,
                401,
                &[("WWW-Authenticate", &challenge("n1", false))],
            ),
        );
        let second = parse(&c.poll_transmit().unwrap());
        c.handle_response(
            t0,
            answer(
                &second,
                401,
                &[("WWW-Authenticate", &challenge("n2", true))],
            ),
        );
        let third = parse(&c.poll_transmit().expect("answered again"));
        assert!(verified(&third, "s3cret"));
        assert!(
            third
                .header_str(HeaderName::Authorization)
                .unwrap()
                .contains("\"n2\"")
        );
    }

    #[test]
    fn no_answer_is_a_408_after_timer_f() {
        let t0 = t0();
        let mut c = client(t0);
        let mut sent = 0;
        while c.poll_event().is_none() {
            while c.poll_transmit().is_some() {
                sent += 1;
            }
            let d = c.poll_timeout().unwrap();
            assert!(d - t0 <= Duration::from_secs(32), "Timer F is 64·T1");
            c.handle_timeout(d);
        }
        assert!(sent > 5, "retransmitted over UDP: {sent}");
        assert_eq!(c.state(), RegState::Failed);
    }

    #[test]
    fn unregister_sends_expires_zero_with_credentials() {
        let t0 = t0();
        let mut c = client(t0);
        let first = parse(&c.poll_transmit().unwrap());
        c.handle_response(
            t0,
            answer(
                &first,
                401,
                &[("WWW-Authenticate", &challenge("n1", false))],
            ),
        );
        let second = parse(&c.poll_transmit().unwrap());
        c.handle_response(t0, answer(&second, 200, &[]));
        assert_eq!(c.poll_event(), Some(RegEvent::Registered { expires: 600 }));
        c.unregister(t0);
        let bye = parse(&c.poll_transmit().unwrap());
        assert_eq!(bye.header_str(HeaderName::Expires), Some("0"));
        assert!(verified(&bye, "s3cret"));
        assert!(
            bye.header_str(HeaderName::Authorization)
                .unwrap()
                .contains("nc=00000002")
        );
        c.handle_response(t0, answer(&bye, 200, &[]));
        assert_eq!(c.poll_event(), Some(RegEvent::Unregistered));
        assert_eq!(c.state(), RegState::Unregistered);
    }

    #[test]
    fn a_challenge_of_another_realm_is_not_answered() {
        let t0 = t0();
        let mut c = RegClient::new(
            trunk(Some("other.example")),
            0,
            VIA.parse().unwrap(),
            "s",
            Timers::default(),
            t0,
        )
        .unwrap();
        c.handle_timeout(t0);
        let first = parse(&c.poll_transmit().unwrap());
        c.handle_response(
            t0,
            answer(
                &first,
                401,
                &[("WWW-Authenticate", &challenge("n1", false))],
            ),
        );
        assert_eq!(c.poll_event(), Some(RegEvent::Failed { status: 401 }));
    }

    #[test]
    fn refresh_and_backoff_schedule() {
        assert_eq!(refresh_after(600), Duration::from_secs(540));
        assert_eq!(refresh_after(120), Duration::from_secs(90));
        assert_eq!(refresh_after(20), Duration::from_secs(1));
        assert_eq!(backoff(1), Duration::from_secs(30));
        assert_eq!(backoff(3), Duration::from_secs(120));
        assert_eq!(backoff(100), RETRY_MAX);
    }
}
