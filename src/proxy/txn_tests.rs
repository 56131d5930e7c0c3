//! [`ProxyTxn`] on virtual time (STYLE §2.5): a caller, one or two callees and the proxy
//! core between them, driven only through the core's public API. Time is `t0` plus durations
//! the tests choose; timers fire by jumping to [`ProxyTxn::poll_timeout`]. Every step checks
//! what goes on the wire (destination, then the parsed message) and the table events.
//!
//! The caller's 200 for its own CANCEL is the shell's (`stateful::Proxy::absorb`), not the
//! core's: here a caller's CANCEL is the [`Input::Cancel`] that follows it.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::time::Instant;

use super::forward::BRANCH_PREFIX;
use super::pipeline::{Dest, Hop, Plan};
use super::txn::{
    Attempt, ClientRest, Context, Event, FailoverReason, Finished, Input, MediaOp, ProxyTxn, Role,
    ServerRest, Work,
};
use crate::auth::mac::RouteKey;
use crate::config::MediaMode;
use crate::media::session::Refused;
use crate::sip::{Framing, HeaderName, Message, Rewrite, reply};
use crate::transaction::{Timers, TxnKey, client_key};
use crate::transport::{Proto, Source, Transmit};

/// Our socket (UDP and TCP), also the address in our Via and Record-Route.
const PROXY: &str = "198.51.100.1:5060";
/// The caller, as its top Via says (no NAT: responses go there).
const CALLER: &str = "192.0.2.10:5060";
const BOB: &str = "192.0.2.20:5062";
const CAROL: &str = "192.0.2.30:5064";
const DAVE: &str = "192.0.2.40:5066";

const OFFER: &str = "v=0\r\no=alice 1 1 IN IP4 192.0.2.10\r\ns=-\r\nc=IN IP4 192.0.2.10\r\n\
t=0 0\r\nm=audio 40000 RTP/AVP 0\r\n";
const RELAY_OFFER: &str = "v=0\r\no=alice 1 1 IN IP4 198.51.100.1\r\ns=-\r\n\
c=IN IP4 198.51.100.1\r\nt=0 0\r\nm=audio 30000 RTP/AVP 0\r\n";
const ANSWER: &str = "v=0\r\no=bob 2 2 IN IP4 192.0.2.20\r\ns=-\r\nc=IN IP4 192.0.2.20\r\n\
t=0 0\r\nm=audio 50000 RTP/AVP 0\r\n";
const RELAY_ANSWER: &str = "v=0\r\no=bob 2 2 IN IP4 198.51.100.1\r\ns=-\r\n\
c=IN IP4 198.51.100.1\r\nt=0 0\r\nm=audio 30002 RTP/AVP 0\r\n";

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("test address")
}

fn ctx(media: bool) -> Context {
    Context {
        timers: Timers::default(),
        local: vec![(Proto::Udp, addr(PROXY)), (Proto::Tcp, addr(PROXY))],
        advertise: addr(PROXY).ip(),
        max_forwards: 70,
        key: RouteKey::from_bytes([7; 32]),
        media,
    }
}

fn source() -> Source {
    Source {
        proto: Proto::Udp,
        remote: addr(CALLER),
        local: addr(PROXY),
    }
}

fn parse(bytes: &[u8]) -> Message {
    Message::parse(bytes, Framing::Datagram).expect("a message the test or the proxy built")
}

