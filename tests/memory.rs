//! Memory per transaction (issue #15): the heap a completed transaction keeps while RFC 3261
//! timers hold it (Timer J/L/M/D: 32 s over UDP after the final response).
//!
//! A test binary of its own, for its global allocator: `stats_alloc` wraps the system
//! allocator and counts live bytes (the crate forbids `unsafe`, so the counting allocator is
//! not written here). A server runs in-process on 127.0.0.1; a caller socket makes calls
//! (INVITE → 180 → 200 → ACK → BYE → 200) through its `[[route]]` to a callee socket, the
//! way `scripts/bench/calls.sh` does with SIPp. The heap growth over `CALLS` calls, while
//! their 2·`CALLS` transactions are still held, is divided among them.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

#[allow(dead_code)] // the e2e harness, shared: this test uses a part of it
#[path = "e2e/harness.rs"]
mod harness;

use std::alloc::System;
use std::net::SocketAddr;
use std::time::Duration;

use sipedge::sip::{ContactValue, Framing, HeaderName, Message, reply};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use tokio::net::UdpSocket;

use harness::TestServer;

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// The budget per completed transaction. Issue #15 asks for at most 4 KB (about what
/// Kamailio keeps). This test measures about 1.0 KB since finished transactions leave their
/// tasks for one shared table (src/proxy/linger.rs): their keys, the final to repeat, the ACK
/// or relayed 2xx to repeat, the deadlines. Before that, 3.7 KB (the task with the whole request
/// state; earlier figures of 7.6 and 10.6 KB counted each reallocation twice, see `live`).
/// README "Memory per transaction".
const BUDGET: usize = 1536;
/// Heap allocations per call (the whole process: server, and this test's caller and callee
/// sockets, whose share is small and fixed). malloc and free were a fifth of the proxy's CPU
/// per call in `perf` (issue #15); this test measured 313 per call before the forwarded
/// request's edits shared one string and the branch and Record-Route MACs stopped allocating,
/// 283 after.
const ALLOCATIONS_PER_CALL: usize = 300;
/// Calls made before the measurement: tables, caches and pools reach their working size.
const WARMUP: usize = 300;
/// Calls measured: 2 transactions each (the INVITE and the BYE).
const CALLS: usize = 2000;
/// Calls in flight at once.
const PARALLEL: usize = 8;

/// Live heap bytes: allocated − freed. (stats_alloc already counts a reallocation's growth in
/// `bytes_allocated` and its shrinking in `bytes_deallocated`; its `bytes_reallocated` is the
/// same delta again, and adding it counted every reallocation twice.)
fn live() -> isize {
    let s = GLOBAL.stats();
    s.bytes_allocated as isize - s.bytes_deallocated as isize
}

/// A realistic offer (calls.sh's SIPp UAC sends one of this size).
const SDP: &str = "v=0\r\no=user1 53655765 2353687637 IN IP4 127.0.0.1\r\ns=-\r\n\
c=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 6000 RTP/AVP 8 0 101\r\na=rtpmap:8 PCMA/8000\r\n\
a=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-15\r\n\
a=sendrecv\r\n";

fn invite(ruri: &str, caller: SocketAddr, call_id: &str) -> String {
    format!(
        "INVITE {ruri} SIP/2.0\r\n\
Via: SIP/2.0/UDP {caller};branch=z9hG4bK-{call_id};rport\r\n\
Max-Forwards: 70\r\n\
From: \"Alice\" <sip:alice@example.com>;tag=caller-{call_id}\r\n\
To: <{ruri}>\r\n\
Call-ID: {call_id}\r\n\
CSeq: 1 INVITE\r\n\
Contact: <sip:alice@{caller}>\r\n\
User-Agent: memory-test\r\n\
Content-Type: application/sdp\r\n\
Content-Length: {}\r\n\r\n{SDP}",
        SDP.len()
    )
}

#[allow(clippy::too_many_arguments)] // ACK and BYE: the same dialog request
fn in_dialog(
    method: &str,
    cseq: u32,
    target: &str,
    caller: SocketAddr,
    call_id: &str,
    to_tag: &str,
    routes: &str,
    branch: &str,
) -> String {
    format!(
        "{method} {target} SIP/2.0\r\n\
Via: SIP/2.0/UDP {caller};branch=z9hG4bK-{branch};rport\r\n\
Max-Forwards: 70\r\n\
Route: {routes}\r\n\
From: \"Alice\" <sip:alice@example.com>;tag=caller-{call_id}\r\n\
To: <sip:callee@example.com>;tag={to_tag}\r\n\
Call-ID: {call_id}\r\n\
CSeq: {cseq} {method}\r\n\
Content-Length: 0\r\n\r\n"
    )
}

async fn recv(sock: &UdpSocket, buf: &mut [u8]) -> (Message, SocketAddr) {
    let (n, from) = tokio::time::timeout(harness::WAIT, sock.recv_from(buf))
        .await
        .expect("nothing received in time")
        .unwrap();
    (Message::parse(&buf[..n], Framing::Datagram).unwrap(), from)
}

