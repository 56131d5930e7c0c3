//! The transaction harness (quinn's `Pair` in `quinn-proto/src/tests/util.rs`, STYLE §2.5):
//! a UAC-side [`ClientTxn`] and a UAS-side [`ServerTxn`] joined by a virtual lossy link with
//! latency, on virtual time. [`Pair::drive`] runs both until they are idle, jumping to the
//! earliest deadline (a timer, a packet arrival, a scripted response) each time.
//!
//! The UAS side plays the transaction user: it creates the server transaction when the first
//! copy of the request arrives, matches later requests to it by [`server_key`] (ACK and
//! retransmissions), and responds at scripted times with [`crate::sip::reply::response`].
//! The UAC side matches responses by [`client_key`], like the proxy core.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::Duration;

use tokio::time::Instant;

use super::{
    ClientAction, ClientState, ClientTxn, Kind, ServerAction, ServerState, ServerTxn, Timers,
    TxnKey, client_key, server_key,
};
use crate::sip::{Framing, HeaderName, Message, reply};

/// The origin of virtual time.
#[allow(clippy::disallowed_methods)] // tests only: the one clock reading, as the origin of virtual time
pub(crate) fn t0() -> Instant {
    Instant::now()
}

/// A request as the proxy forwards it: our Via on top, the UAC's below, Route headers on two
/// lines (three values), a Record-Route and a Contact that an ACK or CANCEL must not copy.
pub(crate) fn forwarded(method: &str, transport: &str) -> Message {
    let text = format!(
        "{method} sip:bob@192.0.2.20:5062 SIP/2.0\r\n\
Via: SIP/2.0/{transport} 198.51.100.1:5060;branch=z9hG4bKp1a2b3\r\n\
Via: SIP/2.0/{transport} 192.0.2.10:5060;branch=z9hG4bKuac1;received=192.0.2.10\r\n\
Route: <sip:edge2.example.net;lr>\r\n\
Route: <sip:core.example.net;lr>, <sip:last.example.net;lr>\r\n\
Max-Forwards: 69\r\n\
Record-Route: <sip:198.51.100.1;lr>\r\n\
From: \"Alice\" <sip:alice@example.com>;tag=a1\r\n\
To: <sip:bob@example.com>\r\n\
Call-ID: 3848276298220188511@192.0.2.10\r\n\
CSeq: 314159 {method}\r\n\
Contact: <sip:alice@192.0.2.10>\r\n\
Content-Length: 0\r\n\r\n"
    );
    Message::parse(text.as_bytes(), Framing::Datagram).unwrap()
}

/// The UAS's response to `req`, with a To-tag that is the same for every copy.
pub(crate) fn response(req: &Message, status: u16) -> Vec<u8> {
    let reason = match status {
        100 => "Trying",
        180 => "Ringing",
        183 => "Session Progress",
        200 => "OK",
        401 => "Unauthorized",
        486 => "Busy Here",
        487 => "Request Terminated",
        _ => "Status",
    };
    // The sent-by address of the proxy's Via, so that no `received` is added.
    let from_proxy: SocketAddr = "198.51.100.1:5060".parse().unwrap();
    reply::response(req, from_proxy, status, reason, &[])
}

/// Which way a packet goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Dir {
    /// UAC → UAS: requests.
    Down,
    /// UAS → UAC: responses.
    Up,
}

/// One packet put on the link.
#[derive(Debug, Clone)]
pub(crate) struct Wire {
    pub(crate) sent: Instant,
    pub(crate) dir: Dir,
    /// The method of a request, the status code of a response.
    pub(crate) label: String,
    pub(crate) msg: Message,
    pub(crate) lost: bool,
}

/// What a transaction reported to its user, besides sending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Seen {
    PassUp(u16),
    Timeout,
    TransportError,
    AckTimeout,
    Terminated,
}

/// Decides whether a packet is lost: `(label, n)` where `n` counts earlier packets with the
/// same label (0 for the first INVITE, 1 for its first retransmission...).
type Loss = Box<dyn FnMut(&str, usize) -> bool>;

