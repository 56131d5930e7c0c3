//! Throughput of the pure relay core: `Relay::on_packet` on 172-byte RTP packets (G.711,
//! 20 ms: 12-byte header + 160 bytes) spread round-robin over N answered, latched streams,
//! both directions. No sockets: this is the per-packet CPU cost the workers add to the
//! syscalls.
//!
//! Run with `cargo bench -p sipedge-relay --bench forward`.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use sipedge_relay::sans_io::{Relay, Timeouts, Verdict, build_rtp};
use sipedge_relay::{Direction, Endpoint, PortPair, SessionId, Side, StreamPorts};
use tokio::time::Instant;

const PORT_MIN: u16 = 20000;
const PACKETS: u64 = 5_000_000;

fn endpoint(host: u8, port: u16) -> Endpoint {
    let ip = IpAddr::V4(Ipv4Addr::new(192, 0, 2, host));
    Endpoint {
        rtp: SocketAddr::new(ip, port),
        rtcp: SocketAddr::new(ip, port + 1),
        rtcp_mux: false,
        direction: Direction::SendRecv,
        clock_rate: 8000,
    }
}

/// One packet source: the local port it arrives on, its address and its packet.
struct Source {
    port: u16,
    src: SocketAddr,
    pkt: Vec<u8>,
    seq: u16,
}

fn setup(streams: usize, t0: Instant) -> (Relay, Vec<Source>) {
    let pairs = u16::try_from(streams * 2).expect("streams fit the port range");
    let mut relay = Relay::new(
        PORT_MIN,
        pairs,
        Timeouts {
            idle: Duration::from_secs(3600),
            offer: Duration::from_secs(3600),
            hold: Duration::from_secs(3600),
        },
    );
    let mut sources = Vec::with_capacity(streams * 2);
    for s in 0..streams {
        let caller = PORT_MIN + 4 * s as u16;
        let callee = caller + 2;
        let id = SessionId(s as u64);
        relay
            .add_session(
                t0,
                id,
                format!("bench-{s}"),
                &[StreamPorts {
                    caller: PortPair {
                        rtp: caller,
                        rtcp: caller + 1,
                    },
                    callee: PortPair {
                        rtp: callee,
                        rtcp: callee + 1,
                    },
                }],
            )
            .expect("session");
        let a = endpoint(1, 10_000 + 2 * (s % 20_000) as u16);
        let b = endpoint(2, 10_000 + 2 * (s % 20_000) as u16);
        relay
            .update(t0, id, Side::Caller, &[Some(a)], &[], false)
            .expect("update");
        relay
            .update(t0, id, Side::Callee, &[Some(b)], &[], true)
            .expect("update");
        for (port, from) in [(caller, a), (callee, b)] {
            sources.push(Source {
                port,
                src: from.rtp,
                pkt: build_rtp(0, 0, 0x1000 + s as u32, 160),
                seq: 0,
            });
        }
    }
    (relay, sources)
}

/// Forwards `packets` packets over `streams` streams; returns the elapsed wall time.
fn run(streams: usize, packets: u64) -> Duration {
    let t0 = Instant::now();
    let (mut relay, mut sources) = setup(streams, t0);
    let mut forwarded = 0u64;
    let start = Instant::now();
    for i in 0..packets {
        let n = sources.len();
        let s = &mut sources[(i as usize) % n];
        s.seq = s.seq.wrapping_add(1);
        s.pkt[2..4].copy_from_slice(&s.seq.to_be_bytes());
        let ts = u32::from(s.seq) * 160;
        s.pkt[4..8].copy_from_slice(&ts.to_be_bytes());
        // Virtual arrival time: one packet per 20 ms per source.
        let now = t0 + Duration::from_millis(20 * (i / n as u64));
        if let Verdict::Forward { .. } = relay.on_packet(now, s.port, s.src, black_box(&s.pkt)) {
            forwarded += 1;
        }
    }
    let elapsed = start.elapsed();
    assert_eq!(forwarded, packets, "every packet is forwarded");
    elapsed
}

fn main() {
    // Warm-up: page in the code and let the CPU clock settle.
    run(100, PACKETS / 5);
    for streams in [1, 100, 1000, 10_000] {
        let elapsed = run(streams, PACKETS);
        let pps = PACKETS as f64 / elapsed.as_secs_f64();
        println!(
            "on_packet, {streams:>6} streams: {:>6.1} M packets/s ({:.1} ns/packet)",
            pps / 1e6,
            elapsed.as_nanos() as f64 / PACKETS as f64
        );
    }
}
