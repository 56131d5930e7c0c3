//! RFC 3263 next hops and failover over real sockets: a tiny DNS server on loopback (built
//! with hickory-proto: it decodes each query and answers NAPTR/SRV/A from a table, counting
//! queries, with a configurable TTL), sipedge pointed at it with `[dns] servers`, a caller
//! and callee sockets. Asserts where the INVITEs go and what the caller gets.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use hickory_proto::op::{Message as DnsMessage, ResponseCode};
use hickory_proto::rr::rdata::{A, SRV};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use sipedge::sip::Message;
use tokio::net::UdpSocket;
use tokio::sync::Mutex;

use crate::harness::{TestServer, Ua};

/// The records the test DNS server answers with.
#[derive(Default)]
struct Zone {
    /// SRV name → (priority, weight, port, target).
    srv: HashMap<String, Vec<(u16, u16, u16, String)>>,
    /// Name → IPv4 addresses.
    a: HashMap<String, Vec<Ipv4Addr>>,
    /// TTL of every answer, seconds.
    ttl: u32,
    /// Queries received, by "name TYPE".
    queries: HashMap<String, usize>,
}

/// A DNS server on 127.0.0.1 answering from a [`Zone`] (NODATA for anything else).
struct TestDns {
    addr: SocketAddr,
    zone: Arc<Mutex<Zone>>,
}

impl TestDns {
    async fn start(ttl: u32) -> Self {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        let zone = Arc::new(Mutex::new(Zone {
            ttl,
            ..Zone::default()
        }));
        let z = zone.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let Ok((n, from)) = sock.recv_from(&mut buf).await else {
                    return;
                };
                let Ok(query) = DnsMessage::from_vec(&buf[..n]) else {
                    continue;
                };
                let answer = z.lock().await.answer(&query);
                let _ = sock.send_to(&answer, from).await;
            }
        });
        Self { addr, zone }
    }

    async fn srv(&self, name: &str, targets: &[(u16, u16, u16, &str)]) {
        self.zone.lock().await.srv.insert(
            name.to_owned(),
            targets
                .iter()
                .map(|(p, w, port, t)| (*p, *w, *port, (*t).to_owned()))
                .collect(),
        );
    }

    async fn a(&self, name: &str, ip: Ipv4Addr) {
        self.zone.lock().await.a.insert(name.to_owned(), vec![ip]);
    }

    async fn queries(&self, name: &str, kind: &str) -> usize {
        let key = format!("{name} {kind}");
        self.zone
            .lock()
            .await
            .queries
            .get(&key)
            .copied()
            .unwrap_or(0)
    }

    /// `[dns]` pointing at this server.
    fn config(&self) -> String {
        format!("[dns]\nservers = [\"{}\"]\ntimeout_ms = 1000\n", self.addr)
    }
}

impl Zone {
    fn answer(&mut self, query: &DnsMessage) -> Vec<u8> {
        let mut resp = DnsMessage::response(query.metadata.id, query.metadata.op_code);
        resp.metadata.authoritative = true;
        resp.metadata.recursion_desired = query.metadata.recursion_desired;
        resp.metadata.recursion_available = true;
        resp.metadata.response_code = ResponseCode::NoError;
        for q in &query.queries {
            resp.add_query(q.clone());
            let name = q
                .name()
                .to_ascii()
                .trim_end_matches('.')
                .to_ascii_lowercase();
            let kind = q.query_type();
            *self.queries.entry(format!("{name} {kind}")).or_default() += 1;
            let owner = q.name().clone();
            match kind {
                RecordType::SRV => {
                    for (p, w, port, t) in self.srv.get(&name).into_iter().flatten() {
                        let target = Name::from_ascii(format!("{t}.")).unwrap();
                        resp.add_answer(Record::from_rdata(
                            owner.clone(),
                            self.ttl,
                            RData::SRV(SRV::new(*p, *w, *port, target)),
                        ));
                    }
                }
                RecordType::A => {
                    for ip in self.a.get(&name).into_iter().flatten() {
                        resp.add_answer(Record::from_rdata(
                            owner.clone(),
                            self.ttl,
                            RData::A(A(*ip)),
                        ));
                    }
                }
                // NAPTR, AAAA and the rest: no data (the name exists, the type does not).
                _ => {}
            }
        }
        resp.to_vec().unwrap()
    }
}

