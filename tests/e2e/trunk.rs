//! Trunk credentials over real UDP (issue #13 item 3, Kamailio `uac_auth()` / `uac_reg`): a
//! socket stands in for a provider that requires REGISTER and challenges every INVITE; it
//! checks the credentials with sipedge's own server-side digest code. An authenticated phone
//! calls through the trunk route and never sees the provider's challenge; the dialog's CSeq
//! numbers are shifted towards the provider and back.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use sipedge::auth::digest;
use sipedge::config::DigestAlgorithm;
use sipedge::sip::{HeaderName, Message, reply};
use sipedge::store::Subscriber;

use crate::cli::{LogLines, sipedge, temp_config};
use crate::harness::{TestServer, Ua};

const REALM: &str = "voip.example.net";
const RURI: &str = "sip:15551234567@example.com";

fn invite(caller: SocketAddr, call_id: &str, cseq: u32, extra: &str) -> String {
    format!(
        "INVITE {RURI} SIP/2.0\r\n\
Via: SIP/2.0/UDP {caller};branch=z9hG4bK-{call_id}-{cseq};rport\r\n\
Max-Forwards: 70\r\n\
From: <sip:alice@example.com>;tag=caller-{call_id}\r\n\
To: <{RURI}>\r\n\
Call-ID: {call_id}\r\n\
CSeq: {cseq} INVITE\r\n\
Contact: <sip:alice@{caller}>\r\n\
{extra}Content-Length: 0\r\n\r\n"
    )
}

/// An in-dialog request of the phone along the route set.
fn in_dialog(
    method: &str,
    cseq: u32,
    target: &str,
    caller: SocketAddr,
    to_tag: &str,
    routes: &[String],
) -> String {
    format!(
        "{method} {target} SIP/2.0\r\n\
Via: SIP/2.0/UDP {caller};branch=z9hG4bK-{method}-{cseq};rport\r\n\
Max-Forwards: 70\r\n\
Route: {}\r\n\
From: <sip:alice@example.com>;tag=caller-trunk1\r\n\
To: <{RURI}>;tag={to_tag}\r\n\
Call-ID: trunk1\r\n\
CSeq: {cseq} {method}\r\n\
Content-Length: 0\r\n\r\n",
        routes.join(", ")
    )
}

/// The provider's challenge (`status` 401 or 407) to `req`.
async fn challenge(provider: &Ua, req: &Message, from: SocketAddr, status: u16, nonce: &str) {
    let ch = digest::challenge(DigestAlgorithm::Md5, REALM, nonce, "op4que", false);
    let name = if status == 401 {
        "WWW-Authenticate"
    } else {
        "Proxy-Authenticate"
    };
    let bytes = reply::response(req, from, status, reply::reason(status), &[(name, &ch)]);
    provider.sock.send_to(&bytes, from).await.unwrap();
}

/// The provider's check of the credentials in `header`: right account, realm, nonce, and a
/// response that verifies for `password`.
fn verified(req: &Message, header: HeaderName, nonce: &str, password: &str) -> bool {
    let Some(v) = req.header_str(header) else {
        return false;
    };
    let c = digest::parse_credentials(v).unwrap();
    assert_eq!(
        (&*c.username, &*c.realm, &*c.nonce),
        ("acct1", REALM, nonce)
    );
    assert_eq!(c.opaque.as_deref(), Some("op4que"));
    assert!(digest::uri_matches(&c.uri, req.request_uri().unwrap()));
    let ha1 = digest::ha1(c.algorithm, "acct1", REALM, password);
    digest::verify(&ha1, req.method().unwrap(), &c)
}

fn trunk_config(provider: SocketAddr, password: &str, register: bool) -> String {
    format!(
        "[[route]]\nname = \"provider\"\nuser = '^1[0-9]{{10}}$'\nnext_hop = \"{provider}\"\n\
         auth = true\nmedia = \"never\"\ntrunk = \"carrier\"\n\
         [[trunk]]\nname = \"carrier\"\nusername = \"acct1\"\npassword = \"{password}\"\n\
         realm = \"{REALM}\"\nregister = {register}\nregister_expires = 600\n"
    )
}

