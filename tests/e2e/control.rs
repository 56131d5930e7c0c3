//! The loopback control endpoint over a real TCP connection, during a relayed call: the
//! registration, the call with its relay ports and live packet counts, transactions, the
//! counters (JSON and OpenMetrics text), the CDR of the call once it ended, the web page, and
//! `sipedge show` (the binary) printing the same tables.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use crate::harness::{TestServer, Ua};
use crate::media::{answer, in_dialog, invite, routes_of, rtp, sdp, sdp_of, server};

/// One HTTP/1.1 request; (status, content type, body).
async fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .expect("the endpoint answers in time")
        .unwrap();
    let text = String::from_utf8(buf).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("a header block");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let ctype = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type: ")
                .map(str::to_owned)
        })
        .unwrap_or_default();
    (status, ctype, body.to_owned())
}

async fn json(addr: SocketAddr, path: &str) -> Value {
    let (status, ctype, body) = http(addr, "GET", path).await;
    assert_eq!(
        (status, ctype.as_str()),
        (200, "application/json"),
        "{path}: {body}"
    );
    serde_json::from_str(&body).unwrap()
}

/// `sipedge show WHAT --control ADDR`, its standard output.
fn show(addr: SocketAddr, what: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_sipedge"))
        .env_remove("SIPEDGE_CONFIG")
        .args(["show", what, "--control", &addr.to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_registrations_calls_and_metrics_during_a_relayed_call() {
    let (alice, bob) = (Ua::new().await, Ua::new().await);
    let (alice_rtp, bob_rtp) = (
        UdpSocket::bind("127.0.0.1:0").await.unwrap(),
        UdpSocket::bind("127.0.0.1:0").await.unwrap(),
    );
    let srv: TestServer = server("42100-42149", bob.addr).await;
    let c = srv.control;

    // The registration, as JSON and as `sipedge show registrations`.
    let regs = json(c, "/api/registrations").await;
    assert_eq!(regs.as_array().unwrap().len(), 1, "{regs}");
    assert_eq!(regs[0]["aor"], "bob@example.com");
    assert_eq!(regs[0]["received"], bob.addr.to_string());
    assert_eq!(regs[0]["transport"], "udp");
    let table = show(c, "registrations");
    assert!(table.starts_with("AOR"), "{table}");
    assert!(
        table.contains("bob@example.com") && table.contains(&bob.addr.to_string()),
        "{table}"
    );

    // A call, answered, with RTP from the caller.
    let a_port = alice_rtp.local_addr().unwrap().port();
    alice
        .send(srv.udp, &invite(alice.addr, "ctl1", a_port))
        .await;
    let (inv, from) = bob.recv().await;
    let b_port = bob_rtp.local_addr().unwrap().port();
    bob.sock
        .send_to(&answer(&inv, from, bob.addr, 200, Some(&sdp(b_port))), from)
        .await
        .unwrap();
    let (ok, _) = alice.recv().await;
    assert_eq!(ok.status(), Some(200));
    let routes = routes_of(&ok);
    alice
        .send(
            srv.udp,
            &in_dialog("ACK", 1, alice.addr, bob.addr, "ctl1", &routes),
        )
        .await;
    bob.recv().await;
    let (_, to_alice, _) = sdp_of(&ok);
    let relay_a: SocketAddr = format!("127.0.0.1:{to_alice}").parse().unwrap();
    for seq in 0..10u16 {
        alice_rtp.send_to(&rtp(seq, 7), relay_a).await.unwrap();
    }
    let mut buf = [0u8; 2048];
    for _ in 0..10 {
        tokio::time::timeout(Duration::from_secs(5), bob_rtp.recv_from(&mut buf))
            .await
            .expect("relayed RTP")
            .unwrap();
    }

    let calls = json(c, "/api/calls").await;
    let call = &calls[0];
    assert_eq!(call["call_id"], "ctl1", "{calls}");
    assert_eq!(call["state"], "confirmed");
    assert_eq!(call["ports"][0][0], u64::from(to_alice));
    assert_eq!(call["from_caller"]["packets"], 10, "{calls}");
    let table = show(c, "calls");
    assert!(
        table.contains("ctl1") && table.contains("confirmed"),
        "{table}"
    );
    assert!(table.contains(&format!("{to_alice}/")), "{table}");

    // Counters, as OpenMetrics text and as JSON.
    let (status, ctype, text) = http(c, "GET", "/metrics").await;
    assert_eq!(status, 200);
    assert!(ctype.starts_with("application/openmetrics-text"), "{ctype}");
    assert!(text.contains("\nsipedge_media_calls 1\n"), "{text}");
    assert!(text.contains("\nsipedge_registrar_bindings 1\n"), "{text}");
    assert!(text.contains("sipedge_relay_ports_in_use "), "{text}");
    assert!(text.ends_with("# EOF\n"));
    let stats = json(c, "/api/stats").await;
    assert_eq!(stats["media_calls"], 1, "{stats}");
    assert!(show(c, "stats").contains("registrar_bindings"));
    let txns = json(c, "/api/transactions").await;
    assert!(txns["server"].is_u64(), "{txns}");

    // Read-only: other methods are refused, unknown paths are 404, the page is HTML.
    assert_eq!(http(c, "POST", "/api/calls").await.0, 405);
    assert_eq!(http(c, "GET", "/nothing").await.0, 404);
    let (status, ctype, page) = http(c, "GET", "/").await;
    assert_eq!((status, ctype.as_str()), (200, "text/html; charset=utf-8"));
    assert!(page.contains("/api/calls"), "the page polls the API");

    // The caller hangs up: the call leaves the list and its record is served.
    alice
        .send(
            srv.udp,
            &in_dialog("BYE", 2, alice.addr, bob.addr, "ctl1", &routes),
        )
        .await;
    let (bye, from) = bob.recv().await;
    bob.sock
        .send_to(&answer(&bye, from, bob.addr, 200, None), from)
        .await
        .unwrap();
    alice.recv().await;
    let mut cdr = Value::Null;
    for _ in 0..100 {
        cdr = json(c, "/api/cdr?limit=5").await;
        if cdr.as_array().is_some_and(|a| !a.is_empty()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(cdr[0]["call_id"], "ctl1", "{cdr}");
    assert_eq!(cdr[0]["caller_pkts"], 10, "{cdr}");
    assert_eq!(json(c, "/api/calls").await, Value::Array(vec![]));
    srv.stop().await;
}
