//! The relay over real UDP sockets on 127.0.0.1: a caller and a callee exchange RTP and RTCP
//! through it. Every wait is a poll with a deadline, never a sleep. Each test uses its own
//! port range below the ephemeral range (32768+), so tests can run in parallel.

#![allow(clippy::unwrap_used)] // test helpers panic on failure by design

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use sipedge_relay::sans_io::{build_rtcp_rr, build_rtp};
use sipedge_relay::{
    CloseReason, Closed, Counts, Direction, Endpoint, IoMode, RelayConfig, RelayError, RelayHandle,
    SessionId, Side, start,
};
use tokio::net::UdpSocket;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::time::{Instant, timeout};

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const WAIT: Duration = Duration::from_secs(5);

fn config(port_min: u16, port_max: u16) -> RelayConfig {
    RelayConfig {
        bind: LOCALHOST,
        port_min,
        port_max,
        workers: 2,
        idle_timeout: Duration::from_secs(60),
        offer_timeout: Duration::from_secs(60),
        hold_timeout: Duration::from_secs(60),
        io: IoMode::Batched,
        batch_wait: sipedge_relay::DEFAULT_BATCH_WAIT,
    }
}

fn relay_addr(port: u16) -> SocketAddr {
    SocketAddr::new(LOCALHOST, port)
}

async fn socket() -> UdpSocket {
    UdpSocket::bind((LOCALHOST, 0)).await.unwrap()
}

fn endpoint(rtp: SocketAddr, rtcp: SocketAddr) -> Endpoint {
    Endpoint {
        rtp,
        rtcp,
        rtcp_mux: false,
        direction: Direction::SendRecv,
        clock_rate: 8000,
    }
}

/// The next datagram on `s`, or a failure after [`WAIT`].
/// Tells the relay one side's SDP endpoint of a one-stream session.
async fn sdp(relay: &RelayHandle, id: SessionId, side: Side, ep: Endpoint, answered: bool) {
    relay
        .update(id, side, vec![Some(ep)], vec![], answered)
        .await
        .unwrap();
}

async fn recv(s: &UdpSocket) -> (Vec<u8>, SocketAddr) {
    let mut buf = vec![0u8; 4096];
    let (n, from) = timeout(WAIT, s.recv_from(&mut buf))
        .await
        .expect("a datagram within the deadline")
        .unwrap();
    buf.truncate(n);
    (buf, from)
}