fn invite(ruri: &str, caller: SocketAddr, call_id: &str) -> String {
    format!(
        "INVITE {ruri} SIP/2.0\r\n\
Via: SIP/2.0/UDP {caller};branch=z9hG4bK-{call_id};rport\r\n\
Max-Forwards: 70\r\n\
From: <sip:alice@example.com>;tag=caller-{call_id}\r\n\
To: <{ruri}>\r\n\
Call-ID: {call_id}\r\n\
CSeq: 1 INVITE\r\n\
Contact: <sip:alice@{caller}>\r\n\
Content-Length: 0\r\n\r\n"
    )
}

/// A `[[route]]` for 3–4 digit users to `next_hop` (TOML value as written), no media.
fn route(next_hop: &str, extra: &str) -> String {
    format!(
        "[[route]]\nname = \"pbx\"\nuser = '^[0-9]{{3,4}}$'\nnext_hop = {next_hop}\nmedia = \"never\"\n{extra}"
    )
}

/// The next request `ua` receives within `wait`, if any.
async fn recv_within(ua: &Ua, wait: Duration) -> Option<(Message, SocketAddr)> {
    let mut buf = vec![0u8; 65536];
    let (n, from) = tokio::time::timeout(wait, ua.sock.recv_from(&mut buf))
        .await
        .ok()?
        .unwrap();
    Some((
        Message::parse(&buf[..n], sipedge::sip::Framing::Datagram).unwrap(),
        from,
    ))
}

#[tokio::test]
async fn srv_failover_from_a_silent_target_to_the_next_priority() {
    let dns = TestDns::start(60).await;
    let silent = Ua::new().await;
    let backup = Ua::new().await;
    dns.srv(
        "_sip._udp.pbx.test",
        &[
            (10, 1, silent.addr.port(), "a.pbx.test"),
            (20, 1, backup.addr.port(), "b.pbx.test"),
        ],
    )
    .await;
    dns.a("a.pbx.test", Ipv4Addr::LOCALHOST).await;
    dns.a("b.pbx.test", Ipv4Addr::LOCALHOST).await;
    let srv = TestServer::start(
        "",
        &format!(
            "{}{}",
            dns.config(),
            route("\"pbx.test\"", "failover_timeout_ms = 700\n")
        ),
    )
    .await;
    let caller = Ua::new().await;
    let started = tokio::time::Instant::now();
    caller
        .send(
            srv.udp,
            &invite("sip:1234@example.com", caller.addr, "srv-fo"),
        )
        .await;

    // The priority-10 target gets the INVITE first (and says nothing).
    let (first, _) = silent.recv().await;
    assert_eq!(first.method(), Some("INVITE"));
    assert_eq!(
        first.request_uri(),
        Some("sip:1234@pbx.test"),
        "a name without a port stays without one (RFC 3263)"
    );
    // Within the failover time, the priority-20 target gets it, on a new branch.
    let (second, from) = backup.recv().await;
    let waited = started.elapsed();
    assert_eq!(second.method(), Some("INVITE"));
    assert!(
        waited >= Duration::from_millis(650) && waited < Duration::from_millis(2_500),
        "{waited:?}"
    );
    assert_ne!(
        second.top_via().unwrap().branch(),
        first.top_via().unwrap().branch()
    );
    backup.answer(&second, from, 200, "b").await;
    let (ok, _) = caller.recv().await;
    assert_eq!(ok.status(), Some(200));
    assert_eq!(ok.call_id().unwrap(), "srv-fo");
    // The silent target only ever saw the INVITE and its retransmission (Timer A), no CANCEL.
    while let Some((m, _)) = recv_within(&silent, Duration::from_millis(300)).await {
        assert_eq!(m.method(), Some("INVITE"), "no CANCEL to a silent hop");
    }
    assert_eq!(srv.proxy.stats().failovers.load(Relaxed), 1);
    srv.stop().await;
}