/// The caller's request (`method` INVITE or another), with an SDP body when `sdp` is set.
fn request(method: &str, sdp: Option<&str>) -> Message {
    let (ctype, body) = match sdp {
        Some(b) => ("Content-Type: application/sdp\r\n", b),
        None => ("", ""),
    };
    let text = format!(
        "{method} sip:bob@example.com SIP/2.0\r\n\
Via: SIP/2.0/UDP {CALLER};branch=z9hG4bKcaller1\r\n\
Max-Forwards: 70\r\n\
From: \"Alice\" <sip:alice@example.com>;tag=a1\r\n\
To: <sip:bob@example.com>\r\n\
Call-ID: txn-test-1@192.0.2.10\r\n\
CSeq: 1 {method}\r\n\
Contact: <sip:alice@192.0.2.10>\r\n\
{ctype}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    parse(text.as_bytes())
}

fn hop(dest: &str, proto: Proto) -> Hop {
    Hop {
        ruri: Some(format!("sip:bob@{dest}")),
        dest: Dest::Addr(addr(dest)),
        proto,
        flow: None,
        failover: Vec::new(),
        trunk: None,
        owner: None,
    }
}

fn attempt(dest: &str, proto: Proto) -> Attempt {
    Attempt {
        hop: hop(dest, proto),
        dest: addr(dest),
    }
}

/// Forward to `dests` (UDP), Record-Route on, with this media policy.
fn forward(dests: &[&str], media: Option<MediaMode>) -> Work {
    forward_over(dests, Proto::Udp, media)
}

fn forward_over(dests: &[&str], proto: Proto, media: Option<MediaMode>) -> Work {
    Work::Forward {
        plan: Plan {
            targets: dests.iter().map(|d| hop(d, proto)).collect(),
            record_route: true,
            media,
            ..Plan::default()
        },
        dests: dests.iter().map(|d| vec![attempt(d, proto)]).collect(),
        strip_proxy_auth: false,
        auth_user: None,
    }
}

/// A downstream UA's response to `req` (as it received it: our Via on top), with a body when
/// `body` is set. Its To-tag is the same for every response to the same request.
fn uas(req: &Message, status: u16, body: Option<&str>) -> Message {
    let plain = reply::response(req, addr(PROXY), status, reply::reason(status), &[]);
    match body {
        None => parse(&plain),
        Some(b) => {
            let m = parse(&plain);
            let mut rw = Rewrite::new(&m);
            rw.replace_body(b.as_bytes().to_vec());
            parse(&rw.finish())
        }
    }
}

/// One message the core asked to send, parsed.
#[derive(Debug)]
struct Sent {
    tx: Transmit,
    msg: Message,
}

impl Sent {
    fn status(&self) -> Option<u16> {
        self.msg.status()
    }

    fn method(&self) -> Option<&str> {
        self.msg.method()
    }

    fn branch(&self) -> String {
        self.msg
            .top_via()
            .ok()
            .and_then(|v| v.branch().map(str::to_owned))
            .unwrap_or_default()
    }

    fn cseq(&self) -> (u32, String) {
        let c = self.msg.cseq().expect("CSeq");
        (c.seq, c.method.to_owned())
    }
}

/// The origin of virtual time.
#[allow(clippy::disallowed_methods)] // tests only: the one clock reading, as the origin of virtual time
fn t0() -> Instant {
    Instant::now()
}

/// The core with the caller on one side and the callees on the other, on virtual time.
struct Harness {
    t: ProxyTxn,
    t0: Instant,
    now: Instant,
    events: Vec<Event>,
    media: Vec<MediaOp>,
}

impl Harness {
    /// Starts the request at t0; returns what was sent at once.
    fn start(ctx: Context, req: Message, work: Work) -> (Self, Vec<Sent>) {
        let t0 = t0();
        let t = ProxyTxn::new(std::sync::Arc::new(ctx), req, source(), work, t0);
        let mut h = Self {
            t,
            t0,
            now: t0,
            events: Vec::new(),
            media: Vec::new(),
        };
        let sent = h.drain();
        (h, sent)
    }

    /// Drains every output: returns the transmits, keeps events and media steps.
    fn drain(&mut self) -> Vec<Sent> {
        let mut sent = Vec::new();
        while let Some(tx) = self.t.poll_transmit() {
            let msg = parse(&tx.bytes);
            sent.push(Sent { tx, msg });
        }
        while let Some(e) = self.t.poll_event() {
            self.events.push(e);
        }
        while let Some(op) = self.t.poll_media() {
            self.media.push(op);
        }
        sent
    }

    fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    fn take_media(&mut self) -> Vec<MediaOp> {
        std::mem::take(&mut self.media)
    }

    /// Moves virtual time to `t0 + ms`, which must not be past the next deadline (a timer
    /// would then be late).
    fn at(&mut self, ms: u64) {
        let to = self.t0 + Duration::from_millis(ms);
        assert!(to >= self.now, "time runs forward");
        if let Some(d) = self.t.poll_timeout() {
            assert!(to <= d, "a deadline at {:?} was skipped", d - self.t0);
        }
        self.now = to;
    }

    /// Time since t0.
    fn elapsed(&self) -> Duration {
        self.now - self.t0
    }

    fn input(&mut self, input: Input) -> Vec<Sent> {
        self.t.handle(self.now, input);
        self.drain()
    }

    /// Branch `idx`'s callee answers `req` (the INVITE, or with `cancel` the CANCEL).
    fn answer(&mut self, idx: usize, cancel: bool, req: &Message, status: u16) -> Vec<Sent> {
        self.input(Input::Response {
            idx,
            cancel,
            resp: uas(req, status, None),
        })
    }

    /// Jumps to the next deadline and fires it; `None` when no timer is armed.
    fn fire(&mut self) -> Option<Vec<Sent>> {
        let d = self.t.poll_timeout()?;
        assert!(d >= self.now, "a deadline in the past");
        self.now = d;
        self.t.handle_timeout(d);
        Some(self.drain())
    }

    /// Fires timers until the transaction is done, with nothing else arriving; returns every
    /// transmit with the time it left. Fails if that takes more than five minutes.
    fn run_out(&mut self) -> Vec<(Duration, Sent)> {
        let mut all = Vec::new();
        while !self.t.is_done() {
            let sent = self.fire().expect("not done, so some timer must be armed");
            assert!(self.elapsed() < Duration::from_secs(300), "never settles");
            let at = self.elapsed();
            all.extend(sent.into_iter().map(|s| (at, s)));
        }
        all
    }
}

/// The one message of `sent`.
fn one(mut sent: Vec<Sent>) -> Sent {
    assert_eq!(sent.len(), 1, "exactly one message: {sent:?}");
    sent.remove(0)
}

/// The messages of `sent` going to `dest`.
fn to(sent: &[Sent], dest: &str) -> Vec<usize> {
    (0..sent.len())
        .filter(|&i| sent[i].tx.dest == addr(dest))
        .collect()
}

/// Checks a response relayed to the caller: where it goes, its status, only the caller's Via.
fn assert_upstream(s: &Sent, status: u16) {
    assert_eq!(s.tx.dest, addr(CALLER), "responses go to the caller");
    assert_eq!(s.tx.proto, Proto::Udp);
    assert_eq!(s.tx.local, addr(PROXY));
    assert_eq!(s.status(), Some(status));
    let vias = s.msg.vias().expect("Via");
    assert_eq!(vias.len(), 1, "our Via is not sent upstream");
    assert_eq!(vias[0].branch(), Some("z9hG4bKcaller1"));
    assert_eq!(s.cseq(), (1, "INVITE".to_owned()));
}

/// Checks a forwarded INVITE to `dest`; returns its branch.
fn assert_forwarded(s: &Sent, dest: &str) -> String {
    assert_eq!(s.tx.dest, addr(dest));
    assert_eq!(s.tx.local, addr(PROXY));
    assert_eq!(s.method(), Some("INVITE"));
    let ruri = format!("sip:bob@{dest}");
    assert_eq!(s.msg.request_uri(), Some(ruri.as_str()));
    let vias = s.msg.vias().expect("Via");
    assert_eq!(vias.len(), 2, "our Via on top of the caller's");
    assert_eq!((vias[0].host, vias[0].port), ("198.51.100.1", Some(5060)));
    let branch = s.branch();
    assert!(branch.starts_with(BRANCH_PREFIX), "our branch: {branch}");
    assert_eq!(vias[1].branch(), Some("z9hG4bKcaller1"));
    assert_eq!(s.msg.max_forwards().expect("Max-Forwards"), Some(69));
    let rr = s.msg.route_set(HeaderName::RecordRoute).expect("RR");
    assert!(
        rr.first()
            .is_some_and(|r| r.uri.starts_with("sip:198.51.100.1:5060;lr")),
        "our Record-Route: {rr:?}"
    );
    branch
}

/// Checks the hop-by-hop request (ACK or CANCEL) the proxy built for branch `fwd` to `dest`.
fn assert_hop_request(s: &Sent, method: &str, fwd: &Sent, dest: &str) {
    assert_eq!(s.tx.dest, addr(dest));
    assert_eq!(s.method(), Some(method));
    assert_eq!(s.msg.request_uri(), fwd.msg.request_uri());
    assert_eq!(s.msg.vias().expect("Via").len(), 1, "only our Via");
    assert_eq!(s.branch(), fwd.branch(), "same branch as the INVITE");
    assert_eq!(s.cseq(), (1, method.to_owned()));
}

fn key(branch: &str, method: &str) -> TxnKey {
    TxnKey::new(branch, PROXY, method)
}

fn bind(branch: &str, idx: usize) -> Event {
    Event::Bind {
        key: key(branch, "INVITE"),
        idx,
        cancel: false,
    }
}

fn bind_cancel(branch: &str, idx: usize) -> Event {
    Event::Bind {
        key: key(branch, "CANCEL"),
        idx,
        cancel: true,
    }
}

/// Starts an INVITE forked to `dests` without media; returns the forwarded INVITEs in target
/// order (after checking the 100 Trying and the Bind events).
fn invite_to(dests: &[&str]) -> (Harness, Vec<Sent>) {
    let (mut h, sent) = Harness::start(ctx(false), request("INVITE", None), forward(dests, None));
    let mut trying = Vec::new();
    let mut fwd = Vec::new();
    for s in sent {
        if s.tx.dest == addr(CALLER) {
            trying.push(s);
        } else {
            fwd.push(s);
        }
    }
    let trying = one(trying);
    assert_upstream(&trying, 100);
    assert!(
        trying.msg.to().expect("To").tag().is_none(),
        "no To-tag on 100"
    );
    assert_eq!(fwd.len(), dests.len(), "one INVITE per target");
    let mut binds = Vec::new();
    for (i, (f, d)) in fwd.iter().zip(dests).enumerate() {
        binds.push(bind(&assert_forwarded(f, d), i));
    }
    assert_eq!(h.take_events(), binds);
    (h, fwd)
}

#[test]
fn single_branch_invite_is_forwarded_relayed_and_ends_after_timers_l_and_m() {
    let (mut h, fwd) = invite_to(&[BOB]);
    let inv = &fwd[0];
    assert_eq!(inv.tx.proto, Proto::Udp);
    let branch = inv.branch();

    // 100 is hop-by-hop (RFC 3261 §16.7 step 5).
    h.at(50);
    assert!(h.answer(0, false, &inv.msg, 100).is_empty());

    h.at(1_000);
    let ringing = uas(&inv.msg, 180, None);
    assert_eq!(
        client_key(&ringing),
        Some(key(&branch, "INVITE")),
        "the bound key matches the callee's responses"
    );
    let up = one(h.answer(0, false, &inv.msg, 180));
    assert_upstream(&up, 180);
    assert!(up.msg.to().expect("To").tag().is_some());
    assert!(h.take_events().is_empty(), "no final yet");

    h.at(3_000);
    let up = one(h.answer(0, false, &inv.msg, 200));
    assert_upstream(&up, 200);
    assert_eq!(h.take_events(), vec![Event::Final]);
    assert!(h.take_media().is_empty(), "no media without a relay");

    // Timer L (server, RFC 6026 §8.7) and Timer M (client, §8.4): 64·T1 after the 2xx.
    let end = Duration::from_secs(3 + 32);
    assert_eq!(h.t.poll_timeout(), Some(h.t0 + end));
    assert!(!h.t.is_done());
    assert!(h.fire().expect("timer").is_empty());
    assert_eq!(h.elapsed(), end);
    assert_eq!(
        h.take_events(),
        vec![Event::Unbind(key(&branch, "INVITE")), Event::ServerDone]
    );
    assert!(h.t.is_done());
    assert_eq!(h.t.poll_timeout(), None);
}

#[test]
fn retransmitted_invite_gets_the_last_provisional_and_every_2xx_goes_up() {
    let (mut h, fwd) = invite_to(&[BOB]);
    let inv = &fwd[0].msg;

    h.at(200);
    assert_upstream(&one(h.input(Input::Retransmission)), 100);
    h.at(400);
    assert_upstream(&one(h.answer(0, false, inv, 180)), 180);
    h.at(1_500);
    assert_upstream(&one(h.input(Input::Retransmission)), 180);
    h.at(2_000);
    assert_upstream(&one(h.answer(0, false, inv, 200)), 200);
    // RFC 6026 §8.6: Accepted absorbs the caller's retransmissions...
    h.at(2_100);
    assert!(h.input(Input::Retransmission).is_empty());
    // ... and §8.4/§8.5: the callee's retransmitted 2xx still goes up (its ACK is end to end).
    h.at(2_500);
    assert_upstream(&one(h.answer(0, false, inv, 200)), 200);
    assert_eq!(h.take_events(), vec![Event::Final], "one Final");
}

#[test]
fn fork_best_final_is_the_lowest_class_then_the_lowest_code() {
    let (mut h, fwd) = invite_to(&[BOB, CAROL]);
    assert_ne!(fwd[0].branch(), fwd[1].branch(), "one branch id per target");

    // The 486 waits for the other branch; the proxy ACKs it itself (RFC 3261 §17.1.1.3).
    h.at(300);
    let ack = one(h.answer(0, false, &fwd[0].msg, 486));
    assert_hop_request(&ack, "ACK", &fwd[0], BOB);
    assert_eq!(
        ack.msg.to().expect("To").tag(),
        uas(&fwd[0].msg, 486, None).to().expect("To").tag(),
        "the ACK carries the To-tag of the final"
    );
    assert!(h.take_events().is_empty());

    // The last final decides: 404 and 486 share a class, the lower code wins
    // (`ResponseContext::conclude`, RFC 3261 §16.7 step 6).
    h.at(400);
    let sent = h.answer(1, false, &fwd[1].msg, 404);
    assert_eq!(sent.len(), 2, "{sent:?}");
    let ack = &sent[to(&sent, CAROL)[0]];
    assert_hop_request(ack, "ACK", &fwd[1], CAROL);
    let up = &sent[one_idx(to(&sent, CALLER))];
    assert_upstream(up, 404);
    assert_eq!(h.take_events(), vec![Event::Final]);

    // The caller's ACK stops Timer G; Timer D ends both branches, Timer I the server.
    h.at(600);
    assert!(h.input(Input::Ack).is_empty());
    let rest = h.run_out();
    assert!(rest.is_empty(), "nothing more on the wire: {rest:?}");
    let mut events = h.take_events();
    events.sort_by_key(|e| format!("{e:?}"));
    let mut expected = vec![
        Event::Unbind(key(&fwd[0].branch(), "INVITE")),
        Event::Unbind(key(&fwd[1].branch(), "INVITE")),
        Event::ServerDone,
    ];
    expected.sort_by_key(|e| format!("{e:?}"));
    assert_eq!(events, expected);
    // Timer D of the last branch: 32 s after its 404.
    assert_eq!(h.elapsed(), Duration::from_millis(400 + 32_000));
}

fn one_idx(v: Vec<usize>) -> usize {
    assert_eq!(v.len(), 1, "exactly one: {v:?}");
    v[0]
}

#[test]
fn a_6xx_cancels_the_other_branches_and_beats_their_487() {
    let (mut h, fwd) = invite_to(&[BOB, CAROL]);
    h.at(400);
    assert_upstream(&one(h.answer(0, false, &fwd[0].msg, 180)), 180);
    assert_upstream(&one(h.answer(1, false, &fwd[1].msg, 180)), 180);

    // RFC 3261 §16.7 step 10: a 6xx cancels the other pending branches.
    h.at(1_000);
    let sent = h.answer(0, false, &fwd[0].msg, 603);
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert_hop_request(&sent[to(&sent, BOB)[0]], "ACK", &fwd[0], BOB);
    let cancel = &sent[one_idx(to(&sent, CAROL))];
    assert_hop_request(cancel, "CANCEL", &fwd[1], CAROL);
    assert_eq!(h.take_events(), vec![bind_cancel(&fwd[1].branch(), 1)]);

    h.at(1_100);
    assert!(h.answer(1, true, &cancel.msg, 200).is_empty());
    let sent = h.answer(1, false, &fwd[1].msg, 487);
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert_hop_request(&sent[one_idx(to(&sent, CAROL))], "ACK", &fwd[1], CAROL);
    assert_upstream(&sent[one_idx(to(&sent, CALLER))], 603);
    assert_eq!(h.take_events(), vec![Event::Final]);
}

#[test]
fn a_2xx_cancels_the_other_ringing_branch() {
    let (mut h, fwd) = invite_to(&[BOB, CAROL]);
    h.at(400);
    assert_upstream(&one(h.answer(0, false, &fwd[0].msg, 180)), 180);
    h.at(450);
    assert_upstream(&one(h.answer(1, false, &fwd[1].msg, 183)), 183);

    h.at(2_000);
    let sent = h.answer(0, false, &fwd[0].msg, 200);
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert_upstream(&sent[one_idx(to(&sent, CALLER))], 200);
    let cancel = &sent[one_idx(to(&sent, CAROL))];
    assert_hop_request(cancel, "CANCEL", &fwd[1], CAROL);
    assert_eq!(
        h.take_events(),
        vec![bind_cancel(&fwd[1].branch(), 1), Event::Final]
    );

    // Carol's 487 is ACKed, not relayed: the caller has its 2xx.
    h.at(2_100);
    assert!(h.answer(1, true, &cancel.msg, 200).is_empty());
    let ack = one(h.answer(1, false, &fwd[1].msg, 487));
    assert_hop_request(&ack, "ACK", &fwd[1], CAROL);
    assert!(h.take_events().is_empty());

    let rest = h.run_out();
    assert!(rest.is_empty(), "{rest:?}");
    let events = h.take_events();
    for k in [
        key(&fwd[0].branch(), "INVITE"),
        key(&fwd[1].branch(), "INVITE"),
        key(&fwd[1].branch(), "CANCEL"),
    ] {
        assert!(
            events.contains(&Event::Unbind(k.clone())),
            "{k:?} in {events:?}"
        );
    }
    assert!(events.contains(&Event::ServerDone));
}

#[test]
fn a_2xx_defers_the_cancel_of_a_silent_branch_until_its_provisional() {
    let (mut h, fwd) = invite_to(&[BOB, CAROL]);
    // Carol has not answered yet: RFC 3261 §9.1 forbids a CANCEL before a provisional.
    h.at(300);
    let sent = h.answer(0, false, &fwd[0].msg, 200);
    assert_upstream(&one(sent), 200);
    assert_eq!(h.take_events(), vec![Event::Final]);

    // Her 180 triggers it, and is not relayed.
    h.at(400);
    let cancel = one(h.answer(1, false, &fwd[1].msg, 180));
    assert_hop_request(&cancel, "CANCEL", &fwd[1], CAROL);
    assert_eq!(h.take_events(), vec![bind_cancel(&fwd[1].branch(), 1)]);
}

#[test]
fn caller_cancel_while_ringing_cancels_the_branch_and_relays_its_487() {
    let (mut h, fwd) = invite_to(&[BOB]);
    h.at(400);
    assert_upstream(&one(h.answer(0, false, &fwd[0].msg, 180)), 180);

    h.at(5_000);
    let cancel = one(h.input(Input::Cancel));
    assert_hop_request(&cancel, "CANCEL", &fwd[0], BOB);
    assert_eq!(h.take_events(), vec![bind_cancel(&fwd[0].branch(), 0)]);
    // A second CANCEL from the caller (a retransmission) cancels nothing more.
    assert!(h.input(Input::Cancel).is_empty());

    h.at(5_050);
    assert!(h.answer(0, true, &cancel.msg, 200).is_empty());
    h.at(5_100);
    let sent = h.answer(0, false, &fwd[0].msg, 487);
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert_hop_request(&sent[one_idx(to(&sent, BOB))], "ACK", &fwd[0], BOB);
    assert_upstream(&sent[one_idx(to(&sent, CALLER))], 487);
    assert_eq!(h.take_events(), vec![Event::Final]);
}

#[test]
fn caller_cancel_before_any_provisional_answers_487_at_once() {
    let (mut h, fwd) = invite_to(&[BOB]);
    // The proxy may not CANCEL yet (RFC 3261 §9.1): the branch counts as 487 now.
    h.at(100);
    assert_upstream(&one(h.input(Input::Cancel)), 487);
    assert_eq!(h.take_events(), vec![Event::Final]);

    // The callee's first provisional draws the CANCEL and goes nowhere else.
    h.at(300);
    let cancel = one(h.answer(0, false, &fwd[0].msg, 180));
    assert_hop_request(&cancel, "CANCEL", &fwd[0], BOB);
    assert_eq!(h.take_events(), vec![bind_cancel(&fwd[0].branch(), 0)]);
}

#[test]
fn timer_c_cancels_a_ringing_branch_and_answers_408() {
    let (mut h, fwd) = invite_to(&[BOB]);
    h.at(400);
    assert_upstream(&one(h.answer(0, false, &fwd[0].msg, 180)), 180);
    // Timer C (fr_inv, 120 s) restarts with each provisional but 100 (RFC 3261 §16.7 step 2).
    assert_eq!(
        h.t.poll_timeout(),
        Some(h.t0 + Duration::from_millis(120_400))
    );
    h.at(60_400);
    assert!(h.answer(0, false, &fwd[0].msg, 100).is_empty());
    assert_eq!(
        h.t.poll_timeout(),
        Some(h.t0 + Duration::from_millis(120_400))
    );
    assert_upstream(&one(h.answer(0, false, &fwd[0].msg, 180)), 180);
    let c = Duration::from_millis(180_400);
    assert_eq!(h.t.poll_timeout(), Some(h.t0 + c));

    // RFC 3261 §16.8: CANCEL the branch, answer 408 upstream.
    let sent = h.fire().expect("Timer C");
    assert_eq!(h.elapsed(), c);
    assert_eq!(sent.len(), 2, "{sent:?}");
    let cancel = &sent[one_idx(to(&sent, BOB))];
    assert_hop_request(cancel, "CANCEL", &fwd[0], BOB);
    assert_upstream(&sent[one_idx(to(&sent, CALLER))], 408);
    assert_eq!(
        h.take_events(),
        vec![bind_cancel(&fwd[0].branch(), 0), Event::Final]
    );

    // The callee is gone: the CANCEL and the 408 are retransmitted, never the INVITE, and
    // everything ends within 64·T1 of Timer C.
    let rest = h.run_out();
    assert!(
        rest.iter().all(
            |(_, s)| (s.tx.dest == addr(BOB) && s.method() == Some("CANCEL"))
                || (s.tx.dest == addr(CALLER) && s.status() == Some(408))
        ),
        "{rest:?}"
    );
    assert!(rest.iter().any(|(_, s)| s.method() == Some("CANCEL")));
    assert!(
        h.elapsed() <= c + Duration::from_secs(32),
        "{:?}",
        h.elapsed()
    );
    assert!(h.take_events().contains(&Event::ServerDone));
}

#[test]
fn no_response_over_udp_retransmits_at_timer_a_then_408_at_timer_b() {
    let (mut h, fwd) = invite_to(&[BOB]);
    let branch = fwd[0].branch();
    let mut invites = Vec::new();
    let mut upstream = Vec::new();
    while upstream.is_empty() {
        for s in h.fire().expect("Timer A or B") {
            if s.tx.dest == addr(BOB) {
                assert_eq!(s.tx.bytes, fwd[0].tx.bytes, "the same INVITE again");
                invites.push(h.elapsed().as_millis());
            } else {
                upstream.push(s);
            }
        }
    }
    // RFC 3261 §17.1.1.2: T1, doubling (no T2 cap for INVITE); Timer B at 64·T1.
    assert_eq!(invites, vec![500, 1_500, 3_500, 7_500, 15_500, 31_500]);
    assert_eq!(h.elapsed(), Duration::from_secs(32));
    assert_upstream(&one(upstream), 408);
    assert_eq!(
        h.take_events(),
        vec![Event::Unbind(key(&branch, "INVITE")), Event::Final]
    );

    // Timer G retransmits the 408 until the caller's ACK; Timer I ends the server side.
    let sent = h.fire().expect("Timer G");
    assert_eq!(h.elapsed(), Duration::from_millis(32_500));
    assert_upstream(&one(sent), 408);
    h.at(33_000);
    assert!(h.input(Input::Ack).is_empty());
    assert!(h.run_out().is_empty());
    assert_eq!(h.elapsed(), Duration::from_secs(33 + 5), "Timer I = T4");
    assert_eq!(h.take_events(), vec![Event::ServerDone]);
}

#[test]
fn no_response_over_tcp_is_not_retransmitted_and_ends_in_408() {
    let (mut h, sent) = Harness::start(
        ctx(false),
        request("INVITE", None),
        forward_over(&[BOB], Proto::Tcp, None),
    );
    let inv = &sent[one_idx(to(&sent, BOB))];
    assert_eq!(inv.tx.proto, Proto::Tcp);
    assert!(inv.msg.top_via().expect("Via").is_reliable());
    // RFC 5658: the transport changes, so two Record-Routes.
    assert_eq!(
        inv.msg
            .route_set(HeaderName::RecordRoute)
            .expect("RR")
            .len(),
        2
    );
    h.take_events();

    let sent = h.fire().expect("Timer B");
    assert_eq!(h.elapsed(), Duration::from_secs(32), "no Timer A on TCP");
    assert_upstream(&one(sent), 408);
}

#[test]
fn a_503_from_the_only_branch_goes_up_as_500() {
    let (mut h, fwd) = invite_to(&[BOB]);
    h.at(400);
    let sent = h.answer(0, false, &fwd[0].msg, 503);
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert_hop_request(&sent[one_idx(to(&sent, BOB))], "ACK", &fwd[0], BOB);
    // RFC 3261 §16.7 step 6: the proxy does not pass on the callee's overload.
    let up = &sent[one_idx(to(&sent, CALLER))];
    assert_upstream(up, 500);
}

/// A callee's challenge to `req`: `status` 401 (WWW-Authenticate) or 407
/// (Proxy-Authenticate) for `realm`.
fn challenge(req: &Message, status: u16, realm: &str) -> Message {
    let name = if status == 401 {
        "WWW-Authenticate"
    } else {
        "Proxy-Authenticate"
    };
    let value = format!("Digest realm=\"{realm}\", nonce=\"n-{realm}\", algorithm=MD5");
    parse(&reply::response(
        req,
        addr(PROXY),
        status,
        reply::reason(status),
        &[(name, &value)],
    ))
}

#[test]
fn forked_challenges_go_up_in_one_response() {
    // RFC 3261 §16.7 step 7: both branches challenge; the caller gets one 401 carrying both
    // branches' challenges, after the last branch answered.
    let (mut h, fwd) = invite_to(&[BOB, CAROL]);
    h.at(300);
    let resp = challenge(&fwd[0].msg, 401, "bob.example");
    let ack = one(h.input(Input::Response {
        idx: 0,
        cancel: false,
        resp,
    }));
    assert_hop_request(&ack, "ACK", &fwd[0], BOB);

    h.at(500);
    let resp = challenge(&fwd[1].msg, 407, "carol.example");
    let sent = h.input(Input::Response {
        idx: 1,
        cancel: false,
        resp,
    });
    assert_eq!(sent.len(), 2, "{sent:?}");
    let up = &sent[one_idx(to(&sent, CALLER))];
    assert_upstream(up, 401);
    let values = |name| {
        up.msg
            .headers_named(name)
            .map(|h| up.msg.str_at(h.value.clone()).expect("UTF-8").to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        values(HeaderName::WwwAuthenticate),
        vec!["Digest realm=\"bob.example\", nonce=\"n-bob.example\", algorithm=MD5"]
    );
    assert_eq!(
        values(HeaderName::ProxyAuthenticate),
        vec!["Digest realm=\"carol.example\", nonce=\"n-carol.example\", algorithm=MD5"]
    );
    assert_eq!(h.take_events(), vec![Event::Final]);
}

#[test]
fn non_invite_gets_no_trying_and_its_final_relayed() {
    let (mut h, sent) = Harness::start(ctx(false), request("MESSAGE", None), forward(&[BOB], None));
    let fwd = one(sent);
    assert_eq!(fwd.tx.dest, addr(BOB));
    assert_eq!(fwd.method(), Some("MESSAGE"));
    assert_eq!(
        h.take_events(),
        vec![Event::Bind {
            key: key(&fwd.branch(), "MESSAGE"),
            idx: 0,
            cancel: false,
        }]
    );

    h.at(100);
    let up = one(h.answer(0, false, &fwd.msg, 200));
    assert_eq!(up.tx.dest, addr(CALLER));
    assert_eq!(up.status(), Some(200));
    assert_eq!(up.cseq(), (1, "MESSAGE".to_owned()));
    assert_eq!(h.take_events(), vec![Event::Final]);

    // Timer K (T4) ends the client, Timer J (64·T1) the server (RFC 3261 §17.1.2.2, §17.2.2).
    assert!(h.run_out().is_empty());
    assert_eq!(h.elapsed(), Duration::from_millis(100 + 32_000));
    assert_eq!(
        h.take_events(),
        vec![
            Event::Unbind(key(&fwd.branch(), "MESSAGE")),
            Event::ServerDone
        ]
    );
}

#[test]
fn a_local_reply_is_sent_and_retransmitted_statefully() {
    let req = request("INVITE", None);
    let bytes = reply::response(&req, addr(CALLER), 403, "Forbidden", &[]);
    let (mut h, sent) = Harness::start(ctx(false), req, Work::Reply(bytes.clone()));
    let up = one(sent);
    assert_upstream(&up, 403);
    assert_eq!(up.tx.bytes, bytes, "sent as given");
    assert_eq!(h.take_events(), vec![Event::Final]);

    h.at(100);
    assert_eq!(one(h.input(Input::Retransmission)).tx.bytes, bytes);
    h.at(200);
    assert!(h.input(Input::Ack).is_empty());
    assert!(h.run_out().is_empty());
    assert_eq!(h.take_events(), vec![Event::ServerDone]);
}

// ---- retiring into the table of finished transactions (`ProxyTxn::retire`) ----

#[test]
fn a_non_invite_retires_with_its_final_for_retransmissions() {
    let (mut h, sent) = Harness::start(ctx(false), request("MESSAGE", None), forward(&[BOB], None));
    let fwd = one(sent);
    assert_eq!(h.t.retire(), None, "pending");
    h.at(100);
    let up = one(h.answer(0, false, &fwd.msg, 200));
    let at = h.t0 + Duration::from_millis(100);
    assert_eq!(
        h.t.retire(),
        Some(Finished {
            // Timer J (64·T1) for the server, Timer K (T4) for the client.
            server: Some((at + Duration::from_secs(32), ServerRest::Resend(up.tx))),
            clients: vec![(
                key(&fwd.branch(), "MESSAGE"),
                at + Duration::from_secs(5),
                ClientRest::Absorb
            )],
        })
    );
}

#[test]
fn an_invite_with_a_non_2xx_final_retires_once_acked() {
    let (mut h, fwd) = invite_to(&[BOB]);
    let inv = &fwd[0];
    h.at(300);
    let sent = h.answer(0, false, &inv.msg, 486);
    let ack = &sent[to(&sent, BOB)[0]];
    assert_eq!(ack.method(), Some("ACK"));
    assert_upstream(&sent[to(&sent, CALLER)[0]], 486);
    // Completed: Timer G still retransmits the 486 until the caller's ACK.
    assert_eq!(h.t.retire(), None);
    h.at(400);
    assert!(h.input(Input::Ack).is_empty());
    let at = |ms| h.t0 + Duration::from_millis(ms);
    assert_eq!(
        h.t.retire(),
        Some(Finished {
            // Confirmed: Timer I (T4) absorbs the ACK's retransmissions.
            server: Some((at(400 + 5_000), ServerRest::Invite)),
            // Timer D (32 s on UDP): a retransmitted 486 gets the same ACK.
            clients: vec![(
                key(&inv.branch(), "INVITE"),
                at(300 + 32_000),
                ClientRest::Ack(ack.tx.clone())
            )],
        })
    );
}

#[test]
fn an_answered_invite_retires_passing_2xx_on_or_with_the_relayed_copy() {
    // Not relayed: a retransmitted 2xx goes on statelessly.
    let (mut h, fwd) = invite_to(&[BOB]);
    h.at(300);
    assert_upstream(&one(h.answer(0, false, &fwd[0].msg, 200)), 200);
    let fin = h.t.retire().expect("answered: only timers L and M left");
    assert_eq!(fin.server.map(|s| s.1), Some(ServerRest::Invite));
    assert_eq!(fin.clients.len(), 1);
    assert_eq!(fin.clients[0].2, ClientRest::Pass);

    // Relayed: the callee's 2xx with the answer's To-tag gets the relay's copy again.
    let (mut h, ids) = relayed_invite(&[BOB]);
    h.at(20);
    let inv = offer_ok(&mut h, 0, &ids[0], BOB);
    h.at(300);
    let ok = uas(&inv.msg, 200, Some(ANSWER));
    let tag = ok.to().unwrap().tag().unwrap().to_owned();
    h.input(Input::Response {
        idx: 0,
        cancel: false,
        resp: ok,
    });
    let resp = expect_answer(&mut h, 0, &ids[0], BOB, 200);
    h.t.handle_answer(h.now, 0, resp, Some(RELAY_ANSWER.as_bytes().to_vec()));
    let up = one(h.drain());
    // (The shell performs this step before it asks to retire.)
    assert_finished(&mut h, 200, false);
    let fin = h.t.retire().expect("answered");
    assert_eq!(
        fin.clients[0].2,
        ClientRest::Answer { tag, up: up.tx },
        "the rewritten 2xx, with the relay's SDP"
    );
}

// ---- media (a relay is running: `Context::media`) ----

/// An INVITE with SDP, relayed (`media = "always"`): the 100 Trying goes out, the forwarded
/// INVITE waits for the offer.
fn relayed_invite(dests: &[&str]) -> (Harness, Vec<String>) {
    let (mut h, sent) = Harness::start(
        ctx(true),
        request("INVITE", Some(OFFER)),
        forward(dests, Some(MediaMode::Always)),
    );
    assert_upstream(&one(sent), 100);
    assert!(h.take_events().is_empty(), "nothing bound before the offer");
    let ops = h.take_media();
    assert_eq!(ops.len(), dests.len());
    let mut ids = Vec::new();
    for (i, op) in ops.into_iter().enumerate() {
        match op {
            MediaOp::Offer {
                idx,
                branch,
                role,
                auth_user,
            } => {
                assert_eq!((idx, role, auth_user), (i, Role::Relay, None));
                assert!(branch.starts_with(BRANCH_PREFIX));
                ids.push(branch);
            }
            other => panic!("expected an offer, got {other:?}"),
        }
    }
    assert!(!h.t.is_done(), "a pending offer keeps the transaction");
    (h, ids)
}

/// Forwards branch `idx` with the relay's offer; returns the INVITE.
fn offer_ok(h: &mut Harness, idx: usize, branch: &str, dest: &str) -> Sent {
    h.t.handle_offer(h.now, idx, Ok(Some(RELAY_OFFER.as_bytes().to_vec())));
    let inv = one(h.drain());
    assert_eq!(assert_forwarded(&inv, dest), branch, "the offer's branch");
    assert_eq!(inv.msg.body(), RELAY_OFFER.as_bytes(), "the relay's SDP");
    assert_eq!(
        inv.msg.header_str(HeaderName::ContentLength),
        Some(RELAY_OFFER.len().to_string().as_str())
    );
    assert_eq!(h.take_events(), vec![bind(branch, idx)]);
    inv
}

/// Takes the one pending media step, an `Answer` for branch `idx` with `status`.
fn expect_answer(h: &mut Harness, idx: usize, branch: &str, dest: &str, status: u16) -> Message {
    let mut ops = h.take_media();
    assert_eq!(ops.len(), 1, "{ops:?}");
    match ops.remove(0) {
        MediaOp::Answer {
            idx: i,
            branch: b,
            role,
            from,
            resp,
        } => {
            assert_eq!(
                (i, b.as_str(), role, from),
                (idx, branch, Role::Relay, addr(dest))
            );
            assert_eq!(resp.status(), Some(status));
            assert_eq!(resp.vias().expect("Via").len(), 2, "still with our Via");
            resp
        }
        other => panic!("expected an answer, got {other:?}"),
    }
}

fn assert_finished(h: &mut Harness, status: u16, cancelled: bool) {
    let ops = h.take_media();
    assert!(
        matches!(ops.as_slice(), [MediaOp::Finished { status: s, cancelled: c }] if *s == status && *c == cancelled),
        "Finished {{ {status}, {cancelled} }} in {ops:?}"
    );
}

#[test]
fn media_offer_and_answer_rewrite_the_bodies() {
    let (mut h, ids) = relayed_invite(&[BOB]);
    h.at(20);
    let inv = offer_ok(&mut h, 0, &ids[0], BOB);

    // A 180 goes through the media layer first; unchanged, it is relayed as received.
    h.at(400);
    assert!(
        h.answer(0, false, &inv.msg, 180).is_empty(),
        "held for media"
    );
    let resp = expect_answer(&mut h, 0, &ids[0], BOB, 180);
    h.t.handle_answer(h.now, 0, resp, None);
    let up = one(h.drain());
    assert_upstream(&up, 180);
    assert!(up.msg.body().is_empty());
    assert!(h.take_media().is_empty());

    // The 200's SDP is replaced by the relay's; then the call is reported answered.
    h.at(3_000);
    let sent = h.input(Input::Response {
        idx: 0,
        cancel: false,
        resp: uas(&inv.msg, 200, Some(ANSWER)),
    });
    assert!(sent.is_empty(), "held for media");
    let resp = expect_answer(&mut h, 0, &ids[0], BOB, 200);
    assert_eq!(resp.body(), ANSWER.as_bytes());
    h.t.handle_answer(h.now, 0, resp, Some(RELAY_ANSWER.as_bytes().to_vec()));
    let up = one(h.drain());
    assert_upstream(&up, 200);
    assert_eq!(up.msg.body(), RELAY_ANSWER.as_bytes());
    assert_eq!(
        up.msg.header_str(HeaderName::ContentLength),
        Some(RELAY_ANSWER.len().to_string().as_str())
    );
    assert_finished(&mut h, 200, false);
    assert_eq!(h.take_events(), vec![Event::Final]);
}

#[test]
fn media_offer_unchanged_forwards_the_callers_sdp() {
    let (mut h, ids) = relayed_invite(&[BOB]);
    h.t.handle_offer(h.now, 0, Ok(None));
    let inv = one(h.drain());
    assert_eq!(assert_forwarded(&inv, BOB), ids[0]);
    assert_eq!(inv.msg.body(), OFFER.as_bytes());
    // A second report for the same branch is ignored.
    h.t.handle_offer(h.now, 0, Ok(Some(RELAY_OFFER.as_bytes().to_vec())));
    assert!(h.drain().is_empty());
}

#[test]
fn media_non_2xx_final_is_relayed_and_reported_finished() {
    let (mut h, ids) = relayed_invite(&[BOB]);
    let inv = offer_ok(&mut h, 0, &ids[0], BOB);
    h.at(400);
    // Finals but 2xx skip the media layer.
    let sent = h.answer(0, false, &inv.msg, 486);
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert_hop_request(&sent[one_idx(to(&sent, BOB))], "ACK", &inv, BOB);
    assert_upstream(&sent[one_idx(to(&sent, CALLER))], 486);
    assert_finished(&mut h, 486, false);
}

#[test]
fn media_caller_cancel_is_reported_as_cancelled() {
    let (mut h, ids) = relayed_invite(&[BOB]);
    let inv = offer_ok(&mut h, 0, &ids[0], BOB);
    h.at(400);
    assert!(h.answer(0, false, &inv.msg, 180).is_empty());
    let resp = expect_answer(&mut h, 0, &ids[0], BOB, 180);
    h.t.handle_answer(h.now, 0, resp, None);
    assert_upstream(&one(h.drain()), 180);

    h.at(2_000);
    let cancel = one(h.input(Input::Cancel));
    assert_hop_request(&cancel, "CANCEL", &inv, BOB);
    assert!(h.answer(0, true, &cancel.msg, 200).is_empty());
    let sent = h.answer(0, false, &inv.msg, 487);
    assert_upstream(&sent[one_idx(to(&sent, CALLER))], 487);
    assert_finished(&mut h, 487, true);
}

#[test]
fn media_refused_offer_is_answered_with_the_limits_status() {
    for (why, status, retry_after) in [
        (Refused::Busy, 503, true),
        (Refused::TooManyStreams, 488, false),
        (Refused::CallerLimit, 486, false),
    ] {
        let (mut h, _) = relayed_invite(&[BOB]);
        h.at(10);
        h.t.handle_offer(h.now, 0, Err(why));
        let up = one(h.drain());
        // Nothing is forwarded; a 503 stays a 503 (it is ours, not a callee's).
        assert_upstream(&up, status);
        let text = String::from_utf8_lossy(&up.tx.bytes).into_owned();
        assert_eq!(text.contains("Retry-After: 30\r\n"), retry_after, "{text}");
        assert_eq!(h.take_events(), vec![Event::Final], "{why:?}: no Bind");
        assert_finished(&mut h, status, false);

        h.at(100);
        assert!(h.input(Input::Ack).is_empty());
        assert!(h.run_out().is_empty());
        assert_eq!(h.take_events(), vec![Event::ServerDone]);
    }
}

#[test]
fn media_one_refused_fork_leaves_the_other_to_answer() {
    let (mut h, ids) = relayed_invite(&[BOB, CAROL]);
    h.t.handle_offer(h.now, 0, Err(Refused::TooManyStreams));
    assert!(h.drain().is_empty(), "the other branch is still to come");
    let inv = offer_ok(&mut h, 1, &ids[1], CAROL);

    h.at(400);
    assert!(h.answer(1, false, &inv.msg, 200).is_empty());
    let resp = expect_answer(&mut h, 1, &ids[1], CAROL, 200);
    h.t.handle_answer(h.now, 1, resp, None);
    assert_upstream(&one(h.drain()), 200);
    assert_finished(&mut h, 200, false);
}

#[test]
fn caller_cancel_after_only_100_trying_is_forwarded_at_once() {
    let (mut h, fwd) = invite_to(&[BOB]);
    // A 100 is a provisional (RFC 3261 §9.1): the branch may be cancelled from then on.
    h.at(50);
    assert!(h.answer(0, false, &fwd[0].msg, 100).is_empty());

    h.at(3_000);
    let cancel = one(h.input(Input::Cancel));
    assert_hop_request(&cancel, "CANCEL", &fwd[0], BOB);
    assert_eq!(h.take_events(), vec![bind_cancel(&fwd[0].branch(), 0)]);

    // The caller's final is the callee's 487.
    h.at(3_050);
    assert!(h.answer(0, true, &cancel.msg, 200).is_empty());
    let sent = h.answer(0, false, &fwd[0].msg, 487);
    assert_upstream(&sent[one_idx(to(&sent, CALLER))], 487);
    assert_eq!(h.take_events(), vec![Event::Final]);
}

#[test]
fn a_2xx_crossing_our_487_still_goes_up() {
    let (mut h, fwd) = invite_to(&[BOB]);
    h.at(100);
    assert_upstream(&one(h.input(Input::Cancel)), 487);
    assert_eq!(h.take_events(), vec![Event::Final]);
    h.at(300);
    let cancel = one(h.answer(0, false, &fwd[0].msg, 180));
    assert_hop_request(&cancel, "CANCEL", &fwd[0], BOB);
    assert_eq!(h.take_events(), vec![bind_cancel(&fwd[0].branch(), 0)]);

    // The callee answered before our CANCEL reached it: RFC 3261 §16.7 step 5, every 2xx is
    // forwarded (the caller ACKs and BYEs it), and so are its retransmissions.
    h.at(350);
    assert!(h.answer(0, true, &cancel.msg, 200).is_empty());
    let up = one(h.answer(0, false, &fwd[0].msg, 200));
    assert_upstream(&up, 200);
    h.at(550);
    assert_upstream(&one(h.answer(0, false, &fwd[0].msg, 200)), 200);
    assert!(h.take_events().is_empty(), "no second Final");
}

#[test]
fn forked_non_invite_branches_are_not_cancelled() {
    let (mut h, sent) = Harness::start(
        ctx(false),
        request("MESSAGE", None),
        forward(&[BOB, CAROL], None),
    );
    assert_eq!(sent.len(), 2);
    let bob = &sent[one_idx(to(&sent, BOB))];
    let carol = &sent[one_idx(to(&sent, CAROL))];
    h.take_events();
    h.at(100);
    assert_eq!(one(h.answer(1, false, &carol.msg, 180)).status(), Some(180));
    h.at(200);
    // RFC 3261 §9.1: a CANCEL is for INVITE; the other MESSAGE runs its course.
    let sent = h.answer(0, false, &bob.msg, 200);
    assert!(
        sent.iter().all(|s| s.method() != Some("CANCEL")),
        "{sent:?}"
    );
    assert_eq!(one(sent).status(), Some(200));
    assert_eq!(h.take_events(), vec![Event::Final]);
}

#[test]
fn a_non_invite_gets_one_final_only() {
    let (mut h, sent) = Harness::start(
        ctx(false),
        request("MESSAGE", None),
        forward(&[BOB, CAROL], None),
    );
    let bob = &sent[one_idx(to(&sent, BOB))];
    let carol = &sent[one_idx(to(&sent, CAROL))];
    // A 6xx ends the request at once (the silent branch counts as 487)...
    h.at(100);
    let up = one(h.answer(0, false, &bob.msg, 603));
    assert_eq!((up.tx.dest, up.status()), (addr(CALLER), Some(603)));
    // ... and a late 2xx of the other branch is not a second final (RFC 3261 §17.2.2).
    h.at(200);
    assert!(h.answer(1, false, &carol.msg, 200).is_empty());
}

#[test]
fn a_2xx_from_a_branch_not_relayed_still_finishes_the_relayed_ones() {
    // `media = "nat"`: Bob registered behind NAT (a flow) is relayed, Carol is not.
    let mut work = forward(&[BOB, CAROL], Some(MediaMode::Nat));
    if let Work::Forward { plan, .. } = &mut work {
        plan.targets[0].flow = Some(crate::proxy::forward::Flow {
            proto: Proto::Udp,
            addr: addr(BOB),
        });
    }
    let (mut h, sent) = Harness::start(ctx(true), request("INVITE", Some(OFFER)), work);
    // Carol's branch goes out at once with the caller's SDP; Bob's waits for the relay.
    assert_upstream(&sent[one_idx(to(&sent, CALLER))], 100);
    let carol = sent[one_idx(to(&sent, CAROL))].msg.clone();
    assert_eq!(carol.body(), OFFER.as_bytes());
    let ops = h.take_media();
    assert!(
        matches!(
            ops.as_slice(),
            [MediaOp::Offer {
                idx: 0,
                role: Role::Relay,
                ..
            }]
        ),
        "{ops:?}"
    );
    h.t.handle_offer(h.now, 0, Ok(Some(RELAY_OFFER.as_bytes().to_vec())));
    assert_eq!(h.drain().len(), 1, "Bob's INVITE with the relay's SDP");
    h.take_events();

    // Carol (not relayed) answers: the relayed branch's session must be given back now, not
    // when the relay's offer timeout notices it (a leaked media session otherwise).
    h.at(300);
    let sent = h.answer(1, false, &carol, 200);
    assert!(sent.iter().any(|s| s.status() == Some(200)), "{sent:?}");
    assert_finished(&mut h, 200, false);
}

/// One parse per message: the received INVITE is forwarded, and the callee's responses go
/// upstream, by span edits of the parsed message — nothing in the proxy core parses again.
#[test]
fn a_forwarded_invite_and_its_responses_are_not_parsed_again() {
    let parses = || crate::sip::parse::PARSES.with(std::cell::Cell::get);
    let t0 = t0();
    let req = request("INVITE", Some(OFFER));
    let before = parses();
    let mut t = ProxyTxn::new(
        std::sync::Arc::new(ctx(false)),
        req,
        source(),
        forward(&[BOB], None),
        t0,
    );
    let mut out = Vec::new();
    while let Some(tx) = t.poll_transmit() {
        out.push(tx);
    }
    assert_eq!(
        parses(),
        before,
        "the INVITE went out without a second parse"
    );
    let to_bob = out
        .iter()
        .find(|tx| tx.dest == addr(BOB))
        .expect("forwarded");
    let fwd = parse(&to_bob.bytes);
    let (r180, r200) = (uas(&fwd, 180, None), uas(&fwd, 200, Some(ANSWER)));
    let before = parses();
    for (ms, resp) in [(100, r180), (200, r200)] {
        t.handle(
            t0 + Duration::from_millis(ms),
            Input::Response {
                idx: 0,
                cancel: false,
                resp,
            },
        );
    }
    let mut up = 0;
    while let Some(tx) = t.poll_transmit() {
        up += usize::from(tx.dest == addr(CALLER));
    }
    assert_eq!(up, 2, "180 and 200 relayed");
    assert_eq!(
        parses(),
        before,
        "the responses went up without a second parse"
    );
}

// ---- Failover (README "Next hops and failover") ----

/// An INVITE (with `media`) whose branches try `branches[i]` in order, each UDP; a silent
/// next hop is left after `silent_ms` when set.
fn failover_work(branches: &[&[&str]], silent_ms: Option<u64>, media: Option<MediaMode>) -> Work {
    Work::Forward {
        plan: Plan {
            targets: branches.iter().map(|b| hop(b[0], Proto::Udp)).collect(),
            record_route: true,
            media,
            failover_timeout: silent_ms.map(Duration::from_millis),
            ..Plan::default()
        },
        dests: branches
            .iter()
            .map(|b| b.iter().map(|d| attempt(d, Proto::Udp)).collect())
            .collect(),
        strip_proxy_auth: false,
        auth_user: None,
    }
}

/// Starts an INVITE to BOB with CAROL as its alternate; returns the INVITE to BOB.
fn invite_with_alternate(silent_ms: Option<u64>) -> (Harness, Sent) {
    let (mut h, sent) = Harness::start(
        ctx(false),
        request("INVITE", None),
        failover_work(&[&[BOB, CAROL]], silent_ms, None),
    );
    assert_upstream(&sent[one_idx(to(&sent, CALLER))], 100);
    let inv = &sent[one_idx(to(&sent, BOB))];
    let branch = assert_forwarded(inv, BOB);
    assert_eq!(h.take_events(), vec![bind(&branch, 0)]);
    let inv = sent
        .into_iter()
        .find(|s| s.tx.dest == addr(BOB))
        .expect("checked above");
    (h, inv)
}

fn failover_event(from: &str, to: &str, reason: FailoverReason) -> Event {
    Event::Failover {
        idx: 0,
        from: addr(from),
        to: addr(to),
        reason,
    }
}

#[test]
fn a_503_moves_the_branch_to_its_next_alternate() {
    let (mut h, bob) = invite_with_alternate(None);
    h.at(400);
    let sent = h.answer(0, false, &bob.msg, 503);
    assert_eq!(
        sent.len(),
        2,
        "the ACK to BOB and the INVITE to CAROL: {sent:?}"
    );
    assert_hop_request(&sent[one_idx(to(&sent, BOB))], "ACK", &bob, BOB);
    let carol = &sent[one_idx(to(&sent, CAROL))];
    let branch = assert_forwarded(carol, CAROL);
    assert_ne!(
        branch,
        bob.branch(),
        "a new client transaction, a new Via branch"
    );
    assert_eq!(carol.cseq(), (1, "INVITE".to_owned()));
    assert_eq!(
        h.take_events(),
        vec![
            failover_event(BOB, CAROL, FailoverReason::Unavailable),
            bind(&branch, 0)
        ]
    );
    // BOB retransmits its 503: ACKed again by the retired transaction, nothing goes up.
    h.at(600);
    let sent = h.answer(0, false, &bob.msg, 503);
    assert_hop_request(&one(sent), "ACK", &bob, BOB);
    // CAROL answers: that goes upstream.
    h.at(700);
    assert_upstream(&one(h.answer(0, false, &carol.msg, 180)), 180);
    let ok = h.answer(0, false, &carol.msg, 200);
    assert_upstream(&one(ok), 200);
    assert!(h.take_events().contains(&Event::Final));
    // Timer D ends BOB's transaction: its key is unbound.
    h.run_out();
    assert!(
        h.take_events()
            .contains(&Event::Unbind(key(&bob.branch(), "INVITE")))
    );
}

#[test]
fn a_503_from_the_last_alternate_goes_up_as_500() {
    let (mut h, bob) = invite_with_alternate(None);
    h.at(400);
    let sent = h.answer(0, false, &bob.msg, 503);
    let carol = sent
        .into_iter()
        .find(|s| s.tx.dest == addr(CAROL))
        .expect("the INVITE to CAROL");
    h.at(500);
    let sent = h.answer(0, false, &carol.msg, 503);
    assert_hop_request(&sent[one_idx(to(&sent, CAROL))], "ACK", &carol, CAROL);
    assert_upstream(&sent[one_idx(to(&sent, CALLER))], 500);
    assert!(to(&sent, BOB).is_empty());
}

#[test]
fn timer_b_without_a_provisional_moves_the_branch_on() {
    let (mut h, bob) = invite_with_alternate(None);
    let mut carol = None;
    while carol.is_none() {
        for s in h.fire().expect("Timer A or B") {
            assert_ne!(s.tx.dest, addr(CALLER), "nothing goes up: {s:?}");
            if s.tx.dest == addr(CAROL) {
                carol = Some(s);
            }
        }
    }
    // Timer B (64·T1) on BOB, then the same request to CAROL; BOB is not sent anything else.
    assert_eq!(h.elapsed(), Duration::from_secs(32));
    let carol = carol.expect("loop ends on it");
    let branch = assert_forwarded(&carol, CAROL);
    assert_eq!(
        h.take_events(),
        vec![
            Event::Unbind(key(&bob.branch(), "INVITE")),
            failover_event(BOB, CAROL, FailoverReason::Timeout),
            bind(&branch, 0)
        ]
    );
    // CAROL is silent too and is the last: its Timer B answers the caller 408.
    let mut up = Vec::new();
    while up.is_empty() {
        for s in h.fire().expect("Timer A or B") {
            assert_ne!(s.tx.dest, addr(BOB));
            if s.tx.dest == addr(CALLER) {
                up.push(s);
            }
        }
    }
    assert_eq!(h.elapsed(), Duration::from_secs(64));
    assert_upstream(&one(up), 408);
}

#[test]
fn a_silent_next_hop_is_left_after_the_failover_timeout() {
    let (mut h, bob) = invite_with_alternate(Some(2_000));
    // Timer A retransmits at 500 and 1500; at 2000 the branch moves on, without a CANCEL
    // (nothing was received from BOB).
    let mut log = Vec::new();
    while !log.iter().any(|(_, d, _)| *d == addr(CAROL)) {
        for s in h.fire().expect("Timer A or the failover timer") {
            log.push((
                h.elapsed().as_millis(),
                s.tx.dest,
                s.method().map(str::to_owned),
            ));
        }
    }
    let invite = Some("INVITE".to_owned());
    assert_eq!(
        log,
        vec![
            (500, addr(BOB), invite.clone()),
            (1_500, addr(BOB), invite.clone()),
            (2_000, addr(CAROL), invite.clone()),
        ]
    );
    let events = h.take_events();
    assert_eq!(
        events[..2],
        [
            Event::Unbind(key(&bob.branch(), "INVITE")),
            failover_event(BOB, CAROL, FailoverReason::Silent),
        ]
    );
    // BOB's retransmissions stopped: everything after goes to CAROL (the last, so no
    // failover timer now) until her Timer B.
    let rest = h.run_out();
    assert!(rest.iter().all(|(_, s)| s.tx.dest != addr(BOB)), "{rest:?}");
    assert!(
        rest.iter().any(|(at, s)| s.tx.dest == addr(CALLER)
            && s.status() == Some(408)
            && *at == Duration::from_secs(34)),
        "408 at 2 s + 64·T1: {rest:?}"
    );
}

#[test]
fn a_next_hop_that_sent_100_is_not_left_by_the_failover_timer() {
    let (mut h, bob) = invite_with_alternate(Some(2_000));
    h.at(300);
    assert!(h.answer(0, false, &bob.msg, 100).is_empty());
    let next = h.t.poll_timeout().expect("Timer C");
    assert!(next - h.t0 > Duration::from_secs(60), "{:?}", next - h.t0);
}

#[test]
fn no_failover_after_the_caller_cancelled() {
    let (mut h, bob) = invite_with_alternate(Some(2_000));
    h.at(100);
    assert_upstream(&one(h.input(Input::Cancel)), 487);
    // The failover timer is off, and a 503 now is only ACKed.
    assert!(
        h.t.poll_timeout()
            .is_some_and(|d| d - h.t0 == Duration::from_millis(500))
    );
    h.at(300);
    let sent = h.answer(0, false, &bob.msg, 503);
    assert_hop_request(&one(sent), "ACK", &bob, BOB);
    assert!(
        !h.take_events()
            .iter()
            .any(|e| matches!(e, Event::Failover { .. }))
    );
}

#[test]
fn no_failover_after_a_final_went_upstream() {
    // Branch 0 tries BOB then CAROL; branch 1 is DAVE, who answers first.
    let (mut h, sent) = Harness::start(
        ctx(false),
        request("INVITE", None),
        failover_work(&[&[BOB, CAROL], &[DAVE]], None, None),
    );
    let bob = sent
        .iter()
        .position(|s| s.tx.dest == addr(BOB))
        .expect("INVITE to BOB");
    let dave = sent
        .iter()
        .position(|s| s.tx.dest == addr(DAVE))
        .expect("INVITE to DAVE");
    h.at(200);
    assert_upstream(&one(h.answer(1, false, &sent[dave].msg, 200)), 200);
    h.at(300);
    let out = h.answer(0, false, &sent[bob].msg, 503);
    assert!(to(&out, CAROL).is_empty(), "{out:?}");
    assert_hop_request(&out[one_idx(to(&out, BOB))], "ACK", &sent[bob], BOB);
    assert!(
        !h.take_events()
            .iter()
            .any(|e| matches!(e, Event::Failover { .. }))
    );
}

#[test]
fn failover_keeps_the_media_session_of_the_branch() {
    let (mut h, sent) = Harness::start(
        ctx(true),
        request("INVITE", Some(OFFER)),
        failover_work(&[&[BOB, CAROL]], None, Some(MediaMode::Always)),
    );
    assert_upstream(&one(sent), 100);
    let id = match h.take_media().pop() {
        Some(MediaOp::Offer { branch, .. }) => branch,
        other => panic!("expected the offer, got {other:?}"),
    };
    h.at(20);
    let bob = offer_ok(&mut h, 0, &id, BOB);
    h.at(400);
    let sent = h.answer(0, false, &bob.msg, 503);
    let carol = &sent[one_idx(to(&sent, CAROL))];
    assert_eq!(
        carol.msg.body(),
        RELAY_OFFER.as_bytes(),
        "the relay's SDP again"
    );
    assert_ne!(carol.branch(), id);
    // CAROL's answer goes to media under the branch's first id: the same relay session.
    h.at(500);
    let resp = uas(&carol.msg, 200, Some(ANSWER));
    assert!(
        h.input(Input::Response {
            idx: 0,
            cancel: false,
            resp
        })
        .is_empty()
    );
    let resp = expect_answer(&mut h, 0, &id, CAROL, 200);
    h.t.handle_answer(h.now, 0, resp, Some(RELAY_ANSWER.as_bytes().to_vec()));
    let up = one(h.drain());
    assert_upstream(&up, 200);
    assert_eq!(up.msg.body(), RELAY_ANSWER.as_bytes());
}

// ---------------------------------------------------------------------------------------------
// Trunk credentials (Kamailio `uac_auth()`).

const PROVIDER: &str = "203.0.113.50:5060";
const PROVIDER_REALM: &str = "voip.example.net";

fn trunk() -> std::sync::Arc<crate::config::Trunk> {
    std::sync::Arc::new(crate::config::Trunk {
        name: "carrier".to_owned(),
        username: "acct1".to_owned(),
        auth_username: "acct1".to_owned(),
        password: "s3cret".to_owned(),
        realm: None,
        registration: None,
    })
}

/// An INVITE to the provider through a trunk route; returns the harness and the INVITE.
fn trunk_invite() -> (Harness, Sent) {
    let mut plan_hop = hop(PROVIDER, Proto::Udp);
    plan_hop.trunk = Some(trunk());
    let work = Work::Forward {
        plan: Plan {
            targets: vec![plan_hop.clone()],
            record_route: true,
            ..Plan::default()
        },
        dests: vec![vec![Attempt {
            hop: plan_hop,
            dest: addr(PROVIDER),
        }]],
        strip_proxy_auth: false,
        auth_user: None,
    };
    let (mut h, sent) = Harness::start(ctx(false), request("INVITE", None), work);
    let fwd = one(sent
        .into_iter()
        .filter(|s| s.tx.dest == addr(PROVIDER))
        .collect());
    assert_forwarded(&fwd, PROVIDER);
    h.take_events();
    (h, fwd)
}

/// The provider's challenge to `req`.
fn trunk_challenge(req: &Message, status: u16, nonce: &str) -> Message {
    let ch = crate::auth::digest::challenge(
        crate::config::DigestAlgorithm::Md5,
        PROVIDER_REALM,
        nonce,
        "",
        false,
    );
    let name = if status == 401 {
        "WWW-Authenticate"
    } else {
        "Proxy-Authenticate"
    };
    parse(&reply::response(
        req,
        addr(PROXY),
        status,
        reply::reason(status),
        &[(name, &ch)],
    ))
}

/// Splits what was sent into (to the provider, to the caller).
fn split(sent: Vec<Sent>) -> (Vec<Sent>, Vec<Sent>) {
    sent.into_iter().partition(|s| s.tx.dest == addr(PROVIDER))
}

#[test]
fn trunk_challenge_is_answered_with_credentials_and_never_relayed() {
    use crate::auth::digest;
    let (mut h, inv) = trunk_invite();
    h.at(100);
    let (down, up) = split(h.input(Input::Response {
        idx: 0,
        cancel: false,
        resp: trunk_challenge(&inv.msg, 407, "n1"),
    }));
    assert!(up.is_empty(), "the caller never sees the 407: {up:?}");
    assert_eq!(down.len(), 2, "{down:?}");
    let ack = down
        .iter()
        .find(|s| s.method() == Some("ACK"))
        .expect("ACK");
    assert_hop_request(ack, "ACK", &inv, PROVIDER);
    let again = down
        .iter()
        .find(|s| s.method() == Some("INVITE"))
        .expect("re-sent");
    assert_eq!(again.method(), Some("INVITE"));
    assert_eq!(again.cseq(), (2, "INVITE".to_owned()), "CSeq + 1");
    assert_ne!(again.branch(), inv.branch(), "a new branch");
    assert!(again.branch().starts_with(BRANCH_PREFIX));
    for name in [HeaderName::CallId, HeaderName::From, HeaderName::To] {
        assert_eq!(again.msg.header_str(name), inv.msg.header_str(name));
    }
    assert_eq!(again.msg.request_uri(), inv.msg.request_uri());
    // The credentials verify with the server side of our digest code.
    let value = again
        .msg
        .header_str(HeaderName::ProxyAuthorization)
        .expect("Proxy-Authorization");
    let c = digest::parse_credentials(value).unwrap();
    assert_eq!((&*c.username, &*c.realm), ("acct1", PROVIDER_REALM));
    assert_eq!(c.uri, format!("sip:bob@{PROVIDER}"));
    let ha1 = digest::ha1(c.algorithm, "acct1", PROVIDER_REALM, "s3cret");
    assert!(digest::verify(&ha1, "INVITE", &c));
    // The offset and the caller's tag are in our (signed) Record-Route.
    let rr = again.msg.route_set(HeaderName::RecordRoute).expect("RR");
    assert!(rr[0].uri.contains(";cs=1;ft=a1;m="), "{rr:?}");
    assert_eq!(h.take_events(), vec![bind(&again.branch(), 0)]);

    // The provider rings and answers the re-send: upstream with the caller's CSeq.
    h.at(300);
    let up = one(h.answer(0, false, &again.msg, 180));
    assert_upstream(&up, 180);
    h.at(500);
    let up = one(h.answer(0, false, &again.msg, 200));
    assert_upstream(&up, 200);
    // A retransmitted 407 is absorbed by the challenged transaction (its ACK again).
    h.at(600);
    let sent = h.input(Input::Response {
        idx: 0,
        cancel: false,
        resp: trunk_challenge(&inv.msg, 407, "n1"),
    });
    let ack = one(sent);
    assert_hop_request(&ack, "ACK", &inv, PROVIDER);
    h.run_out();
    assert!(h.t.is_done());
}

#[test]
fn trunk_credentials_challenged_again_give_the_caller_a_403() {
    let (mut h, inv) = trunk_invite();
    h.at(100);
    let (down, _) = split(h.input(Input::Response {
        idx: 0,
        cancel: false,
        resp: trunk_challenge(&inv.msg, 401, "n1"),
    }));
    let again = down
        .into_iter()
        .find(|s| s.method() == Some("INVITE"))
        .expect("re-sent");
    assert!(
        again.msg.header(HeaderName::Authorization).is_some(),
        "401 → Authorization"
    );
    h.at(200);
    let (down, up) = split(h.input(Input::Response {
        idx: 0,
        cancel: false,
        resp: trunk_challenge(&again.msg, 401, "n2"),
    }));
    let ack = one(down);
    assert_eq!(ack.method(), Some("ACK"));
    assert_eq!(ack.cseq(), (2, "ACK".to_owned()));
    let up = one(up);
    assert_upstream(&up, 403);
    let line = String::from_utf8_lossy(&up.tx.bytes);
    assert!(line.starts_with(&format!("SIP/2.0 403 {}\r\n", super::txn::TRUNK_REJECTED)));
    assert!(up.msg.header(HeaderName::WwwAuthenticate).is_none());
}

#[test]
fn trunk_none_on_the_branch_relays_the_challenge() {
    let (mut h, fwd) = invite_to(&[BOB]);
    h.at(100);
    let sent = h.input(Input::Response {
        idx: 0,
        cancel: false,
        resp: trunk_challenge(&fwd[0].msg, 407, "n1"),
    });
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert_hop_request(&sent[one_idx(to(&sent, BOB))], "ACK", &fwd[0], BOB);
    let up = &sent[one_idx(to(&sent, CALLER))];
    assert_upstream(up, 407);
    assert!(up.msg.header(HeaderName::ProxyAuthenticate).is_some());
}

#[test]
fn trunk_caller_cancel_after_the_re_send_cancels_the_re_sent_invite() {
    let (mut h, inv) = trunk_invite();
    h.at(100);
    let (down, _) = split(h.input(Input::Response {
        idx: 0,
        cancel: false,
        resp: trunk_challenge(&inv.msg, 407, "n1"),
    }));
    let again = down
        .into_iter()
        .find(|s| s.method() == Some("INVITE"))
        .expect("re-sent");
    h.take_events();
    h.at(300);
    assert_upstream(&one(h.answer(0, false, &again.msg, 180)), 180);
    h.at(1_000);
    let cancel = one(h.input(Input::Cancel));
    assert_eq!(cancel.method(), Some("CANCEL"));
    assert_eq!(cancel.branch(), again.branch(), "the re-sent transaction");
    assert_eq!(cancel.cseq(), (2, "CANCEL".to_owned()));
    assert_eq!(h.take_events(), vec![bind_cancel(&again.branch(), 0)]);
    h.at(1_050);
    assert!(h.answer(0, true, &cancel.msg, 200).is_empty());
    let (_, up) = split(h.answer(0, false, &again.msg, 487));
    assert_upstream(&one(up), 487);
}

#[test]
fn media_steps_only_where_the_relay_has_something_to_do() {
    // An initial INVITE on a route that never relays: no step at all, not even its outcome
    // (nothing was offered, so no session can exist to end or give back).
    let (mut h, sent) = Harness::start(
        ctx(true),
        request("INVITE", Some(OFFER)),
        forward(&[BOB], Some(MediaMode::Never)),
    );
    let inv = sent
        .into_iter()
        .find(|s| s.tx.dest == addr(BOB))
        .expect("forwarded at once");
    assert_eq!(inv.msg.body(), OFFER.as_bytes(), "the caller's own SDP");
    h.at(400);
    let up = one(h.input(Input::Response {
        idx: 0,
        cancel: false,
        resp: uas(&inv.msg, 200, Some(ANSWER)),
    }));
    assert_upstream(&up, 200);
    assert!(h.take_media().is_empty(), "a direct call has no media step");

    // A BYE in a dialog goes to the media layer (it may end a relayed call); its 200 without
    // a body passes straight up.
    let text = String::from_utf8(request("BYE", None).as_bytes().to_vec()).unwrap();
    let bye = parse(
        text.replace(
            "To: <sip:bob@example.com>",
            "To: <sip:bob@example.com>;tag=b1",
        )
        .as_bytes(),
    );
    let (mut h, sent) = Harness::start(ctx(true), bye, forward(&[BOB], None));
    assert!(sent.is_empty(), "held for the media layer");
    let ops = h.take_media();
    assert!(
        matches!(
            ops.as_slice(),
            [MediaOp::Offer {
                idx: 0,
                role: Role::InDialog,
                ..
            }]
        ),
        "{ops:?}"
    );
    h.t.handle_offer(h.now, 0, Ok(None));
    let fwd = one(h.drain());
    assert_eq!((fwd.tx.dest, fwd.method()), (addr(BOB), Some("BYE")));
    h.at(100);
    let up = one(h.answer(0, false, &fwd.msg, 200));
    assert_eq!((up.tx.dest, up.status()), (addr(CALLER), Some(200)));
    assert!(
        h.take_media().is_empty(),
        "no answer step for a 200 without a body"
    );
}