/// The phone authenticates to sipedge (our 407) as alice and sends the INVITE again.
async fn authenticated_invite(srv: &TestServer, phone: &Ua) {
    srv.store
        .add_subscriber(&Subscriber {
            username: "alice".into(),
            domain: "example.com".into(),
            ha1_md5: digest::ha1(DigestAlgorithm::Md5, "alice", "example.com", "secret"),
            ha1_sha256: Some("unused".into()),
            caller_id: None,
            created: 0,
        })
        .await
        .unwrap();
    phone
        .send(srv.udp, &invite(phone.addr, "trunk1", 1, ""))
        .await;
    let (ours, _) = phone.recv().await;
    assert_eq!(ours.status(), Some(407), "sipedge's own challenge");
    let value = ours
        .headers_named(HeaderName::ProxyAuthenticate)
        .filter_map(|h| ours.str_at(h.value.clone()))
        .filter_map(|v| digest::parse_challenge(v).ok())
        .find(|c| c.algorithm == DigestAlgorithm::Md5)
        .expect("an MD5 challenge");
    assert_ne!(value.realm, REALM);
    let creds = digest::authorization(
        &value,
        &digest::Answer {
            username: "alice",
            password: "secret",
            method: "INVITE",
            uri: RURI,
            cnonce: "c1",
            nc: 1,
        },
    );
    // The phone ACKs our 407 (absorbed by our transaction), then sends CSeq 2.
    phone
        .send(
            srv.udp,
            &invite(
                phone.addr,
                "trunk1",
                2,
                &format!("Proxy-Authorization: {creds}\r\n"),
            ),
        )
        .await;
}