/// The callee: 180 and 200 for an INVITE, 200 for a BYE, nothing for an ACK.
async fn callee(sock: UdpSocket) {
    let addr = sock.local_addr().unwrap();
    let contact = format!("<sip:callee@{addr}>");
    let mut buf = vec![0u8; 65536];
    loop {
        let Ok((n, from)) = sock.recv_from(&mut buf).await else {
            return;
        };
        let Ok(req) = Message::parse(&buf[..n], Framing::Datagram) else {
            continue;
        };
        let statuses: &[u16] = match req.method() {
            Some("INVITE") => &[180, 200],
            Some("BYE") => &[200],
            _ => &[],
        };
        let mut extra: Vec<(&str, &str)> = req
            .headers_named(HeaderName::RecordRoute)
            .map(|h| ("Record-Route", req.str_at(h.value.clone()).unwrap()))
            .collect();
        extra.push(("Contact", &contact));
        let tag = reply::local_tag(&req);
        for &status in statuses {
            let bytes = reply::response(&req, from, status, "OK", &extra);
            let text = String::from_utf8(bytes).unwrap();
            let text = text.replace(&tag, "callee-tag");
            sock.send_to(text.as_bytes(), from).await.unwrap();
        }
    }
}

/// Calls `calls[..]` one after the other from one caller socket.
async fn caller(proxy: SocketAddr, ids: std::ops::Range<usize>) {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let me = sock.local_addr().unwrap();
    let mut buf = vec![0u8; 65536];
    for i in ids {
        let call_id = format!("mem-{i}");
        sock.send_to(
            invite("sip:2000@example.com", me, &call_id).as_bytes(),
            proxy,
        )
        .await
        .unwrap();
        let ok = loop {
            let (m, _) = recv(&sock, &mut buf).await;
            match m.status() {
                Some(200) => break m,
                Some(s) if s < 200 => {}
                other => panic!("call {call_id}: INVITE answered {other:?}"),
            }
        };
        let routes: Vec<String> = ok
            .route_set(HeaderName::RecordRoute)
            .unwrap()
            .iter()
            .map(|r| format!("<{}>", r.uri))
            .collect();
        let routes = routes.join(", ");
        let target = match ok.contacts().unwrap().first() {
            Some(ContactValue::Addr(a)) => a.uri.to_string(),
            other => panic!("call {call_id}: the 200 has no Contact: {other:?}"),
        };
        let tag = ok.to().unwrap().tag().unwrap().to_owned();
        let ack = in_dialog(
            "ACK",
            1,
            &target,
            me,
            &call_id,
            &tag,
            &routes,
            &format!("{call_id}-ack"),
        );
        sock.send_to(ack.as_bytes(), proxy).await.unwrap();
        let bye = in_dialog(
            "BYE",
            2,
            &target,
            me,
            &call_id,
            &tag,
            &routes,
            &format!("{call_id}-bye"),
        );
        sock.send_to(bye.as_bytes(), proxy).await.unwrap();
        let (m, _) = recv(&sock, &mut buf).await;
        assert_eq!(m.status(), Some(200), "call {call_id}: BYE");
        assert_eq!(m.cseq().unwrap().method, "BYE");
    }
}

async fn run_calls(proxy: SocketAddr, from: usize, n: usize) {
    let per = n.div_ceil(PARALLEL);
    let mut tasks = Vec::new();
    for w in 0..PARALLEL {
        let start = from + w * per;
        let end = (start + per).min(from + n);
        tasks.push(tokio::spawn(caller(proxy, start..end)));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completed_transaction_keeps_at_most_4_kb() {
    let callee_sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let pbx = callee_sock.local_addr().unwrap();
    let callee = tokio::spawn(callee(callee_sock));
    let srv = TestServer::start(
        "",
        &format!(
            "[[route]]\nname = \"pbx\"\nuser = '^[0-9]{{3,4}}$'\nnext_hop = \"{pbx}\"\nmedia = \"never\"\n"
        ),
    )
    .await;

    run_calls(srv.udp, 0, WARMUP).await;
    // Let the accounting writes of the warm-up land.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let region = Region::new(GLOBAL);
    let before = live();
    let started = tokio::time::Instant::now();
    run_calls(srv.udp, WARMUP, CALLS).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = live();
    let elapsed = started.elapsed();
    // Every transaction is still held: their timers (32 s) have not fired.
    let (servers, clients) = srv.proxy.transaction_count();
    assert!(
        elapsed < Duration::from_secs(25),
        "the calls took {elapsed:?}: early transactions may have ended"
    );
    assert_eq!(servers, 2 * (WARMUP + CALLS), "server transactions held");
    let txns = 2 * CALLS;
    let per_txn = (after - before) / txns as isize;
    let change = region.change();
    eprintln!(
        "{CALLS} calls ({txns} transactions) in {elapsed:?}: heap +{} bytes, {per_txn} bytes per \
         transaction; {} allocations, {} frees; tables: {servers} server, {clients} client",
        after - before,
        change.allocations,
        change.deallocations
    );
    assert!(
        per_txn <= BUDGET as isize,
        "a completed transaction keeps {per_txn} bytes (budget {BUDGET})"
    );
    let per_call = change.allocations / CALLS;
    assert!(
        per_call <= ALLOCATIONS_PER_CALL,
        "{per_call} heap allocations per call (budget {ALLOCATIONS_PER_CALL})"
    );
    srv.stop().await;
    callee.abort();
}