#[tokio::test]
async fn srv_weights_spread_calls_within_a_priority() {
    let dns = TestDns::start(60).await;
    let heavy = Ua::new().await;
    let light = Ua::new().await;
    dns.srv(
        "_sip._udp.pbx.test",
        &[
            (10, 3, heavy.addr.port(), "heavy.pbx.test"),
            (10, 1, light.addr.port(), "light.pbx.test"),
        ],
    )
    .await;
    dns.a("heavy.pbx.test", Ipv4Addr::LOCALHOST).await;
    dns.a("light.pbx.test", Ipv4Addr::LOCALHOST).await;
    let srv = TestServer::start(
        "",
        &format!("{}{}", dns.config(), route("\"pbx.test\"", "")),
    )
    .await;
    let caller = Ua::new().await;

    // Both callees answer every INVITE with 200 at once; count who got each call.
    let answer_all = |ua: Arc<Ua>, tag: &'static str| {
        tokio::spawn(async move {
            let mut n = 0usize;
            while let Some((m, from)) = recv_within(&ua, Duration::from_secs(3)).await {
                if m.method() == Some("INVITE") {
                    n += 1;
                    ua.answer(&m, from, 200, tag).await;
                }
            }
            n
        })
    };
    let heavy_task = answer_all(Arc::new(heavy), "heavy");
    let light_task = answer_all(Arc::new(light), "light");
    const CALLS: usize = 200;
    for i in 0..CALLS {
        caller
            .send(
                srv.udp,
                &invite("sip:1234@example.com", caller.addr, &format!("w{i}")),
            )
            .await;
        let (ok, _) = caller.recv().await;
        assert_eq!(ok.status(), Some(200), "call {i}");
    }
    let (h, l) = (heavy_task.await.unwrap(), light_task.await.unwrap());
    assert_eq!(h + l, CALLS);
    // Weights 3:1 → 150 of 200 expected; binomial σ ≈ 6.1, so ±25 (4σ) is the tolerance.
    assert!((125..=175).contains(&h), "heavy got {h}, light {l}");
    assert_eq!(srv.proxy.stats().failovers.load(Relaxed), 0);
    srv.stop().await;
}

#[tokio::test]
async fn the_dns_cache_honours_the_ttl() {
    let dns = TestDns::start(1).await;
    let old = Ua::new().await;
    let new = Ua::new().await;
    dns.srv(
        "_sip._udp.pbx.test",
        &[(10, 1, old.addr.port(), "old.pbx.test")],
    )
    .await;
    dns.a("old.pbx.test", Ipv4Addr::LOCALHOST).await;
    dns.a("new.pbx.test", Ipv4Addr::LOCALHOST).await;
    let srv = TestServer::start(
        "",
        &format!("{}{}", dns.config(), route("\"pbx.test\"", "")),
    )
    .await;
    // The startup check (`serve`) is not run in-process: the first call does the lookups.
    let caller = Ua::new().await;
    let call = |id: &'static str| invite("sip:1234@example.com", caller.addr, id);
    caller.send(srv.udp, &call("ttl1")).await;
    let (m, from) = old.recv().await;
    old.answer(&m, from, 200, "old").await;
    assert_eq!(caller.recv().await.0.status(), Some(200));
    assert_eq!(dns.queries("_sip._udp.pbx.test", "SRV").await, 1);

    // The record changes; within its TTL the cached answer is used (no new query).
    dns.srv(
        "_sip._udp.pbx.test",
        &[(10, 1, new.addr.port(), "new.pbx.test")],
    )
    .await;
    caller.send(srv.udp, &call("ttl2")).await;
    let (m, from) = old.recv().await;
    assert_eq!(m.call_id().unwrap(), "ttl2");
    old.answer(&m, from, 200, "old").await;
    assert_eq!(caller.recv().await.0.status(), Some(200));
    assert_eq!(dns.queries("_sip._udp.pbx.test", "SRV").await, 1);

    // After the TTL (1 s), the next call asks again and goes to the new target.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    caller.send(srv.udp, &call("ttl3")).await;
    let (m, from) = new.recv().await;
    assert_eq!(m.call_id().unwrap(), "ttl3");
    new.answer(&m, from, 200, "new").await;
    assert_eq!(caller.recv().await.0.status(), Some(200));
    assert_eq!(dns.queries("_sip._udp.pbx.test", "SRV").await, 2);
    assert!(
        recv_within(&old, Duration::from_millis(200))
            .await
            .is_none()
    );
    srv.stop().await;
}