/// Polls a session's stats until `cond` holds, failing after [`WAIT`].
async fn wait_stats(
    relay: &RelayHandle,
    id: sipedge_relay::SessionId,
    cond: impl Fn(&sipedge_relay::SessionStats) -> bool,
) {
    let deadline = Instant::now() + WAIT;
    loop {
        if cond(&relay.query(id).await.unwrap()) {
            return;
        }
        assert!(Instant::now() < deadline, "condition not reached in time");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn next_closed(events: &mut UnboundedReceiver<Closed>) -> Closed {
    timeout(WAIT, events.recv())
        .await
        .expect("a closed session within the deadline")
        .expect("the event channel is open")
}

/// A caller behind NAT (its SDP names an address it does not send from) and a callee with a
/// correct SDP exchange RTP and RTCP; checks payloads, source ports, exact stats, and that
/// delete frees the ports.
async fn exchange(io: IoMode, port_min: u16) {
    let (relay, _events) = start(RelayConfig {
        io,
        ..config(port_min, port_min + 99)
    })
    .unwrap();
    let alloc = relay.allocate("call-1@test".into(), 1).await.unwrap();
    assert_eq!(alloc.streams.len(), 1);
    let ports = alloc.streams[0];
    for p in [ports.caller, ports.callee] {
        assert_eq!(p.rtp % 2, 0);
        assert_eq!(p.rtcp, p.rtp + 1);
        assert!((port_min..port_min + 100).contains(&p.rtp));
    }
    assert_ne!(ports.caller, ports.callee);

    let (caller_rtp, caller_rtcp) = (socket().await, socket().await);
    let (callee_rtp, callee_rtcp) = (socket().await, socket().await);
    // The caller's SDP has an address it does not send from (a NAT in between); still loopback.
    let wrong = endpoint(
        "127.0.0.3:4000".parse().unwrap(),
        "127.0.0.3:4001".parse().unwrap(),
    );
    let callee_sdp = endpoint(
        callee_rtp.local_addr().unwrap(),
        callee_rtcp.local_addr().unwrap(),
    );
    relay
        // Its SIP came from 127.0.0.1: that is where its media may come from.
        .update(
            alloc.id,
            Side::Caller,
            vec![Some(wrong)],
            vec![LOCALHOST],
            false,
        )
        .await
        .unwrap();
    relay
        .update(alloc.id, Side::Callee, vec![Some(callee_sdp)], vec![], true)
        .await
        .unwrap();

    // The callee speaks first: accepted, but sent to the caller's (wrong) SDP address.
    let early = build_rtp(100, 0, 0xcafe, 160);
    callee_rtp
        .send_to(&early, relay_addr(ports.callee.rtp))
        .await
        .unwrap();
    // Another socket than the caller's: make sure it was handled before the caller latches.
    wait_stats(&relay, alloc.id, |s| s.callee.pkts == 1).await;

    // The caller's packets latch its real source and reach the callee from the callee-facing port.
    for seq in 1..=10u16 {
        let p = build_rtp(seq, u32::from(seq) * 160, 0xbeef, 160);
        caller_rtp
            .send_to(&p, relay_addr(ports.caller.rtp))
            .await
            .unwrap();
        let (got, from) = recv(&callee_rtp).await;
        assert_eq!(got, p, "payload unchanged");
        assert_eq!(from, relay_addr(ports.callee.rtp));
    }
    // The callee's packets now go to the caller's real address, from the caller-facing port.
    for seq in 101..=110u16 {
        let p = build_rtp(seq, u32::from(seq) * 160, 0xcafe, 160);
        callee_rtp
            .send_to(&p, relay_addr(ports.callee.rtp))
            .await
            .unwrap();
        let (got, from) = recv(&caller_rtp).await;
        assert_eq!(got, p);
        assert_eq!(from, relay_addr(ports.caller.rtp));
    }
    // A stranger on the caller-facing port is dropped; an oversized datagram from the caller too.
    let stranger = socket().await;
    stranger
        .send_to(&build_rtp(1, 1, 1, 160), relay_addr(ports.caller.rtp))
        .await
        .unwrap();
    caller_rtp
        .send_to(&vec![0x80; 3000], relay_addr(ports.caller.rtp))
        .await
        .unwrap();
    let p = build_rtp(11, 11 * 160, 0xbeef, 160);
    caller_rtp
        .send_to(&p, relay_addr(ports.caller.rtp))
        .await
        .unwrap();
    assert_eq!(
        recv(&callee_rtp).await.0,
        p,
        "only the valid packet comes through"
    );

    // RTCP latches on its own and uses the RTCP ports both ways.
    let rr = build_rtcp_rr(0xbeef);
    caller_rtcp
        .send_to(&rr, relay_addr(ports.caller.rtcp))
        .await
        .unwrap();
    let (got, from) = recv(&callee_rtcp).await;
    assert_eq!(
        (got.as_slice(), from),
        (rr.as_slice(), relay_addr(ports.callee.rtcp))
    );
    let rr2 = build_rtcp_rr(0xcafe);
    callee_rtcp
        .send_to(&rr2, relay_addr(ports.callee.rtcp))
        .await
        .unwrap();
    let (got, from) = recv(&caller_rtcp).await;
    assert_eq!(
        (got.as_slice(), from),
        (rr2.as_slice(), relay_addr(ports.caller.rtcp))
    );

    let stats = relay.query(alloc.id).await.unwrap();
    assert_eq!(stats.caller.pkts, 11);
    assert_eq!(stats.caller.bytes, 11 * 172);
    assert_eq!(stats.caller.lost, 0);
    assert_eq!((stats.caller.rtcp_pkts, stats.caller.rtcp_bytes), (1, 8));
    assert_eq!(
        stats.caller.dropped, 2,
        "the stranger and the oversized datagram"
    );
    assert_eq!(stats.callee.pkts, 11);
    assert_eq!(stats.callee.bytes, 11 * 172);
    assert_eq!((stats.callee.rtcp_pkts, stats.callee.dropped), (1, 0));
    assert_eq!(stats.callee.lost, 0);

    assert_eq!(
        relay.counts().await,
        Counts {
            sessions: 1,
            ports_in_use: 4,
            strangers: 1,
            // The relay-wide totals are the session's: everything accepted was forwarded.
            forwarded: stats.caller.pkts
                + stats.caller.rtcp_pkts
                + stats.callee.pkts
                + stats.callee.rtcp_pkts,
            forwarded_bytes: stats.caller.bytes
                + stats.caller.rtcp_bytes
                + stats.callee.bytes
                + stats.callee.rtcp_bytes,
            dropped: stats.caller.dropped + stats.callee.dropped,
        }
    );
    assert_eq!(stats.caller.strangers, 1);
    let last = relay.delete(alloc.id).await.unwrap();
    assert_eq!(last.caller.pkts, 11);
    assert!(last.duration >= stats.duration);
    // The stranger count is since start, not per live session.
    let c = relay.counts().await;
    assert_eq!((c.sessions, c.ports_in_use, c.strangers), (0, 0, 1));
    // The sockets are closed: the ports can be bound again right away.
    for p in [ports.caller, ports.callee] {
        std::net::UdpSocket::bind(relay_addr(p.rtp)).unwrap();
        std::net::UdpSocket::bind(relay_addr(p.rtcp)).unwrap();
    }
    assert!(matches!(
        relay.delete(alloc.id).await,
        Err(RelayError::NoSuchSession)
    ));
    assert!(relay.shutdown().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchange_with_batched_syscalls() {
    exchange(IoMode::Batched, 21000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchange_with_per_packet_fallback() {
    exchange(IoMode::PerPacket, 21200).await;
}

#[tokio::test]
async fn a_burst_is_forwarded_whole_and_in_order() {
    let (relay, _events) = start(config(21400, 21499)).unwrap();
    let alloc = relay.allocate("burst".into(), 1).await.unwrap();
    let ports = alloc.streams[0];
    let (a, b) = (socket().await, socket().await);
    let ep = |s: &UdpSocket| {
        let addr = s.local_addr().unwrap();
        endpoint(addr, SocketAddr::new(addr.ip(), addr.port() + 1))
    };
    relay
        .update(alloc.id, Side::Caller, vec![Some(ep(&a))], vec![], false)
        .await
        .unwrap();
    relay
        .update(alloc.id, Side::Callee, vec![Some(ep(&b))], vec![], true)
        .await
        .unwrap();
    // More than one wakeup's worth (4 batches of 32), sent at once; fewer than the 256
    // datagrams of this size a default 208 KiB socket buffer holds, so nothing overflows.
    let n = 200u16;
    for seq in 0..n {
        a.send_to(&build_rtp(seq, 0, 1, 160), relay_addr(ports.caller.rtp))
            .await
            .unwrap();
    }
    for seq in 0..n {
        let (got, _) = recv(&b).await;
        assert_eq!(u16::from_be_bytes([got[2], got[3]]), seq);
    }
    let s = relay.query(alloc.id).await.unwrap();
    assert_eq!((s.caller.pkts, s.caller.lost), (u64::from(n), 0));
    relay.shutdown().await;
}

/// Paced traffic dense enough for the worker to coalesce its wake-ups (a long `batch_wait`,
/// so that nearly every packet arrives while the worker sleeps), in both directions of two
/// sessions at once: everything is forwarded, in order, to the right peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coalesced_wake_ups_lose_and_reorder_nothing() {
    let (relay, _events) = start(RelayConfig {
        workers: 1,
        batch_wait: Duration::from_millis(5),
        ..config(21500, 21599)
    })
    .unwrap();
    let mut legs = Vec::new();
    for call in 0..2u32 {
        let alloc = relay.allocate(format!("dense-{call}"), 1).await.unwrap();
        let ports = alloc.streams[0];
        let (a, b) = (socket().await, socket().await);
        let ep = |s: &UdpSocket| {
            let addr = s.local_addr().unwrap();
            endpoint(addr, SocketAddr::new(addr.ip(), addr.port() + 1))
        };
        sdp(&relay, alloc.id, Side::Caller, ep(&a), false).await;
        sdp(&relay, alloc.id, Side::Callee, ep(&b), true).await;
        legs.push((alloc.id, ports, a, b));
    }
    let n = 150u16;
    for seq in 0..n {
        for (call, (_, ports, a, b)) in legs.iter().enumerate() {
            let ssrc = call as u32;
            a.send_to(&build_rtp(seq, 0, ssrc, 160), relay_addr(ports.caller.rtp))
                .await
                .unwrap();
            b.send_to(
                &build_rtp(seq, 0, 100 + ssrc, 160),
                relay_addr(ports.callee.rtp),
            )
            .await
            .unwrap();
        }
        // About 8 packets per 100 us: dense for a 5 ms wait.
        if seq % 4 == 0 {
            tokio::time::sleep(Duration::from_micros(100)).await;
        }
    }
    for (call, (id, ports, a, b)) in legs.iter().enumerate() {
        let ssrc = call as u32;
        for seq in 0..n {
            let (got, from) = recv(b).await;
            assert_eq!(
                u16::from_be_bytes([got[2], got[3]]),
                seq,
                "call {call}, to B"
            );
            assert_eq!(u32::from_be_bytes([got[8], got[9], got[10], got[11]]), ssrc);
            assert_eq!(from, relay_addr(ports.callee.rtp));
            let (got, from) = recv(a).await;
            assert_eq!(
                u16::from_be_bytes([got[2], got[3]]),
                seq,
                "call {call}, to A"
            );
            assert_eq!(
                u32::from_be_bytes([got[8], got[9], got[10], got[11]]),
                100 + ssrc
            );
            assert_eq!(from, relay_addr(ports.caller.rtp));
        }
        let s = relay.query(*id).await.unwrap();
        assert_eq!((s.caller.pkts, s.callee.pkts), (u64::from(n), u64::from(n)));
    }
    relay.shutdown().await;
}

#[tokio::test]
async fn streams_are_kept_apart_and_disabled_streams_drop() {
    let (relay, _events) = start(config(21600, 21699)).unwrap();
    let alloc = relay.allocate("two m-lines".into(), 2).await.unwrap();
    let (audio, video) = (alloc.streams[0], alloc.streams[1]);
    let (a_audio, b_audio, b_video) = (socket().await, socket().await, socket().await);
    let ep = |s: &UdpSocket| {
        let addr = s.local_addr().unwrap();
        endpoint(addr, addr)
    };
    relay
        .update(
            alloc.id,
            Side::Caller,
            vec![Some(ep(&a_audio)), None],
            vec![],
            false,
        )
        .await
        .unwrap();
    relay
        .update(
            alloc.id,
            Side::Callee,
            vec![Some(ep(&b_audio)), Some(ep(&b_video))],
            vec![],
            true,
        )
        .await
        .unwrap();
    // Video was disabled by the caller: the callee's video goes nowhere.
    b_video
        .send_to(&build_rtp(1, 0, 2, 100), relay_addr(video.callee.rtp))
        .await
        .unwrap();
    let p = build_rtp(1, 0, 1, 160);
    a_audio
        .send_to(&p, relay_addr(audio.caller.rtp))
        .await
        .unwrap();
    let (got, from) = recv(&b_audio).await;
    assert_eq!((got, from), (p, relay_addr(audio.callee.rtp)));
    // Received from the callee (counted), not forwarded (dropped).
    wait_stats(&relay, alloc.id, |s| s.callee.dropped == 1).await;
    let s = relay.query(alloc.id).await.unwrap();
    assert_eq!((s.caller.pkts, s.callee.pkts, s.callee.dropped), (1, 1, 1));
    assert!(matches!(
        relay
            .update(
                alloc.id,
                Side::Caller,
                vec![Some(ep(&a_audio))],
                vec![],
                true
            )
            .await,
        Err(RelayError::StreamCount)
    ));
    assert!(matches!(
        relay.allocate("none".into(), 0).await,
        Err(RelayError::StreamCount)
    ));
    relay.shutdown().await;
}

#[tokio::test]
async fn offer_timeout_closes_an_unanswered_session() {
    let (relay, mut events) = start(RelayConfig {
        offer_timeout: Duration::from_millis(300),
        ..config(21800, 21899)
    })
    .unwrap();
    let t0 = Instant::now();
    let alloc = relay.allocate("never-answered".into(), 1).await.unwrap();
    let c = next_closed(&mut events).await;
    assert!(t0.elapsed() >= Duration::from_millis(300));
    assert_eq!((c.id, c.reason), (alloc.id, CloseReason::Offer));
    assert_eq!(c.label, "never-answered");
    assert_nothing_left(&relay).await;
    // The ports are closed too.
    std::net::UdpSocket::bind(relay_addr(alloc.streams[0].caller.rtp)).unwrap();
    assert!(matches!(
        relay.delete(alloc.id).await,
        Err(RelayError::NoSuchSession)
    ));
    relay.shutdown().await;
}

#[tokio::test]
async fn idle_and_hold_timeouts() {
    let (relay, mut events) = start(RelayConfig {
        idle_timeout: Duration::from_millis(300),
        hold_timeout: Duration::from_millis(900),
        ..config(22000, 22099)
    })
    .unwrap();
    let (a, b) = (socket().await, socket().await);
    let ep = |s: &UdpSocket, direction| Endpoint {
        direction,
        ..endpoint(s.local_addr().unwrap(), s.local_addr().unwrap())
    };

    // Answered, one packet, then silence: idle.
    let idle = relay.allocate("idle".into(), 1).await.unwrap();
    sdp(
        &relay,
        idle.id,
        Side::Caller,
        ep(&a, Direction::SendRecv),
        false,
    )
    .await;
    sdp(
        &relay,
        idle.id,
        Side::Callee,
        ep(&b, Direction::SendRecv),
        true,
    )
    .await;
    let t0 = Instant::now();
    a.send_to(
        &build_rtp(1, 0, 1, 160),
        relay_addr(idle.streams[0].caller.rtp),
    )
    .await
    .unwrap();
    recv(&b).await;
    let c = next_closed(&mut events).await;
    assert!(t0.elapsed() >= Duration::from_millis(300));
    assert_eq!((c.id, c.reason), (idle.id, CloseReason::Idle));
    assert_eq!(c.stats.caller.pkts, 1);

    // Put on hold by the callee (sendonly): the longer hold timeout applies.
    let held = relay.allocate("held".into(), 1).await.unwrap();
    sdp(
        &relay,
        held.id,
        Side::Caller,
        ep(&a, Direction::SendRecv),
        false,
    )
    .await;
    let t0 = Instant::now();
    sdp(
        &relay,
        held.id,
        Side::Callee,
        ep(&b, Direction::SendOnly),
        true,
    )
    .await;
    let c = next_closed(&mut events).await;
    assert!(
        t0.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!((c.id, c.reason), (held.id, CloseReason::Hold));
    assert_nothing_left(&relay).await;
    relay.shutdown().await;
}

#[tokio::test]
async fn exhaustion_and_a_port_held_elsewhere() {
    // Three pairs: 22200/1, 22202/3, 22204/5. The test holds 22203, an RTCP port.
    let blocker = std::net::UdpSocket::bind(relay_addr(22203)).unwrap();
    let (relay, _events) = start(config(22200, 22205)).unwrap();
    // One stream needs two pairs: the two that can be bound.
    let alloc = relay.allocate("a".into(), 1).await.unwrap();
    let s = alloc.streams[0];
    assert!(![s.caller.rtp, s.callee.rtp].contains(&22202));
    // The last free pair is the blocked one.
    assert!(matches!(
        relay.allocate("b".into(), 1).await,
        Err(RelayError::PortsExhausted)
    ));
    assert_eq!(in_use(relay.counts().await), (1, 4));
    relay.delete(alloc.id).await.unwrap();
    assert_nothing_left(&relay).await;
    // Now two free pairs can be bound again.
    let again = relay.allocate("c".into(), 1).await.unwrap();
    let s = again.streams[0];
    assert!(![s.caller.rtp, s.callee.rtp].contains(&22202));
    // More streams than the range can ever hold.
    assert!(matches!(
        relay.allocate("d".into(), 2).await,
        Err(RelayError::PortsExhausted)
    ));
    drop(blocker);
    relay.shutdown().await;
}

#[tokio::test]
async fn relatch_after_reinvite_with_a_new_port() {
    let (relay, _events) = start(config(22400, 22499)).unwrap();
    let alloc = relay.allocate("reinvite".into(), 1).await.unwrap();
    let ports = alloc.streams[0];
    let (a1, a2, b) = (socket().await, socket().await, socket().await);
    let ep = |s: &UdpSocket| endpoint(s.local_addr().unwrap(), s.local_addr().unwrap());
    relay
        .update(alloc.id, Side::Caller, vec![Some(ep(&a1))], vec![], false)
        .await
        .unwrap();
    relay
        .update(alloc.id, Side::Callee, vec![Some(ep(&b))], vec![], true)
        .await
        .unwrap();
    let p = build_rtp(1, 0, 1, 160);
    a1.send_to(&p, relay_addr(ports.caller.rtp)).await.unwrap();
    recv(&b).await;
    // The caller moves to a new port; before its re-INVITE the new source is a stranger.
    a2.send_to(&build_rtp(2, 160, 1, 160), relay_addr(ports.caller.rtp))
        .await
        .unwrap();
    wait_stats(&relay, alloc.id, |s| s.caller.dropped == 1).await;
    relay
        .update(alloc.id, Side::Caller, vec![Some(ep(&a2))], vec![], true)
        .await
        .unwrap();
    let p3 = build_rtp(3, 320, 1, 160);
    a2.send_to(&p3, relay_addr(ports.caller.rtp)).await.unwrap();
    assert_eq!(
        recv(&b).await.0,
        p3,
        "packet 2 was dropped, packet 3 re-latched"
    );
    // The callee's media follows the caller to its new port.
    let q = build_rtp(1, 0, 2, 160);
    b.send_to(&q, relay_addr(ports.callee.rtp)).await.unwrap();
    assert_eq!(recv(&a2).await, (q, relay_addr(ports.caller.rtp)));
    let s = relay.query(alloc.id).await.unwrap();
    assert_eq!((s.caller.pkts, s.caller.dropped, s.caller.lost), (2, 1, 1));
    relay.shutdown().await;
}

/// issue #10 item 5: a host that never signalled sprays every port of a call (RTP and RTCP,
/// before and after the parties latch). It receives nothing, none of its packets reach a
/// party, and the real media flows unaffected. 127.0.0.2 is on Linux's loopback.
#[tokio::test]
async fn a_sprayer_from_another_address_gets_nothing_and_hijacks_nothing() {
    let (relay, _events) = start(config(23000, 23099)).unwrap();
    let alloc = relay.allocate("spray".into(), 1).await.unwrap();
    let ports = alloc.streams[0];
    let (a, b) = (socket().await, socket().await);
    let sprayer = UdpSocket::bind(("127.0.0.2", 0)).await.unwrap();
    let ep = |s: &UdpSocket| {
        let rtp = s.local_addr().unwrap();
        endpoint(rtp, SocketAddr::new(rtp.ip(), rtp.port() + 1))
    };
    relay
        .update(
            alloc.id,
            Side::Caller,
            vec![Some(ep(&a))],
            vec![LOCALHOST],
            false,
        )
        .await
        .unwrap();
    relay
        .update(
            alloc.id,
            Side::Callee,
            vec![Some(ep(&b))],
            vec![LOCALHOST],
            true,
        )
        .await
        .unwrap();
    let spray = |round: u16| {
        let sprayer = &sprayer;
        async move {
            for port in [ports.caller.rtp, ports.callee.rtp] {
                let p = build_rtp(1000 + round, 0, 0xbad, 160);
                sprayer.send_to(&p, relay_addr(port)).await.unwrap();
                let rr = build_rtcp_rr(0xbad);
                sprayer.send_to(&rr, relay_addr(port + 1)).await.unwrap();
            }
        }
    };
    // First, before either party has sent anything: the old "first packet latches" hole.
    spray(0).await;
    wait_stats(&relay, alloc.id, |s| {
        s.caller.strangers == 2 && s.callee.strangers == 2
    })
    .await;
    let pa = build_rtp(1, 0, 0xa, 160);
    a.send_to(&pa, relay_addr(ports.caller.rtp)).await.unwrap();
    assert_eq!(recv(&b).await, (pa, relay_addr(ports.callee.rtp)));
    let pb = build_rtp(1, 0, 0xb, 160);
    b.send_to(&pb, relay_addr(ports.callee.rtp)).await.unwrap();
    assert_eq!(recv(&a).await, (pb, relay_addr(ports.caller.rtp)));
    // Again during the call, and inside the re-latch window of a new SDP.
    relay
        .update(
            alloc.id,
            Side::Caller,
            vec![Some(ep(&a))],
            vec![LOCALHOST],
            true,
        )
        .await
        .unwrap();
    spray(1).await;
    wait_stats(&relay, alloc.id, |s| {
        s.caller.strangers == 4 && s.callee.strangers == 4
    })
    .await;
    // The parties' next packets are the next ones each receives: nothing of the sprayer's
    // was queued before them.
    let pa2 = build_rtp(2, 160, 0xa, 160);
    a.send_to(&pa2, relay_addr(ports.caller.rtp)).await.unwrap();
    assert_eq!(recv(&b).await.0, pa2);
    let pb2 = build_rtp(2, 160, 0xb, 160);
    b.send_to(&pb2, relay_addr(ports.callee.rtp)).await.unwrap();
    assert_eq!(recv(&a).await.0, pb2);
    // Every send for the sprayer's packets would have happened before the stats above.
    let mut buf = [0u8; 2048];
    assert_eq!(
        sprayer.try_recv_from(&mut buf).map_err(|e| e.kind()),
        Err(std::io::ErrorKind::WouldBlock),
        "the sprayer received something"
    );
    let s = relay.query(alloc.id).await.unwrap();
    assert_eq!((s.caller.pkts, s.callee.pkts), (2, 2));
    assert_eq!((s.caller.dropped, s.callee.dropped), (4, 4));
    assert_eq!(relay.counts().await.strangers, 8);
    relay.shutdown().await;
}

#[tokio::test]
async fn shutdown_closes_everything_and_stops_the_handle() {
    let (relay, mut events) = start(config(22600, 22699)).unwrap();
    let a = relay.allocate("x".into(), 1).await.unwrap();
    let b = relay.allocate("y".into(), 3).await.unwrap();
    let clone: RelayHandle = relay.clone();
    let mut closed = clone.shutdown().await;
    closed.sort_by_key(|c| c.id);
    assert_eq!(closed.len(), 2);
    assert_eq!((closed[0].id, closed[1].id), (a.id, b.id));
    assert!(closed.iter().all(|c| c.reason == CloseReason::Shutdown));
    assert!(matches!(
        relay.allocate("z".into(), 1).await,
        Err(RelayError::Stopped)
    ));
    assert_nothing_left(&relay).await;
    assert!(relay.shutdown().await.is_empty());
    // The event channel ends.
    assert!(timeout(WAIT, events.recv()).await.unwrap().is_none());
    std::net::UdpSocket::bind(relay_addr(b.streams[2].callee.rtcp)).unwrap();
}

/// `start` needs no runtime of its own caller.
#[test]
fn start_from_a_plain_thread() {
    let (relay, _events) = start(config(22800, 22899)).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let a = relay.allocate("plain".into(), 1).await.unwrap();
        assert_eq!(relay.counts().await.sessions, 1);
        relay.delete(a.id).await.unwrap();
        relay.shutdown().await;
    });
}

#[test]
fn invalid_ranges_are_refused() {
    for (min, max) in [(30001, 30010), (30000, 30000), (30010, 30000), (0, 10)] {
        let err = start(config(min, max)).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput, "{min}-{max}");
    }
}

/// `open` allocates and sets the first side's SDP in one request, closes the session it
/// replaces before taking ports, and leaves nothing behind when it fails.
#[tokio::test]
async fn open_allocates_with_the_first_sdp_and_replaces() {
    // Four pairs: two one-stream sessions.
    let (relay, _events) = start(config(23200, 23207)).unwrap();
    let (caller, callee) = (socket().await, socket().await);
    let caller_ep = endpoint(caller.local_addr().unwrap(), relay_addr(9));
    let open = |replace, ep: Endpoint| sipedge_relay::Open {
        label: "open@test".into(),
        replace,
        side: Side::Caller,
        streams: vec![Some(ep)],
        sources: vec![LOCALHOST],
        answered: false,
    };
    let a = relay.open(open(None, caller_ep)).await.unwrap();
    let ports = a.streams[0];
    sdp(
        &relay,
        a.id,
        Side::Callee,
        endpoint(callee.local_addr().unwrap(), relay_addr(9)),
        true,
    )
    .await;
    // The callee's packet reaches the caller's SDP address: `open` set it.
    let p = build_rtp(1, 160, 0xcafe, 160);
    callee
        .send_to(&p, relay_addr(ports.callee.rtp))
        .await
        .unwrap();
    let (got, from) = recv(&caller).await;
    assert_eq!(got, p);
    assert_eq!(from, relay_addr(ports.caller.rtp));

    // The range is full after a second session; a third replacing the first fits.
    let b = relay.open(open(None, caller_ep)).await.unwrap();
    assert!(matches!(
        relay.open(open(None, caller_ep)).await,
        Err(RelayError::PortsExhausted)
    ));
    let c = relay.open(open(Some(a.id), caller_ep)).await.unwrap();
    assert!(matches!(
        relay.query(a.id).await,
        Err(RelayError::NoSuchSession)
    ));
    assert_eq!(relay.counts().await.sessions, 2);
    // No streams: refused, and no session is left behind.
    let empty = sipedge_relay::Open {
        streams: vec![],
        ..open(None, caller_ep)
    };
    assert!(matches!(
        relay.open(empty).await,
        Err(RelayError::StreamCount)
    ));
    assert_eq!(relay.counts().await.sessions, 2);
    relay.delete(b.id).await.unwrap();
    relay.delete(c.id).await.unwrap();
    assert_nothing_left(&relay).await;
    relay.shutdown().await;
}

/// Sessions and ports in use (the other counts are totals since start).
fn in_use(c: Counts) -> (usize, usize) {
    (c.sessions, c.ports_in_use)
}

/// No session and no port left allocated.
async fn assert_nothing_left(relay: &RelayHandle) {
    assert_eq!(
        in_use(relay.counts().await),
        (0, 0),
        "nothing left allocated"
    );
}

/// Requests about a session go to its worker (named by the id): with two workers, every
/// session of a batch is updated, queried and deleted, and an id nobody allocated is unknown
/// to whichever worker it names.
#[tokio::test]
async fn every_request_reaches_the_worker_that_owns_the_session() {
    let (relay, _events) = start(config(23300, 23399)).unwrap();
    let peer = socket().await;
    let ep = endpoint(peer.local_addr().unwrap(), relay_addr(9));
    let mut ids = Vec::new();
    for i in 0..6 {
        ids.push(relay.allocate(format!("s{i}"), 1).await.unwrap().id);
    }
    assert_eq!(in_use(relay.counts().await), (6, 24));
    for &id in &ids {
        relay
            .update(id, Side::Caller, vec![Some(ep)], vec![LOCALHOST], true)
            .await
            .unwrap();
        relay.query(id).await.unwrap();
    }
    for &id in &ids {
        relay.delete(id).await.unwrap();
        assert!(matches!(
            relay.query(id).await,
            Err(RelayError::NoSuchSession)
        ));
    }
    for unknown in [SessionId(1_000_000), SessionId(1_000_001)] {
        assert!(matches!(
            relay.delete(unknown).await,
            Err(RelayError::NoSuchSession)
        ));
        assert!(matches!(
            relay
                .update(unknown, Side::Callee, vec![None], vec![], false)
                .await,
            Err(RelayError::NoSuchSession)
        ));
    }
    assert_nothing_left(&relay).await;
    relay.shutdown().await;
}

/// Offers arriving together are spread over the workers: each is counted against its worker
/// when it is handed over, not when the worker gets to it. (A session id names its worker:
/// `id % workers`.)
#[tokio::test]
async fn a_burst_of_new_sessions_is_spread_over_the_workers() {
    let (relay, _events) = start(config(23400, 23499)).unwrap();
    let (a, b, c, d) = tokio::join!(
        relay.allocate("a".into(), 1),
        relay.allocate("b".into(), 1),
        relay.allocate("c".into(), 1),
        relay.allocate("d".into(), 1),
    );
    let ids = [a, b, c, d].map(|r| r.unwrap().id.0);
    let on_first = ids.iter().filter(|&&id| id % 2 == 0).count();
    assert_eq!(on_first, 2, "ids {ids:?}: two sessions per worker");
    relay.shutdown().await;
}

/// Requests queued without waking the worker (`update_later`, `delete_later`) take effect
/// before the next datagram is forwarded: the callee's SDP, queued quietly, is known when
/// the caller's first packet wakes the worker. A dropped `delete_later` still closes its
/// session, within the worker's bounded wait, and one for a worker without sessions (waiting
/// without bound) still wakes it; after a shutdown both report `Stopped`.
#[tokio::test]
async fn quiet_requests_take_effect_before_the_next_datagram() {
    let (relay, _events) = start(config(23500, 23599)).unwrap();
    let alloc = relay.allocate("quiet".into(), 1).await.unwrap();
    let ports = alloc.streams[0];
    let (caller, callee) = (socket().await, socket().await);
    let caller_sdp = endpoint(caller.local_addr().unwrap(), relay_addr(9));
    let callee_sdp = endpoint(callee.local_addr().unwrap(), relay_addr(9));
    sdp(&relay, alloc.id, Side::Caller, caller_sdp, false).await;
    relay
        .update_later(alloc.id, Side::Callee, vec![Some(callee_sdp)], vec![], true)
        .unwrap();
    let p = build_rtp(1, 160, 0xbeef, 160);
    caller
        .send_to(&p, relay_addr(ports.caller.rtp))
        .await
        .unwrap();
    let (got, from) = recv(&callee).await;
    assert_eq!((got, from), (p, relay_addr(ports.callee.rtp)));

    let stats = relay.delete_later(alloc.id).await.unwrap();
    assert_eq!((stats.caller.pkts, stats.callee.pkts), (1, 0));
    assert_nothing_left(&relay).await;

    // Unknown to its worker: nothing to report, nothing breaks.
    relay
        .update_later(
            SessionId(1_000_000),
            Side::Callee,
            vec![None],
            vec![],
            false,
        )
        .unwrap();
    let gone = relay.allocate("dropped".into(), 1).await.unwrap();
    drop(relay.delete_later(gone.id));
    let deadline = Instant::now() + WAIT;
    while in_use(relay.counts().await) != (0, 0) {
        assert!(
            Instant::now() < deadline,
            "a dropped delete_later closes its session"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // A worker left without sessions waits without bound: a quiet request still wakes it.
    let closed = relay.allocate("closed".into(), 1).await.unwrap();
    relay.delete(closed.id).await.unwrap();
    // Let it go back to its wait (were it still awake, it would see the request anyway: this
    // pause can only make the check stricter, never pass a broken worker).
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(matches!(
        timeout(WAIT, relay.delete_later(closed.id))
            .await
            .expect("answered although the worker has no session"),
        Err(RelayError::NoSuchSession)
    ));

    relay.shutdown().await;
    assert!(matches!(
        relay.update_later(alloc.id, Side::Caller, vec![None], vec![], false),
        Err(RelayError::Stopped)
    ));
    assert!(matches!(
        relay.delete_later(alloc.id).await,
        Err(RelayError::Stopped)
    ));
}