/// Waits (bounded) for the `trunk_registered{trunk="carrier"}` gauge to read `want`.
async fn gauge(srv: &TestServer, want: u64) {
    for _ in 0..100 {
        let now = srv
            .metrics
            .snapshot()
            .into_iter()
            .find(|s| s.name == "trunk_registered")
            .map(|s| s.value);
        if now == Some(want) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("trunk_registered never read {want}");
}

#[tokio::test]
async fn call_through_a_trunk_that_registers_and_challenges() {
    let provider = Ua::new().await;
    let srv = TestServer::start("", &trunk_config(provider.addr, "s3cret", true)).await;

    // REGISTER: challenged with 401, then granted with verified credentials.
    let (reg, from) = provider.recv().await;
    assert_eq!(reg.method(), Some("REGISTER"));
    assert_eq!(from, srv.udp, "from our UDP socket");
    assert_eq!(reg.header_str(HeaderName::Expires), Some("600"));
    assert!(reg.header(HeaderName::Authorization).is_none());
    challenge(&provider, &reg, from, 401, "r1").await;
    let (reg2, from) = provider.recv().await;
    assert!(verified(&reg2, HeaderName::Authorization, "r1", "s3cret"));
    assert_eq!(reg2.call_id().unwrap(), reg.call_id().unwrap());
    assert_eq!(reg2.cseq().unwrap().seq, reg.cseq().unwrap().seq + 1);
    let ok = reply::response(
        &reg2,
        from,
        200,
        "OK",
        &[("Contact", &format!("<sip:acct1@{}>;expires=600", srv.udp))],
    );
    provider.sock.send_to(&ok, from).await.unwrap();
    gauge(&srv, 1).await;

    // The phone's INVITE reaches the provider without the phone's credentials; the provider
    // challenges it and gets it again with the trunk's, CSeq + 1.
    let phone = Ua::new().await;
    authenticated_invite(&srv, &phone).await;
    let (inv, from) = provider.recv().await;
    assert_eq!(inv.method(), Some("INVITE"));
    assert!(
        inv.header(HeaderName::ProxyAuthorization).is_none(),
        "alice's were consumed"
    );
    let first_cseq = inv.cseq().unwrap().seq;
    assert_eq!(first_cseq, 2, "the phone's CSeq");
    challenge(&provider, &inv, from, 407, "i1").await;
    let (ack, _) = provider.recv().await;
    assert_eq!(ack.method(), Some("ACK"), "the 407 is ACKed");
    assert_eq!(ack.cseq().unwrap().seq, first_cseq);
    let (inv2, from) = provider.recv().await;
    assert_eq!(inv2.method(), Some("INVITE"));
    assert!(verified(
        &inv2,
        HeaderName::ProxyAuthorization,
        "i1",
        "s3cret"
    ));
    assert_eq!(inv2.cseq().unwrap().seq, first_cseq + 1);
    assert_eq!(inv2.call_id().unwrap(), "trunk1");
    assert_ne!(
        inv2.top_via().unwrap().branch(),
        inv.top_via().unwrap().branch()
    );
    provider.answer(&inv2, from, 180, "prov").await;
    provider.answer(&inv2, from, 200, "prov").await;

    // The phone sees 180 and 200 with its own CSeq, never the provider's 407.
    let (r180, _) = phone.recv().await;
    assert_eq!(r180.status(), Some(180));
    let (r200, _) = phone.recv().await;
    assert_eq!(r200.status(), Some(200));
    assert_eq!(r200.cseq().unwrap().seq, 2);

    // ACK and BYE: CSeq + 1 towards the provider; the BYE's 200 comes back with the phone's.
    let routes: Vec<String> = r200
        .route_set(HeaderName::RecordRoute)
        .unwrap()
        .iter()
        .map(|r| format!("<{}>", r.uri))
        .collect();
    let target = format!("sip:callee@{}", provider.addr);
    phone
        .send(
            srv.udp,
            &in_dialog("ACK", 2, &target, phone.addr, "prov", &routes),
        )
        .await;
    let (ack, _) = provider.recv().await;
    assert_eq!(ack.method(), Some("ACK"));
    assert_eq!(
        ack.cseq().unwrap().seq,
        first_cseq + 1,
        "the ACK of the re-sent INVITE"
    );
    phone
        .send(
            srv.udp,
            &in_dialog("BYE", 3, &target, phone.addr, "prov", &routes),
        )
        .await;
    let (bye, from) = provider.recv().await;
    assert_eq!(bye.method(), Some("BYE"));
    assert!(
        bye.cseq().unwrap().seq > inv2.cseq().unwrap().seq,
        "the BYE's CSeq is above the INVITE's"
    );
    assert_eq!(bye.cseq().unwrap().seq, 4);
    provider.answer(&bye, from, 200, "prov").await;
    let (bye_ok, _) = phone.recv().await;
    assert_eq!(
        (bye_ok.status(), bye_ok.cseq().unwrap().seq),
        (Some(200), 3)
    );

    // Shutdown unregisters (Expires: 0, with the last nonce's credentials).
    srv.stop().await;
    let (unreg, _) = provider.recv().await;
    assert_eq!(unreg.method(), Some("REGISTER"));
    assert_eq!(unreg.header_str(HeaderName::Expires), Some("0"));
    assert!(verified(&unreg, HeaderName::Authorization, "r1", "s3cret"));
}

/// A wrong trunk password: the provider challenges the re-sent INVITE again; the phone gets
/// a 403 naming trunk authentication and the log a warn line naming the trunk.
#[tokio::test]
async fn wrong_trunk_password_gives_the_phone_a_403_and_a_warn_line() {
    let provider = Ua::new().await;
    let config = format!(
        "[server]\nlisten = [\"udp:127.0.0.1:0\"]\ndomains = [\"example.com\"]\n\
         [database]\nurl = \"{}\"\n[control]\nlisten = \"127.0.0.1:0\"\n{}",
        crate::harness::fresh_db(),
        trunk_config(provider.addr, "wrong", false).replace("auth = true", "auth = false")
    );
    let path = temp_config("trunk-wrong.toml", &config);
    let mut child = sipedge()
        .args(["serve", "-c"])
        .arg(&path)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = LogLines::new(child.stderr.take().unwrap());
    let line = log.until("listening transport=\"udp\"");
    let addr: SocketAddr = line
        .split(" addr=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap();

    let phone = Ua::new().await;
    phone.send(addr, &invite(phone.addr, "trunk2", 1, "")).await;
    let (inv, from) = provider.recv().await;
    challenge(&provider, &inv, from, 407, "w1").await;
    let inv2 = loop {
        let (m, _) = provider.recv().await;
        if m.method() == Some("INVITE") {
            break m;
        }
    };
    assert!(!verified(
        &inv2,
        HeaderName::ProxyAuthorization,
        "w1",
        "s3cret"
    ));
    challenge(&provider, &inv2, from, 407, "w2").await;
    let (resp, _) = phone.recv().await;
    assert_eq!(resp.status(), Some(403));
    assert!(
        resp.header(HeaderName::ProxyAuthenticate).is_none(),
        "not the provider's 407"
    );
    assert_eq!(resp.cseq().unwrap().seq, 1);
    let line = log.until("trunk credentials rejected");
    assert!(
        line.contains("WARN") && line.contains("trunk=carrier"),
        "{line}"
    );
    child.kill().unwrap();
    let _ = child.wait();
}