#[tokio::test]
async fn a_next_hop_list_fails_over_on_503() {
    let first = Ua::new().await;
    let second = Ua::new().await;
    let srv = TestServer::start(
        "",
        &route(&format!("[\"{}\", \"{}\"]", first.addr, second.addr), ""),
    )
    .await;
    let caller = Ua::new().await;
    caller
        .send(
            srv.udp,
            &invite("sip:1234@example.com", caller.addr, "list503"),
        )
        .await;
    let (inv, from) = first.recv().await;
    assert_eq!(
        inv.request_uri(),
        Some(format!("sip:1234@{}", first.addr).as_str())
    );
    first.answer(&inv, from, 503, "first").await;
    assert_eq!(first.recv().await.0.method(), Some("ACK"));
    // The second next hop gets the call, with its own address in the Request-URI.
    let (inv, from) = second.recv().await;
    assert_eq!(inv.method(), Some("INVITE"));
    assert_eq!(
        inv.request_uri(),
        Some(format!("sip:1234@{}", second.addr).as_str())
    );
    second.answer(&inv, from, 180, "second").await;
    second.answer(&inv, from, 200, "second").await;
    // The caller never sees the 503.
    assert_eq!(caller.recv().await.0.status(), Some(180));
    assert_eq!(caller.recv().await.0.status(), Some(200));
    assert_eq!(srv.proxy.stats().failovers.load(Relaxed), 1);
    srv.stop().await;
}

#[tokio::test]
async fn a_name_that_does_not_resolve_gets_503_and_counts_queries() {
    let dns = TestDns::start(60).await;
    let srv = TestServer::start(
        "",
        &format!("{}{}", dns.config(), route("\"nowhere.test\"", "")),
    )
    .await;
    let caller = Ua::new().await;
    caller
        .send(
            srv.udp,
            &invite("sip:1234@example.com", caller.addr, "nores"),
        )
        .await;
    let (r, _) = caller.recv().await;
    assert_eq!(r.status(), Some(503));
    // RFC 3263: NAPTR, then SRV for UDP and TCP, then A on the name itself.
    for (name, kind) in [
        ("nowhere.test", "NAPTR"),
        ("_sip._udp.nowhere.test", "SRV"),
        ("_sip._tcp.nowhere.test", "SRV"),
        ("nowhere.test", "A"),
    ] {
        assert_eq!(dns.queries(name, kind).await, 1, "{name} {kind}");
    }
    srv.stop().await;
}

/// Waits (bounded) until `cond` holds.
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..100 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("not within 5 s: {what}");
}

#[tokio::test]
async fn probing_skips_a_next_hop_that_leaves_its_probes_unanswered() {
    let dead = Ua::new().await;
    let alive = Arc::new(Ua::new().await);
    let srv = TestServer::start(
        "",
        &route(
            &format!("[\"{}\", \"{}\"]", dead.addr, alive.addr),
            "probe_interval = 1\n",
        ),
    )
    .await;
    // The live next hop answers its probes; INVITEs are handed to the test.
    let (tx, mut invites) = tokio::sync::mpsc::channel(4);
    let a = alive.clone();
    let answering = tokio::spawn(async move {
        while let Some((m, from)) = recv_within(&a, Duration::from_secs(8)).await {
            match m.method() {
                Some("OPTIONS") => a.answer(&m, from, 200, "alive").await,
                Some("INVITE") => {
                    let _ = tx.send((m, from)).await;
                }
                _ => {}
            }
        }
    });
    let (probe, _) = dead.recv().await;
    assert_eq!(probe.method(), Some("OPTIONS"));
    assert!(
        probe
            .top_via()
            .unwrap()
            .branch()
            .unwrap()
            .starts_with("z9hG4bK-pr-")
    );
    let prober = srv.proxy.prober().clone();
    until("the silent next hop is down", || prober.is_down(dead.addr)).await;
    assert!(!prober.is_down(alive.addr));

    // A call goes straight to the live next hop: the dead one gets only probes.
    let caller = Ua::new().await;
    caller
        .send(
            srv.udp,
            &invite("sip:1234@example.com", caller.addr, "probed"),
        )
        .await;
    let (inv, from) = tokio::time::timeout(Duration::from_secs(2), invites.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(inv.call_id().unwrap(), "probed");
    alive.answer(&inv, from, 200, "alive").await;
    assert_eq!(caller.recv().await.0.status(), Some(200));
    assert_eq!(srv.proxy.stats().failovers.load(Relaxed), 0);

    // The dead one answers its probes (older ones queued first, they no longer count): up
    // again once the awaited one is answered.
    loop {
        let (m, from) = dead.recv().await;
        assert_eq!(
            m.method(),
            Some("OPTIONS"),
            "no INVITE to a next hop that is down"
        );
        dead.answer(&m, from, 200, "dead").await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        if !prober.is_down(dead.addr) {
            break;
        }
    }
    srv.stop().await;
    answering.abort();
}