pub(crate) struct Pair {
    pub(crate) t0: Instant,
    pub(crate) now: Instant,
    pub(crate) latency: Duration,
    kind: Kind,
    reliable: bool,
    timers: Timers,
    pub(crate) client: ClientTxn,
    client_key: Option<TxnKey>,
    pub(crate) server: Option<ServerTxn>,
    server_key: Option<TxnKey>,
    /// The request as the UAS first received it.
    uas_request: Option<Message>,
    /// When the server transaction was created.
    pub(crate) server_created: Option<Instant>,
    /// `(at, status)`: the UAS responds at `t0 + at`, or when its transaction is created if
    /// that is later.
    script: VecDeque<(Duration, u16)>,
    loss: Loss,
    sent_per_label: HashMap<String, usize>,
    in_flight: VecDeque<(Instant, Wire)>,
    /// Every packet put on the link, in order.
    pub(crate) wire: Vec<Wire>,
    /// The client's reports, with their times.
    pub(crate) client_seen: Vec<(Instant, Seen)>,
    /// The responses the client passed up.
    pub(crate) passed_up: Vec<Message>,
    /// The server's reports, with their times.
    pub(crate) server_seen: Vec<(Instant, Seen)>,
}

/// A bound on [`Pair::drive`] iterations: a machine that never settles fails the test.
const MAX_ITERATIONS: usize = 10_000;

impl Pair {
    /// A client transaction for `method` over UDP (or a reliable transport), created at t0.
    pub(crate) fn new(method: &str, reliable: bool) -> Self {
        Self::with_timers(method, reliable, Timers::default())
    }

    pub(crate) fn with_timers(method: &str, reliable: bool, timers: Timers) -> Self {
        let t0 = t0();
        let kind = Kind::of_method(method);
        let request = forwarded(method, if reliable { "TCP" } else { "UDP" });
        let client_key = server_key(&request);
        assert!(client_key.is_some());
        let client = ClientTxn::new(kind, request.as_bytes().to_vec(), reliable, timers, t0);
        Self {
            t0,
            now: t0,
            latency: Duration::from_millis(10),
            kind,
            reliable,
            timers,
            client,
            client_key,
            server: None,
            server_key: None,
            uas_request: None,
            server_created: None,
            script: VecDeque::new(),
            loss: Box::new(|_, _| false),
            sent_per_label: HashMap::new(),
            in_flight: VecDeque::new(),
            wire: Vec::new(),
            client_seen: Vec::new(),
            passed_up: Vec::new(),
            server_seen: Vec::new(),
        }
    }

    /// The UAS responds with `status` at `t0 + ms` (or on arrival of the request, if later).
    pub(crate) fn respond_at(mut self, ms: u64, status: u16) -> Self {
        self.script.push_back((Duration::from_millis(ms), status));
        self
    }

    pub(crate) fn lose(mut self, loss: impl FnMut(&str, usize) -> bool + 'static) -> Self {
        self.loss = Box::new(loss);
        self
    }

    pub(crate) fn latency(mut self, ms: u64) -> Self {
        self.latency = Duration::from_millis(ms);
        self
    }

    /// Milliseconds since t0.
    pub(crate) fn ms(&self, at: Instant) -> u64 {
        (at - self.t0).as_millis() as u64
    }

    /// When packets with this label were put on the link (ms since t0), lost or not.
    pub(crate) fn sent(&self, label: &str) -> Vec<u64> {
        self.wire
            .iter()
            .filter(|w| w.label == label)
            .map(|w| self.ms(w.sent))
            .collect()
    }

    /// The packets with this label that were not lost.
    pub(crate) fn delivered(&self, label: &str) -> Vec<&Wire> {
        self.wire
            .iter()
            .filter(|w| w.label == label && !w.lost)
            .collect()
    }

    /// The client's reports as (ms since t0, what).
    pub(crate) fn client_log(&self) -> Vec<(u64, Seen)> {
        self.client_seen
            .iter()
            .map(|(at, s)| (self.ms(*at), s.clone()))
            .collect()
    }

    pub(crate) fn server_log(&self) -> Vec<(u64, Seen)> {
        self.server_seen
            .iter()
            .map(|(at, s)| (self.ms(*at), s.clone()))
            .collect()
    }

