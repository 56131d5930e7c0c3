//! The relay as a benchmark target for the shared media harness (`scripts/bench/media.sh`,
//! `scripts/bench/media_target.py`): starts the relay on 127.0.0.1 and sets up calls on request,
//! with the same stream shape as the harness' rtpengine target (A -> RA -> B, B -> RB -> A).
//!
//! ```text
//! cargo run --release -p sipedge-relay --example bench_target -- [--ports 40000-47999] [--workers 1] [--batch-wait-us 250]
//! ```
//!
//! Prints `ready PID` once the relay runs, then reads one command per line on stdin and answers
//! one line on stdout (`ERR <reason>` on failure):
//!
//! - `alloc PA PB`: allocates a one-stream session; the caller is 127.0.0.1:PA, the callee
//!   127.0.0.1:PB (RTCP on port + 1, no rtcp-mux: what the harness' SDP says); answers `RA RB`,
//!   the caller-facing RTP port (where A sends) and the callee-facing one (where B sends).
//! - `counts`: `sessions=N ports=M`.
//! - `stats`: one line per session, `ID caller_pkts callee_pkts caller_dropped callee_dropped`
//!   (packets received from that side and forwarded, and not forwarded), then
//!   `total sessions=N caller_pkts=.. callee_pkts=.. dropped=..`.
//! - `quit` (or end of input): shuts the relay down, answers `bye N` (sessions closed), exits.
//!
//! Timeouts are an hour, so that no session closes during a benchmark. Everything runs on the
//! relay's own threads; this thread only drives the control API with a current-thread runtime.

use std::io::{BufRead, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::time::Duration;

use sipedge_relay::{
    Direction, Endpoint, IoMode, RelayConfig, RelayHandle, SessionId, Side, start,
};

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const LONG: Duration = Duration::from_secs(3600);

/// `--ports MIN-MAX`, `--workers N` and `--batch-wait-us N` (0: no wake-up coalescing);
/// anything else is an error.
fn parse_args() -> Result<RelayConfig, String> {
    let mut cfg = RelayConfig {
        bind: LOCALHOST,
        port_min: 40000,
        port_max: 47999,
        // One worker by default: the harness pins the relay to one core and compares per core.
        workers: 1,
        idle_timeout: LONG,
        offer_timeout: LONG,
        hold_timeout: LONG,
        io: IoMode::Batched,
        batch_wait: sipedge_relay::DEFAULT_BATCH_WAIT,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--ports" => {
                let (lo, hi) = value.split_once('-').ok_or("--ports MIN-MAX")?;
                cfg.port_min = lo.parse().map_err(|e| format!("--ports: {e}"))?;
                cfg.port_max = hi.parse().map_err(|e| format!("--ports: {e}"))?;
            }
            "--workers" => cfg.workers = value.parse().map_err(|e| format!("--workers: {e}"))?,
            "--batch-wait-us" => {
                let us = value.parse().map_err(|e| format!("--batch-wait-us: {e}"))?;
                cfg.batch_wait = Duration::from_micros(us);
            }
            _ => {
                return Err(format!(
                    "unknown flag {flag} (--ports MIN-MAX, --workers N, --batch-wait-us N)"
                ));
            }
        }
    }
    Ok(cfg)
}

/// What the harness' SDP for an endpoint on `port` says: RTP there, RTCP on the next port.
fn endpoint(port: u16) -> Endpoint {
    Endpoint {
        rtp: SocketAddr::new(LOCALHOST, port),
        rtcp: SocketAddr::new(LOCALHOST, port.wrapping_add(1)),
        rtcp_mux: false,
        direction: Direction::SendRecv,
        clock_rate: 8000,
    }
}

/// `alloc PA PB`: offer from A (the caller), answer from B (the callee), like the harness'
/// ng offer/answer for rtpengine. Returns the line to print.
async fn alloc(relay: &RelayHandle, sessions: &mut Vec<SessionId>, args: &[&str]) -> String {
    let ports: Vec<u16> = args.iter().filter_map(|a| a.parse().ok()).collect();
    let [pa, pb] = ports[..] else {
        return "ERR usage: alloc PA PB".into();
    };
    let label = format!("bench-{}", sessions.len());
    let a = match relay.allocate(label, 1).await {
        Ok(a) => a,
        Err(e) => return format!("ERR {e}"),
    };
    let offer = relay.update(a.id, Side::Caller, vec![Some(endpoint(pa))], vec![], false);
    if let Err(e) = offer.await {
        return format!("ERR {e}");
    }
    let answer = relay.update(a.id, Side::Callee, vec![Some(endpoint(pb))], vec![], true);
    if let Err(e) = answer.await {
        return format!("ERR {e}");
    }
    sessions.push(a.id);
    // invariant: allocate(_, 1) returns exactly one stream
    let s = a.streams[0];
    format!("{} {}", s.caller.rtp, s.callee.rtp)
}

/// `stats`: per-session lines, then the total.
async fn stats(
    relay: &RelayHandle,
    sessions: &[SessionId],
    out: &mut impl Write,
) -> std::io::Result<()> {
    let (mut caller, mut callee, mut dropped) = (0u64, 0u64, 0u64);
    for &id in sessions {
        match relay.query(id).await {
            Ok(s) => {
                writeln!(
                    out,
                    "{id} {} {} {} {}",
                    s.caller.pkts, s.callee.pkts, s.caller.dropped, s.callee.dropped
                )?;
                caller += s.caller.pkts;
                callee += s.callee.pkts;
                dropped += s.caller.dropped + s.callee.dropped;
            }
            Err(e) => writeln!(out, "{id} ERR {e}")?,
        }
    }
    writeln!(
        out,
        "total sessions={} caller_pkts={caller} callee_pkts={callee} dropped={dropped}",
        sessions.len()
    )
}

fn main() -> ExitCode {
    let cfg = match parse_args() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("bench_target: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bench_target: runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Timeouts are an hour: the event channel stays silent, it is only kept open.
    let (relay, _closed) = match start(cfg) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("bench_target: relay: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut sessions = Vec::new();
    let mut out = std::io::stdout().lock();
    let r = rt.block_on(async {
        // All relay threads exist now, so `taskset -a -p` on this PID pins every one of them.
        writeln!(out, "ready {}", std::process::id())?;
        out.flush()?;
        for line in std::io::stdin().lock().lines() {
            let line = line?;
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.first().copied() {
                Some("alloc") => {
                    writeln!(out, "{}", alloc(&relay, &mut sessions, &words[1..]).await)?
                }
                Some("counts") => {
                    let c = relay.counts().await;
                    writeln!(out, "sessions={} ports={}", c.sessions, c.ports_in_use)?;
                }
                Some("stats") => stats(&relay, &sessions, &mut out).await?,
                Some("quit") => break,
                None => continue,
                Some(other) => writeln!(out, "ERR unknown command {other}")?,
            }
            out.flush()?;
        }
        let closed = relay.shutdown().await;
        writeln!(out, "bye {}", closed.len())?;
        out.flush()
    });
    match r {
        Ok(()) => ExitCode::SUCCESS,
        // A closed stdout (the harness went away) ends the process like `quit`, minus the answer.
        Err(e) => {
            rt.block_on(relay.shutdown());
            eprintln!("bench_target: {e}");
            ExitCode::FAILURE
        }
    }
}
