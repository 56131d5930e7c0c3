//! Reloading the configuration of a running server (what SIGHUP does in `serve`): a changed
//! `[[route]]` takes the next INVITE to the new next hop while a call already up goes on
//! untouched; an invalid file is refused and the old routes stay; restart-only keys keep
//! their running values; keepalives follow a reloaded `[nat]`.

use std::net::SocketAddr;

use sipedge::sip::{Framing, HeaderName, Message};
use tokio::net::UdpSocket;

use crate::harness::{TestServer, Ua, WAIT, binding};

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

fn bye(target: &str, caller: SocketAddr, call_id: &str, to_tag: &str, routes: &[String]) -> String {
    format!(
        "BYE {target} SIP/2.0\r\n\
Via: SIP/2.0/UDP {caller};branch=z9hG4bK-bye-{call_id};rport\r\n\
Max-Forwards: 70\r\n\
Route: {}\r\n\
From: <sip:alice@example.com>;tag=caller-{call_id}\r\n\
To: <sip:1234@example.com>;tag={to_tag}\r\n\
Call-ID: {call_id}\r\n\
CSeq: 2 BYE\r\n\
Content-Length: 0\r\n\r\n",
        routes.join(", ")
    )
}

fn pbx_route(hop: SocketAddr) -> String {
    format!(
        "[[route]]\nname = \"pbx\"\nuser = '^[0-9]{{3,4}}$'\nnext_hop = \"{hop}\"\nmedia = \"never\"\n"
    )
}

#[tokio::test]
async fn a_reloaded_route_takes_the_next_invite_and_an_invalid_file_is_refused() {
    let (old_pbx, new_pbx) = (Ua::new().await, Ua::new().await);
    let srv = TestServer::start("", &pbx_route(old_pbx.addr)).await;
    let caller = Ua::new().await;

    // A call up through the old route.
    caller
        .send(
            srv.udp,
            &invite("sip:1234@example.com", caller.addr, "before"),
        )
        .await;
    let (inv, from) = old_pbx.recv().await;
    assert_eq!(inv.method(), Some("INVITE"));
    old_pbx.answer(&inv, from, 200, "old-tag").await;
    let (ok, _) = caller.recv().await;
    assert_eq!(ok.status(), Some(200));
    let routes: Vec<String> = ok
        .route_set(HeaderName::RecordRoute)
        .unwrap()
        .iter()
        .map(|r| format!("<{}>", r.uri))
        .collect();

    // The route now points at the new PBX; `max_forwards` needs a restart.
    let r = srv
        .reload("max_forwards = 20", &pbx_route(new_pbx.addr))
        .await
        .unwrap();
    assert_eq!(r.live, ["route"]);
    assert_eq!(r.restart, ["server.max_forwards"]);

    // The call that was up is not disturbed: its BYE follows its route set to the old PBX.
    let target = format!("sip:callee@{}", old_pbx.addr);
    caller
        .send(
            srv.udp,
            &bye(&target, caller.addr, "before", "old-tag", &routes),
        )
        .await;
    let (b, b_from) = old_pbx.recv().await;
    assert_eq!(b.method(), Some("BYE"));
    old_pbx.answer(&b, b_from, 200, "old-tag").await;
    let (b_ok, _) = caller.recv().await;
    assert_eq!(
        (b_ok.status(), b_ok.cseq().unwrap().method),
        (Some(200), "BYE")
    );

    // The next INVITE goes to the new next hop, with the running Max-Forwards cap.
    caller
        .send(
            srv.udp,
            &invite("sip:1234@example.com", caller.addr, "after"),
        )
        .await;
    let (inv, _) = new_pbx.recv().await;
    assert_eq!(inv.call_id().unwrap(), "after");
    assert_eq!(
        inv.request_uri(),
        Some(format!("sip:1234@{}", new_pbx.addr).as_str())
    );
    assert_eq!(inv.max_forwards().unwrap(), Some(10), "restart-only: kept");
    old_pbx.silent().await;

    // An invalid file (a bad next hop) is refused, naming the key; the routes stay.
    let e = srv
        .reload(
            "",
            "[[route]]\nname = \"pbx\"\nuser = '^1'\nnext_hop = \"bad host\"\n",
        )
        .await
        .unwrap_err();
    assert_eq!(e.key(), Some("route.next_hop"), "{e}");
    let e = srv.reload_text("[server\nlisten = ").await.unwrap_err();
    assert!(e.key().is_some(), "{e}");
    caller
        .send(
            srv.udp,
            &invite("sip:1234@example.com", caller.addr, "refused"),
        )
        .await;
    let (inv, _) = new_pbx.recv().await;
    assert_eq!(inv.call_id().unwrap(), "refused");
    old_pbx.silent().await;
    assert_eq!(
        srv.reloader.current().routes[0].next_hops[0].port,
        Some(new_pbx.addr.port())
    );
    srv.stop().await;
}

/// Keepalives start when a reload sets `nat.ping_interval`, and follow a new `ping_method`.
#[tokio::test]
async fn keepalives_follow_a_reloaded_nat_table() {
    let srv = TestServer::start("instance_id = \"test\"", "[nat]\nping_interval = 0\n").await;
    let phone = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut b = binding(
        "alice@example.com",
        "sip:alice@10.0.0.2:5060".into(),
        phone.local_addr().unwrap(),
    );
    b.local_socket = srv.udp;
    srv.set_bindings(&b.aor, vec![b.clone()]).await;
    let mut buf = vec![0u8; 65536];
    let quiet = tokio::time::timeout(
        std::time::Duration::from_millis(1500),
        phone.recv_from(&mut buf),
    )
    .await;
    assert!(quiet.is_err(), "no keepalive while ping_interval = 0");

    let r = srv
        .reload("instance_id = \"test\"", "[nat]\nping_interval = 1\n")
        .await
        .unwrap();
    assert_eq!(r.live, ["nat.ping_interval"]);
    let (n, _) = tokio::time::timeout(WAIT, phone.recv_from(&mut buf))
        .await
        .expect("a keepalive after the reload")
        .unwrap();
    let ping = Message::parse(&buf[..n], Framing::Datagram).unwrap();
    assert_eq!(ping.method(), Some("OPTIONS"));

    srv.reload(
        "instance_id = \"test\"",
        "[nat]\nping_interval = 1\nping_method = \"crlf\"\n",
    )
    .await
    .unwrap();
    // At most one OPTIONS already on its way, then CRLFs.
    let mut got_crlf = false;
    for _ in 0..3 {
        let (n, _) = tokio::time::timeout(WAIT, phone.recv_from(&mut buf))
            .await
            .expect("keepalives go on")
            .unwrap();
        if &buf[..n] == b"\r\n\r\n" {
            got_crlf = true;
            break;
        }
    }
    assert!(got_crlf, "ping_method = crlf applied");
    srv.stop().await;
}