    pub(crate) fn server_state(&self) -> Option<ServerState> {
        self.server.as_ref().map(ServerTxn::state)
    }

    pub(crate) fn client_state(&self) -> ClientState {
        self.client.state()
    }

    /// Runs until neither side has anything left to do, then returns.
    pub(crate) fn drive(&mut self) {
        self.drive_until(None);
    }

    /// Runs until idle or until virtual time would pass `t0 + ms`.
    pub(crate) fn drive_for(&mut self, ms: u64) {
        let limit = self.t0 + Duration::from_millis(ms);
        self.drive_until(Some(limit));
    }

    fn drive_until(&mut self, limit: Option<Instant>) {
        for _ in 0..MAX_ITERATIONS {
            if self.step() {
                continue;
            }
            let Some(next) = self.next_wakeup() else {
                return;
            };
            assert!(next > self.now, "time must move forward");
            if limit.is_some_and(|l| next > l) {
                return;
            }
            self.now = next;
        }
        panic!("not idle after {MAX_ITERATIONS} iterations");
    }

    /// Handles everything due at `self.now`; true if anything happened.
    fn step(&mut self) -> bool {
        let now = self.now;
        let mut progress = false;
        if self.client.poll_timeout().is_some_and(|t| t <= now) {
            self.client.on_timer(now);
            progress = true;
        }
        if let Some(server) = &mut self.server {
            if server.poll_timeout().is_some_and(|t| t <= now) {
                server.on_timer(now);
                progress = true;
            }
        }
        progress |= self.drain();
        while self.server.is_some()
            && self
                .script
                .front()
                .is_some_and(|(at, _)| self.t0 + *at <= now)
        {
            let Some((_, status)) = self.script.pop_front() else {
                break;
            };
            self.uas_respond(status);
            progress = true;
        }
        progress |= self.drain();
        while self.in_flight.front().is_some_and(|(at, _)| *at <= now) {
            let Some((_, wire)) = self.in_flight.pop_front() else {
                break;
            };
            self.deliver(wire);
            progress = true;
            progress |= self.drain();
        }
        progress
    }

