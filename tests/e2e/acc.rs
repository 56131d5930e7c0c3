//! Accounting over real UDP (issue #12 item 5): one `cdr` row per call, relayed or not. A
//! caller, sipedge, and sockets standing in for the PBX, the provider and registered phones;
//! the rows are read back from the store.

use std::net::SocketAddr;
use std::time::Duration;

use md5::{Digest, Md5};
use sipedge::sip::{HeaderName, Message, reply};
use sipedge::store::{Cdr, Subscriber};
use tokio::net::UdpSocket;
use tokio::time::Instant;

use crate::harness::{TestServer, Ua, WAIT, binding};

fn invite(ruri: &str, caller: SocketAddr, call_id: &str, cseq: u32, extra: &str) -> String {
    format!(
        "INVITE {ruri} SIP/2.0\r\n\
Via: SIP/2.0/UDP {caller};branch=z9hG4bK-{call_id}-{cseq};rport\r\n\
Max-Forwards: 70\r\n\
From: <sip:alice@example.com>;tag=caller-{call_id}\r\n\
To: <{ruri}>\r\n\
Call-ID: {call_id}\r\n\
CSeq: {cseq} INVITE\r\n\
Contact: <sip:alice@{caller}>\r\n\
{extra}Content-Length: 0\r\n\r\n"
    )
}

/// An in-dialog request along the route set, from `from_tag`'s side to `to_tag`'s.
#[allow(clippy::too_many_arguments)] // one call site per side; a struct would hide the fields
fn in_dialog(
    method: &str,
    target: &str,
    sender: SocketAddr,
    call_id: &str,
    (from, from_tag): (&str, &str),
    (to, to_tag): (&str, &str),
    routes: &[String],
) -> String {
    format!(
        "{method} {target} SIP/2.0\r\n\
Via: SIP/2.0/UDP {sender};branch=z9hG4bK-{method}-{call_id};rport\r\n\
Max-Forwards: 70\r\n\
Route: {}\r\n\
From: <{from}>;tag={from_tag}\r\n\
To: <{to}>;tag={to_tag}\r\n\
Call-ID: {call_id}\r\n\
CSeq: 2 {method}\r\n\
Content-Length: 0\r\n\r\n",
        routes.join(", ")
    )
}

fn routes_of(m: &Message) -> Vec<String> {
    m.route_set(HeaderName::RecordRoute)
        .unwrap()
        .iter()
        .map(|r| format!("<{}>", r.uri))
        .collect()
}

/// The PBX route (3-4 digits, media never relayed) and the provider route (11 digits, proxy
/// authentication), to `pbx` and `provider`.
async fn server(pbx: SocketAddr, provider: SocketAddr) -> TestServer {
    server_on(&crate::harness::fresh_db(), pbx, provider).await
}

/// [`server`] on the database `db`.
async fn server_on(db: &str, pbx: SocketAddr, provider: SocketAddr) -> TestServer {
    TestServer::start_on(
        db,
        "127.0.0.1:0",
        "",
        &format!(
            "[[route]]\nname = \"pbx\"\nuser = '^[0-9]{{3,4}}$'\nnext_hop = \"{pbx}\"\nmedia = \"never\"\n\
             [[route]]\nname = \"provider\"\nuser = '^1[0-9]{{10}}$'\nnext_hop = \"{provider}\"\n\
             auth = true\nmedia = \"never\"\n"
        ),
    )
    .await
}