    fn next_wakeup(&self) -> Option<Instant> {
        let script = self
            .server
            .as_ref()
            .and(self.script.front())
            .map(|(at, _)| (self.t0 + *at).max(self.now));
        [
            self.client.poll_timeout(),
            self.server.as_ref().and_then(ServerTxn::poll_timeout),
            self.in_flight.front().map(|(at, _)| *at),
            script,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Executes the actions both transactions queued; true if there were any.
    fn drain(&mut self) -> bool {
        let now = self.now;
        let mut any = false;
        while let Some(a) = self.client.poll_action() {
            any = true;
            match a {
                ClientAction::Send(bytes) => self.transmit(Dir::Down, &bytes),
                ClientAction::PassUp(m) => {
                    let status = m.status().unwrap();
                    self.client_seen.push((now, Seen::PassUp(status)));
                    self.passed_up.push(m);
                }
                ClientAction::Timeout => self.client_seen.push((now, Seen::Timeout)),
                ClientAction::TransportError => {
                    self.client_seen.push((now, Seen::TransportError));
                }
                ClientAction::Terminated => self.client_seen.push((now, Seen::Terminated)),
            }
        }
        while let Some(a) = self.server.as_mut().and_then(ServerTxn::poll_action) {
            any = true;
            match a {
                ServerAction::Send(bytes) => self.transmit(Dir::Up, &bytes),
                ServerAction::AckTimeout => self.server_seen.push((now, Seen::AckTimeout)),
                ServerAction::Terminated => self.server_seen.push((now, Seen::Terminated)),
            }
        }
        any
    }

    fn transmit(&mut self, dir: Dir, bytes: &[u8]) {
        let msg = Message::parse(bytes, Framing::Datagram).expect("transactions send SIP");
        assert_eq!(msg.defect(), None, "{}", String::from_utf8_lossy(bytes));
        let label = match dir {
            Dir::Down => msg.method().unwrap().to_owned(),
            Dir::Up => msg.status().unwrap().to_string(),
        };
        let n = self.sent_per_label.entry(label.clone()).or_default();
        let lost = (self.loss)(&label, *n);
        *n += 1;
        let wire = Wire {
            sent: self.now,
            dir,
            label,
            msg,
            lost,
        };
        if !lost {
            self.in_flight
                .push_back((self.now + self.latency, wire.clone()));
        }
        self.wire.push(wire);
    }

    fn deliver(&mut self, wire: Wire) {
        let now = self.now;
        match wire.dir {
            Dir::Down => {
                let key = server_key(&wire.msg);
                assert!(key.is_some(), "every request here has an RFC 3261 branch");
                match &mut self.server {
                    None => {
                        assert_ne!(wire.label, "ACK", "an ACK creates no transaction");
                        self.server =
                            Some(ServerTxn::new(self.kind, self.reliable, self.timers, now));
                        self.server_key = key;
                        self.uas_request = Some(wire.msg);
                        self.server_created = Some(now);
                    }
                    Some(server) => {
                        assert_eq!(key, self.server_key, "one transaction on this link");
                        if wire.label == "ACK" {
                            server.on_ack(now);
                        } else {
                            server.on_request_retransmission(now);
                        }
                    }
                }
            }
            Dir::Up => {
                assert_eq!(client_key(&wire.msg), self.client_key);
                self.client.on_response(wire.msg, now);
            }
        }
    }

    fn uas_respond(&mut self, status: u16) {
        let (Some(server), Some(req)) = (&mut self.server, &self.uas_request) else {
            return;
        };
        server.respond(status, response(req, status), self.now);
    }
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// The intervals between consecutive times.
fn gaps(times: &[u64]) -> Vec<u64> {
    times.windows(2).map(|w| w[1] - w[0]).collect()
}

// ---- INVITE client: Timers A, B, C ----

#[test]
fn invite_retransmitted_until_third_copy_arrives() {
    // STYLE §2.9 item 3: drop the first two INVITEs; the third arrives at t0 + 3·T1.
    let mut p = Pair::new("INVITE", false)
        .lose(|label, n| label == "INVITE" && n < 2)
        .respond_at(0, 100)
        .respond_at(2000, 180)
        .respond_at(3000, 200);
    p.drive();
    assert_eq!(p.sent("INVITE"), [0, 500, 1500], "Timer A: T1, then 2·T1");
    let lost: Vec<bool> = p
        .wire
        .iter()
        .filter(|w| w.label == "INVITE")
        .map(|w| w.lost)
        .collect();
    assert_eq!(lost, [true, true, false]);
    assert_eq!(p.server_created.map(|t| p.ms(t)), Some(1510));
    // Timer A stopped at the 100 (it would have fired at 3500).
    assert_eq!(
        p.client_log(),
        [
            (1520, Seen::PassUp(100)),
            (2010, Seen::PassUp(180)),
            (3010, Seen::PassUp(200)),
            (3010 + 32_000, Seen::Terminated),
        ]
    );
    assert_eq!(p.server_log(), [(3000 + 32_000, Seen::Terminated)]);
    assert_eq!(p.client_state(), ClientState::Terminated);
    assert_eq!(p.server_state(), Some(ServerState::Terminated));
}

#[test]
fn timer_b_without_response() {
    let mut p = Pair::new("INVITE", false).lose(|_, _| true);
    p.drive();
    // Timer A doubles without a cap until Timer B = 64·T1.
    assert_eq!(p.sent("INVITE"), [0, 500, 1500, 3500, 7500, 15_500, 31_500]);
    assert_eq!(
        p.client_log(),
        [(32_000, Seen::Timeout), (32_000, Seen::Terminated)]
    );
    assert!(p.server.is_none());
}

#[test]
fn timer_b_over_reliable_transport_without_retransmissions() {
    let mut p = Pair::new("INVITE", true).lose(|_, _| true);
    p.drive();
    assert_eq!(p.sent("INVITE"), [0]);
    assert_eq!(
        p.client_log(),
        [(32_000, Seen::Timeout), (32_000, Seen::Terminated)]
    );
}

#[test]
fn timer_c_restarted_by_provisional() {
    let fr_inv = Timers::default().fr_inv;
    let mut p = Pair::new("INVITE", false)
        .latency(0)
        .respond_at(0, 100)
        .respond_at(10_000, 180);
    p.drive();
    let c = 10_000 + fr_inv.as_millis() as u64;
    // No Timeout at 32 s: Timer B ended with the 100.
    assert_eq!(
        p.client_log(),
        [
            (0, Seen::PassUp(100)),
            (10_000, Seen::PassUp(180)),
            (c, Seen::Timeout),
            // The core would CANCEL now; with no final, §9.1 gives up 64·T1 later.
            (c + 32_000, Seen::Terminated),
        ]
    );
    assert_eq!(p.sent("INVITE"), [0]);
    assert_eq!(p.server_state(), Some(ServerState::Proceeding));
}

#[test]
fn timer_c_restarted_by_each_provisional_and_487_after_timeout_is_acked() {
    // RFC 3261 §13.3.1.1: a UAS that needs time sends a provisional every minute.
    let mut p = Pair::new("INVITE", false)
        .latency(0)
        .respond_at(0, 100)
        .respond_at(10_000, 180)
        .respond_at(70_000, 180)
        // The UAS answers the CANCEL the core sent after the Timeout.
        .respond_at(190_100, 487);
    p.drive();
    assert_eq!(
        p.client_log(),
        [
            (0, Seen::PassUp(100)),
            (10_000, Seen::PassUp(180)),
            (70_000, Seen::PassUp(180)),
            (190_000, Seen::Timeout),
            (190_100, Seen::PassUp(487)),
            (190_100 + 32_000, Seen::Terminated),
        ]
    );
    assert_eq!(p.sent("ACK"), [190_100]);
    assert_eq!(p.server_log(), [(190_100 + 5000, Seen::Terminated)]);
}

// ---- non-INVITE client: Timers E, F ----

#[test]
fn non_invite_timer_e_capped_at_t2_then_timer_f() {
    let mut p = Pair::new("OPTIONS", false).lose(|_, _| true);
    p.drive();
    let sent = p.sent("OPTIONS");
    assert_eq!(
        sent,
        [
            0, 500, 1500, 3500, 7500, 11_500, 15_500, 19_500, 23_500, 27_500
        ]
    );
    assert_eq!(gaps(&sent)[..5], [500, 1000, 2000, 4000, 4000]);
    // Timer F = fr (30 s), not 64·T1.
    assert_eq!(
        p.client_log(),
        [(30_000, Seen::Timeout), (30_000, Seen::Terminated)]
    );
}

#[test]
fn non_invite_after_provisional_retransmits_at_t2() {
    let mut p = Pair::new("OPTIONS", false).respond_at(600, 100);
    p.drive();
    let sent = p.sent("OPTIONS");
    // The E armed in Trying (1500) still fires; from then on every T2.
    assert_eq!(&sent[..4], [0, 500, 1500, 5500]);
    assert!(gaps(&sent)[2..].iter().all(|g| *g == 4000), "{sent:?}");
    assert_eq!(*sent.last().unwrap(), 29_500);
    // The server resends the 100 for each retransmission it receives in Proceeding, but
    // sent nothing for the one that arrived in Trying (510).
    let hundreds = p.sent("100");
    assert_eq!(hundreds[0], 600);
    let resent: Vec<u64> = sent[2..].iter().map(|t| t + 10).collect();
    assert_eq!(hundreds[1..], resent[..]);
    // Every provisional is passed up; Timer F still ends it at 30 s.
    let ups = p
        .client_log()
        .iter()
        .filter(|(_, s)| *s == Seen::PassUp(100))
        .count();
    assert_eq!(ups, hundreds.len());
    assert_eq!(
        p.client_log()[ups..],
        [(30_000, Seen::Timeout), (30_000, Seen::Terminated)]
    );
    assert_eq!(p.server_state(), Some(ServerState::Proceeding));
}

// ---- INVITE: non-2xx final, ACK, Timer G ----

#[test]
fn non_2xx_final_acked_once_per_copy() {
    let mut p = Pair::new("INVITE", false)
        .lose(|label, n| label == "ACK" && n == 0)
        .respond_at(0, 100)
        .respond_at(1000, 486);
    p.drive();
    // The first ACK is lost: Timer G resends the 486 at +T1, the client ACKs it again.
    assert_eq!(p.sent("486"), [1000, 1500]);
    assert_eq!(p.sent("ACK"), [1010, 1510]);
    assert_eq!(p.delivered("486").len(), p.sent("ACK").len());
    assert_eq!(
        p.client_log(),
        [
            (20, Seen::PassUp(100)),
            (1010, Seen::PassUp(486)),
            // Timer D: 32 s on UDP.
            (1010 + 32_000, Seen::Terminated),
        ]
    );
    // Confirmed at the ACK (1520), Terminated after T4.
    assert_eq!(p.server_log(), [(1520 + 5000, Seen::Terminated)]);

    // The ACK: same branch and R-URI, the response's To-tag, CSeq ACK, the Route set.
    let invite = Message::parse(p.client.request(), Framing::Datagram).unwrap();
    let resp = &p.passed_up[1];
    assert_eq!(resp.status(), Some(486));
    for ack in p.wire.iter().filter(|w| w.label == "ACK") {
        let ack = &ack.msg;
        assert_eq!(ack.request_uri(), invite.request_uri());
        assert_eq!(ack.vias().unwrap().len(), 1);
        assert_eq!(
            ack.top_via().unwrap().branch(),
            invite.top_via().unwrap().branch()
        );
        assert_eq!(ack.to().unwrap().tag(), resp.to().unwrap().tag());
        assert!(ack.to().unwrap().tag().is_some());
        assert_eq!(ack.cseq().unwrap().seq, invite.cseq().unwrap().seq);
        assert_eq!(ack.cseq().unwrap().method, "ACK");
        let uris = |m: &Message| -> Vec<String> {
            m.route_set(HeaderName::Route)
                .unwrap()
                .iter()
                .map(|r| r.uri.to_owned())
                .collect()
        };
        assert_eq!(uris(ack), uris(&invite));
        assert_eq!(uris(ack).len(), 3);
    }
}

#[test]
fn server_retransmits_final_on_timer_g_until_ack() {
    let mut p = Pair::new("INVITE", false)
        .lose(|label, n| label == "486" && n < 5)
        .respond_at(0, 100)
        .respond_at(1000, 486);
    p.drive();
    let finals = p.sent("486");
    assert_eq!(finals, [1000, 1500, 2500, 4500, 8500, 12_500]);
    assert_eq!(gaps(&finals), [500, 1000, 2000, 4000, 4000]);
    // The sixth copy arrives at 12 510 and is ACKed; nothing is resent after the ACK.
    assert_eq!(p.sent("ACK"), [12_510]);
    assert_eq!(
        p.client_log()
            .iter()
            .filter(|(_, s)| *s == Seen::PassUp(486))
            .count(),
        1
    );
    assert_eq!(p.server_log(), [(12_520 + 5000, Seen::Terminated)]);
}

#[test]
fn reliable_non_2xx_final_ends_both_sides_at_once() {
    let mut p = Pair::new("INVITE", true)
        .respond_at(0, 100)
        .respond_at(1000, 486);
    p.drive();
    assert_eq!(p.sent("486"), [1000]);
    assert_eq!(p.sent("ACK"), [1010]);
    assert_eq!(
        p.client_log(),
        [
            (20, Seen::PassUp(100)),
            (1010, Seen::PassUp(486)),
            (1010, Seen::Terminated),
        ]
    );
    // Timer I = 0 on reliable transports.
    assert_eq!(p.server_log(), [(1020, Seen::Terminated)]);
}

// ---- INVITE: 2xx (RFC 6026) ----

#[test]
fn invite_2xx_accepted_on_both_sides() {
    // The UAS core retransmits its 2xx (RFC 3261 §13.3.1.4); the proxy passes each through.
    let mut p = Pair::new("INVITE", false)
        .respond_at(0, 100)
        .respond_at(1000, 200)
        .respond_at(1500, 200)
        .respond_at(2500, 200);
    p.drive_for(3000);
    assert_eq!(p.client_state(), ClientState::Accepted);
    assert_eq!(p.server_state(), Some(ServerState::Accepted));
    p.drive();
    assert_eq!(p.sent("200"), [1000, 1500, 2500]);
    assert_eq!(
        p.client_log(),
        [
            (20, Seen::PassUp(100)),
            (1010, Seen::PassUp(200)),
            (1510, Seen::PassUp(200)),
            (2510, Seen::PassUp(200)),
            // Timer M = 64·T1 from the first 2xx.
            (1010 + 32_000, Seen::Terminated),
        ]
    );
    // Timer L = 64·T1 from the first 2xx.
    assert_eq!(p.server_log(), [(1000 + 32_000, Seen::Terminated)]);
    assert_eq!(p.server.as_ref().unwrap().final_status(), Some(200));
    // The transaction sends no ACK for a 2xx (it is end to end).
    assert!(p.sent("ACK").is_empty());
}

// ---- server: absorbing request retransmissions ----

#[test]
fn invite_retransmission_in_proceeding_resends_last_provisional() {
    let mut p = Pair::new("INVITE", false)
        .lose(|label, n| label == "100" && n == 0)
        .respond_at(0, 100)
        .respond_at(2000, 486);
    p.drive();
    // The client did not see the 100, so it retransmitted at T1; the server answered that
    // copy with the 100 again instead of a new transaction.
    assert_eq!(p.sent("INVITE"), [0, 500]);
    assert_eq!(p.sent("100"), [10, 510]);
    assert_eq!(p.server_created.map(|t| p.ms(t)), Some(10));
    assert_eq!(p.client_log()[0], (520, Seen::PassUp(100)));
    assert_eq!(p.sent("ACK"), [2010]);
}

#[test]
fn non_invite_retransmission_in_completed_resends_final() {
    let mut p = Pair::new("OPTIONS", false)
        .lose(|label, n| label == "200" && n == 0)
        .respond_at(0, 200);
    p.drive();
    assert_eq!(p.sent("OPTIONS"), [0, 500]);
    assert_eq!(p.sent("200"), [10, 510]);
    assert_eq!(
        p.client_log(),
        [(520, Seen::PassUp(200)), (520 + 5000, Seen::Terminated)]
    );
    // Timer J = 64·T1 from the final.
    assert_eq!(p.server_log(), [(10 + 32_000, Seen::Terminated)]);
}

#[test]
fn non_invite_retransmissions_in_trying_are_absorbed() {
    let mut p = Pair::new("OPTIONS", false).respond_at(2000, 200);
    p.drive();
    assert_eq!(p.sent("OPTIONS"), [0, 500, 1500]);
    // The copies arriving at 510 and 1510 found the server in Trying: nothing sent.
    assert_eq!(p.sent("200"), [2000]);
    assert_eq!(
        p.client_log(),
        [(2010, Seen::PassUp(200)), (2010 + 5000, Seen::Terminated)]
    );
}

#[test]
fn reliable_non_invite_has_no_timers_after_the_final() {
    let mut p = Pair::new("OPTIONS", true).respond_at(100, 200);
    p.drive();
    assert_eq!(p.sent("OPTIONS"), [0]);
    assert_eq!(
        p.client_log(),
        [(110, Seen::PassUp(200)), (110, Seen::Terminated)]
    );
    assert_eq!(p.server_log(), [(100, Seen::Terminated)]);
}

#[test]
fn drive_is_bounded_and_reaches_idle() {
    // With T1 = 1 ms and everything lost, the machines still settle well within the bound.
    let timers = Timers {
        t1: ms(1),
        t2: ms(4),
        t4: ms(5),
        fr: ms(1000),
        fr_inv: ms(1000),
    };
    let mut p = Pair::with_timers("OPTIONS", false, timers).lose(|_, _| true);
    p.drive();
    assert_eq!(p.client_state(), ClientState::Terminated);
    assert_eq!(p.client_log().last(), Some(&(1000, Seen::Terminated)));
}