/// Polls until the call has its row, then checks for a while that no second one comes.
async fn row(srv: &TestServer, call_id: &str) -> Cdr {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let rows = srv.store.cdrs_of(call_id).await.unwrap();
        if !rows.is_empty() {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let again = srv.store.cdrs_of(call_id).await.unwrap();
            assert_eq!(again.len(), 1, "one row per call: {again:#?}");
            return again.into_iter().next().unwrap();
        }
        assert!(Instant::now() < deadline, "no CDR for {call_id}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Asserts the call never gets a row.
async fn no_row(srv: &TestServer, call_id: &str) {
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rows = srv.store.cdrs_of(call_id).await.unwrap();
    assert!(rows.is_empty(), "{rows:#?}");
}

#[tokio::test]
async fn a_call_still_up_at_shutdown_has_its_row_when_the_server_is_gone() {
    // The row is handed to the CDR writer, which commits in the background: stopping the
    // server must still leave it in the store (reason "shutdown").
    let (pbx, provider) = (Ua::new().await, Ua::new().await);
    let db = crate::harness::fresh_db();
    let srv = server_on(&db, pbx.addr, provider.addr).await;
    let caller = Ua::new().await;
    caller
        .send(
            srv.udp,
            &invite("sip:1234@example.com", caller.addr, "accS", 1, ""),
        )
        .await;
    let (inv, from) = pbx.recv().await;
    pbx.answer(&inv, from, 200, "pbx-tag").await;
    let (ok, _) = caller.recv().await;
    assert_eq!(ok.status(), Some(200));
    assert_eq!(srv.proxy.accounting().dialogs(), 1);
    srv.stop().await;

    let store = sipedge::store::Store::connect(&db).await.unwrap();
    let rows = store.cdrs_of("accS").await.unwrap();
    assert_eq!(rows.len(), 1, "{rows:#?}");
    assert_eq!(rows[0].reason, "shutdown");
    assert_eq!(rows[0].status, 200);
    store.close().await;
}

#[tokio::test]
async fn answered_call_not_relayed_is_closed_by_the_bye() {
    let (pbx, provider) = (Ua::new().await, Ua::new().await);
    let srv = server(pbx.addr, provider.addr).await;
    let caller = Ua::new().await;
    let ruri = "sip:1234@example.com";
    caller
        .send(srv.udp, &invite(ruri, caller.addr, "acc1", 1, ""))
        .await;
    let (inv, from) = pbx.recv().await;
    pbx.answer(&inv, from, 200, "pbx-tag").await;
    let (ok, _) = caller.recv().await;
    assert_eq!(ok.status(), Some(200));
    let routes = routes_of(&ok);
    let target = format!("sip:callee@{}", pbx.addr);
    let caller_side = ("sip:alice@example.com", "caller-acc1");
    let callee_side = (ruri, "pbx-tag");
    // Answered, no BYE yet: no row, the dialog is open.
    no_row(&srv, "acc1").await;
    assert_eq!(srv.proxy.accounting().dialogs(), 1);

    // The PBX hangs up: its BYE goes along the caller's Contact through our Record-Route
    // (the route set reversed is the same single Route of ours).
    let caller_target = format!("sip:alice@{}", caller.addr);
    pbx.send(
        srv.udp,
        &in_dialog(
            "BYE",
            &caller_target,
            pbx.addr,
            "acc1",
            callee_side,
            caller_side,
            &routes,
        ),
    )
    .await;
    let (bye, bye_from) = caller.recv().await;
    assert_eq!(bye.method(), Some("BYE"));
    caller.answer(&bye, bye_from, 200, "caller-acc1").await;
    assert_eq!(pbx.recv().await.0.status(), Some(200));

    let r = row(&srv, "acc1").await;
    assert_eq!(
        (r.status, r.outcome.as_str(), r.reason.as_str()),
        (200, "answered", "bye")
    );
    assert_eq!(r.hangup, "callee");
    assert_eq!((r.route.as_str(), r.auth_user.as_str()), ("pbx", ""));
    assert_eq!(r.source, caller.addr.to_string());
    assert_eq!(
        (
            r.from_uri.as_str(),
            r.to_uri.as_str(),
            r.request_uri.as_str()
        ),
        ("sip:alice@example.com", ruri, ruri)
    );
    let answer = r.answer.expect("answer time");
    assert!(r.start <= answer && answer <= r.end, "{r:?}");
    assert!(!r.relayed);
    assert_eq!((r.caller.0, r.callee.0), (0, 0));
    assert_eq!(srv.proxy.accounting().dialogs(), 0);

    // A second call, hung up by the caller this time.
    caller
        .send(srv.udp, &invite(ruri, caller.addr, "acc1b", 1, ""))
        .await;
    let (inv, from) = pbx.recv().await;
    pbx.answer(&inv, from, 200, "pbx-tag").await;
    let (ok, _) = caller.recv().await;
    caller
        .send(
            srv.udp,
            &in_dialog(
                "BYE",
                &target,
                caller.addr,
                "acc1b",
                ("sip:alice@example.com", "caller-acc1b"),
                callee_side,
                &routes_of(&ok),
            ),
        )
        .await;
    let (bye, bye_from) = pbx.recv().await;
    pbx.answer(&bye, bye_from, 200, "pbx-tag").await;
    let r = row(&srv, "acc1b").await;
    assert_eq!((r.reason.as_str(), r.hangup.as_str()), ("bye", "caller"));
    srv.stop().await;
}

fn md5_hex(s: &str) -> String {
    Md5::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The value of a quoted or token parameter in a challenge.
fn challenge_param(ch: &str, name: &str) -> String {
    let at = ch.find(&format!("{name}=")).unwrap() + name.len() + 1;
    let rest = &ch[at..];
    match rest.strip_prefix('"') {
        Some(q) => q[..q.find('"').unwrap()].to_owned(),
        None => rest.split([',', ' ']).next().unwrap().to_owned(),
    }
}

/// A busy callee on the provider route, after proxy authentication: the 407 leaves no row,
/// the authenticated INVITE's 486 one, with the user it authenticated as.
#[tokio::test]
async fn busy_after_authentication() {
    let (pbx, provider) = (Ua::new().await, Ua::new().await);
    let srv = server(pbx.addr, provider.addr).await;
    srv.store
        .add_subscriber(&Subscriber {
            username: "alice".into(),
            domain: "example.com".into(),
            ha1_md5: md5_hex("alice:example.com:secret"),
            ha1_sha256: Some("unused".into()),
            created: 0,
            caller_id: None,
        })
        .await
        .unwrap();
    let caller = Ua::new().await;
    let ruri = "sip:15551234567@example.com";
    caller
        .send(srv.udp, &invite(ruri, caller.addr, "acc2", 1, ""))
        .await;
    let (ch, _) = caller.recv().await;
    assert_eq!(ch.status(), Some(407));
    no_row(&srv, "acc2").await;

    let ch = ch
        .headers_named(HeaderName::ProxyAuthenticate)
        .map(|h| ch.str_at(h.value.clone()).unwrap().to_owned())
        .find(|v| !v.contains("SHA-256"))
        .expect("an MD5 challenge");
    let (realm, nonce) = (challenge_param(&ch, "realm"), challenge_param(&ch, "nonce"));
    let ha1 = md5_hex(&format!("alice:{realm}:secret"));
    let ha2 = md5_hex(&format!("INVITE:{ruri}"));
    let response = md5_hex(&format!("{ha1}:{nonce}:00000001:c1:auth:{ha2}"));
    let creds = format!(
        "Proxy-Authorization: Digest username=\"alice\", realm=\"{realm}\", nonce=\"{nonce}\", \
         uri=\"{ruri}\", response=\"{response}\", algorithm=MD5, qop=auth, nc=00000001, \
         cnonce=\"c1\"\r\n"
    );
    caller
        .send(srv.udp, &invite(ruri, caller.addr, "acc2", 2, &creds))
        .await;
    let (inv, from) = provider.recv().await;
    assert_eq!(inv.method(), Some("INVITE"));
    provider.answer(&inv, from, 486, "prov").await;
    assert_eq!(caller.recv().await.0.status(), Some(486));

    let r = row(&srv, "acc2").await;
    assert_eq!(
        (r.status, r.outcome.as_str(), r.reason.as_str()),
        (486, "failed", "failed")
    );
    assert_eq!(
        (r.route.as_str(), r.auth_user.as_str()),
        ("provider", "alice")
    );
    assert_eq!((r.answer, r.hangup.as_str(), r.relayed), (None, "", false));
    assert!(r.start <= r.end);
    srv.stop().await;
}

#[tokio::test]
async fn cancelled_call() {
    let (pbx, provider) = (Ua::new().await, Ua::new().await);
    let srv = server(pbx.addr, provider.addr).await;
    let caller = Ua::new().await;
    let text = invite("sip:200@example.com", caller.addr, "acc3", 1, "");
    caller.send(srv.udp, &text).await;
    let (inv, from) = pbx.recv().await;
    pbx.answer(&inv, from, 180, "pbx").await;
    assert_eq!(caller.recv().await.0.status(), Some(180));
    let cancel = text
        .replacen("INVITE sip:", "CANCEL sip:", 1)
        .replace("CSeq: 1 INVITE", "CSeq: 1 CANCEL");
    caller.send(srv.udp, &cancel).await;
    assert_eq!(
        caller.recv().await.0.status(),
        Some(200),
        "200 for the CANCEL"
    );
    let (fwd, cfrom) = pbx.recv().await;
    assert_eq!(fwd.method(), Some("CANCEL"));
    pbx.answer(&fwd, cfrom, 200, "pbx").await;
    pbx.answer(&inv, from, 487, "pbx").await;
    assert_eq!(caller.recv().await.0.status(), Some(487));

    let r = row(&srv, "acc3").await;
    assert_eq!(
        (r.status, r.outcome.as_str(), r.reason.as_str()),
        (487, "cancelled", "cancel")
    );
    assert_eq!((r.route.as_str(), r.answer), ("pbx", None));
    srv.stop().await;
}

/// A call from one of our users to a user of ours who is not registered: the location
/// service's 404 is a call outcome (route "local"), answered once even when the INVITE is
/// retransmitted. The same 404 to a scanner from elsewhere leaves no row.
#[tokio::test]
async fn not_found_for_an_unknown_user() {
    // No [[route]]: every socket of the test is on 127.0.0.1, which would be a next hop's
    // address (calls from a next hop count; the pipeline's unit test covers that rule).
    let srv = TestServer::start("", "").await;
    let caller = Ua::new().await;
    let text = invite("sip:nobody@example.com", caller.addr, "acc4", 1, "");
    caller.send(srv.udp, &text).await;
    assert_eq!(caller.recv().await.0.status(), Some(404));
    // A retransmission gets the same 404 from the transaction; still one row.
    caller.send(srv.udp, &text).await;
    assert_eq!(caller.recv().await.0.status(), Some(404));
    let r = row(&srv, "acc4").await;
    assert_eq!(
        (r.status, r.outcome.as_str(), r.route.as_str()),
        (404, "failed", "local")
    );
    assert_eq!(r.request_uri, "sip:nobody@example.com");
    assert_eq!(r.source, caller.addr.to_string());
    // The caller's ACK ends the 404's retransmissions.
    let ack = text
        .replacen("INVITE sip:", "ACK sip:", 1)
        .replace("CSeq: 1 INVITE", "CSeq: 1 ACK");
    caller.send(srv.udp, &ack).await;

    let scan = text
        .replace("sip:alice@example.com", "sip:100@198.51.100.9")
        .replace("acc4", "scan1");
    caller.send(srv.udp, &scan).await;
    assert_eq!(caller.recv().await.0.status(), Some(404));
    no_row(&srv, "scan1").await;
    srv.stop().await;
}

fn sdp(rtp_port: u16) -> String {
    format!(
        "v=0\r\no=- 7 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
         m=audio {rtp_port} RTP/AVP 0\r\na=sendrecv\r\n"
    )
}

fn with_sdp(text: &str, body: &str) -> String {
    text.replacen(
        "Content-Length: 0\r\n\r\n",
        &format!(
            "Content-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
        1,
    )
}

fn sdp_port(m: &Message) -> u16 {
    let body = std::str::from_utf8(m.body()).unwrap();
    body.lines()
        .find_map(|l| l.strip_prefix("m=audio "))
        .and_then(|l| l.split(' ').next())
        .unwrap()
        .parse()
        .unwrap()
}

/// A relayed call to a registered user: one row, written by the media session, with the
/// media figures and the accounting columns.
#[tokio::test]
async fn relayed_call_has_one_row_with_media_figures() {
    let (alice, bob) = (Ua::new().await, Ua::new().await);
    let (alice_rtp, bob_rtp) = (
        UdpSocket::bind("127.0.0.1:0").await.unwrap(),
        UdpSocket::bind("127.0.0.1:0").await.unwrap(),
    );
    let srv = TestServer::start("", "[media]\nports = \"42700-42749\"\nmode = \"always\"\n").await;
    let b = binding("bob@example.com", format!("sip:bob@{}", bob.addr), bob.addr);
    srv.set_bindings(&b.aor, vec![b.clone()]).await;
    let ruri = "sip:bob@example.com";
    let a_port = alice_rtp.local_addr().unwrap().port();
    let b_port = bob_rtp.local_addr().unwrap().port();
    alice
        .send(
            srv.udp,
            &with_sdp(&invite(ruri, alice.addr, "acc5", 1, ""), &sdp(a_port)),
        )
        .await;
    let (inv, from) = bob.recv().await;
    let to_bob = sdp_port(&inv);
    let contact = format!("<sip:bob@{}>", bob.addr);
    let mut extra: Vec<(&str, &str)> = inv
        .headers_named(HeaderName::RecordRoute)
        .map(|h| ("Record-Route", inv.str_at(h.value.clone()).unwrap()))
        .collect();
    extra.push(("Contact", &contact));
    let ok = String::from_utf8(reply::response(&inv, from, 200, "OK", &extra))
        .unwrap()
        .replace(&reply::local_tag(&inv), "b-tag");
    bob.send(from, &with_sdp(&ok, &sdp(b_port))).await;
    let (ok, _) = alice.recv().await;
    assert_eq!(ok.status(), Some(200));
    let to_alice = sdp_port(&ok);

    // Five packets from Alice through the relay.
    let relay_a: SocketAddr = format!("127.0.0.1:{to_alice}").parse().unwrap();
    for seq in 0..5u16 {
        let mut p = vec![0x80, 0x00];
        p.extend_from_slice(&seq.to_be_bytes());
        p.extend_from_slice(&[0; 8]);
        p.extend_from_slice(&[0xd5; 160]);
        alice_rtp.send_to(&p, relay_a).await.unwrap();
    }
    let mut buf = [0u8; 2048];
    for _ in 0..5 {
        let (_, src) = tokio::time::timeout(WAIT, bob_rtp.recv_from(&mut buf))
            .await
            .expect("RTP relayed")
            .unwrap();
        assert_eq!(src.port(), to_bob);
    }
    let routes = routes_of(&ok);
    alice
        .send(
            srv.udp,
            &in_dialog(
                "BYE",
                &format!("sip:bob@{}", bob.addr),
                alice.addr,
                "acc5",
                ("sip:alice@example.com", "caller-acc5"),
                (ruri, "b-tag"),
                &routes,
            ),
        )
        .await;
    let (bye, bye_from) = bob.recv().await;
    assert_eq!(bye.method(), Some("BYE"));
    bob.answer(&bye, bye_from, 200, "b-tag").await;

    let r = row(&srv, "acc5").await;
    assert!(r.relayed);
    assert_eq!(
        (
            r.status,
            r.outcome.as_str(),
            r.reason.as_str(),
            r.hangup.as_str()
        ),
        (200, "answered", "bye", "caller")
    );
    assert_eq!(
        (r.route.as_str(), r.source.clone()),
        ("location", alice.addr.to_string())
    );
    assert_eq!(r.caller.0, 5, "packets from the caller");
    assert!(r.caller.1 >= 5 * 160, "{r:?}");
    assert!(r.answer.is_some());
    assert_eq!(
        srv.proxy.accounting().dialogs(),
        0,
        "the media side owns it"
    );
    srv.stop().await;
}
