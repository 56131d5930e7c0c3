//! Caller identity towards the next hop (RFC 3325, issue #13 item 5): a provider route that
//! asserts the authenticated caller's number in `P-Asserted-Identity` or `Remote-Party-ID`,
//! and identity headers from untrusted senders removed. The config trusts nothing (the
//! default trusts loopback, where every test socket lives), except where a test says so.

use std::net::SocketAddr;

use md5::{Digest, Md5};
use sipedge::sip::{HeaderName, Message};
use sipedge::store::Subscriber;

use crate::harness::{TestServer, Ua};

fn md5_hex(s: &str) -> String {
    Md5::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A phone forging its identity in every header that could carry one.
const FORGED: &str = "P-Asserted-Identity: <sip:+18005550100@example.com>\r\n\
P-Preferred-Identity: <sip:boss@example.com>\r\n\
Remote-Party-ID: <sip:911@example.com>;party=calling;screen=yes\r\n";

fn invite(
    ruri: &str,
    user: &str,
    caller: SocketAddr,
    call_id: &str,
    cseq: u32,
    extra: &str,
) -> String {
    format!(
        "INVITE {ruri} SIP/2.0\r\n\
Via: SIP/2.0/UDP {caller};branch=z9hG4bK-{call_id}-{cseq};rport\r\n\
Max-Forwards: 70\r\n\
From: <sip:{user}@example.com>;tag=caller-{call_id}\r\n\
To: <{ruri}>\r\n\
Call-ID: {call_id}\r\n\
CSeq: {cseq} INVITE\r\n\
Contact: <sip:{user}@{caller}>\r\n\
{extra}Content-Length: 0\r\n\r\n"
    )
}

/// Routes to `provider`: 11 digits assert P-Asserted-Identity, `00…` Remote-Party-ID (both
/// with proxy authentication); 3-4 digits go to the PBX (`pbx`) with nothing asserted.
async fn server(provider: SocketAddr, pbx: SocketAddr, trusted: &str) -> TestServer {
    let srv = TestServer::start(
        "",
        &format!(
            "[security]\ntrusted = [{trusted}]\n\
             [[route]]\nname = \"pai\"\nuser = '^1[0-9]{{10}}$'\nnext_hop = \"{provider}\"\n\
             auth = true\nmedia = \"never\"\nidentity = \"pai\"\n\
             [[route]]\nname = \"rpid\"\nuser = '^00[0-9]+$'\nnext_hop = \"{provider}\"\n\
             auth = true\nmedia = \"never\"\nidentity = \"rpid\"\n\
             [[route]]\nname = \"pbx\"\nuser = '^[0-9]{{3,4}}$'\nnext_hop = \"{pbx}\"\n\
             media = \"never\"\n"
        ),
    )
    .await;
    for (user, caller_id) in [("alice", Some("+15551230001")), ("bob", None)] {
        srv.store
            .add_subscriber(&Subscriber {
                username: user.into(),
                domain: "example.com".into(),
                ha1_md5: md5_hex(&format!("{user}:example.com:secret")),
                ha1_sha256: Some("unused".into()),
                created: 0,
                caller_id: caller_id.map(str::to_owned),
            })
            .await
            .unwrap();
    }
    srv
}

fn param(ch: &str, name: &str) -> String {
    let at = ch.find(&format!("{name}=\"")).unwrap() + name.len() + 2;
    ch[at..].split('"').next().unwrap().to_owned()
}

/// `user` calls `ruri` with `extra` headers, answering the 407; returns the INVITE as the
/// provider got it (and answers it 486 so that the call ends).
async fn authenticated_call(
    srv: &TestServer,
    provider: &Ua,
    user: &str,
    ruri: &str,
    call_id: &str,
    extra: &str,
) -> Message {
    let caller = Ua::new().await;
    caller
        .send(srv.udp, &invite(ruri, user, caller.addr, call_id, 1, extra))
        .await;
    let (ch, _) = caller.recv().await;
    assert_eq!(ch.status(), Some(407));
    let ch = ch
        .headers_named(HeaderName::ProxyAuthenticate)
        .map(|h| ch.str_at(h.value.clone()).unwrap().to_owned())
        .find(|v| !v.contains("SHA-256"))
        .expect("an MD5 challenge");
    let (realm, nonce) = (param(&ch, "realm"), param(&ch, "nonce"));
    let ha1 = md5_hex(&format!("{user}:{realm}:secret"));
    let ha2 = md5_hex(&format!("INVITE:{ruri}"));
    let response = md5_hex(&format!("{ha1}:{nonce}:00000001:c1:auth:{ha2}"));
    let creds = format!(
        "{extra}Proxy-Authorization: Digest username=\"{user}\", realm=\"{realm}\", \
         nonce=\"{nonce}\", uri=\"{ruri}\", response=\"{response}\", algorithm=MD5, qop=auth, \
         nc=00000001, cnonce=\"c1\"\r\n"
    );
    caller
        .send(
            srv.udp,
            &invite(ruri, user, caller.addr, call_id, 2, &creds),
        )
        .await;
    let (inv, from) = provider.recv().await;
    assert_eq!(inv.method(), Some("INVITE"));
    busy(provider, &inv, from).await;
    assert_eq!(caller.recv().await.0.status(), Some(486));
    inv
}

/// `ua` answers `inv` busy and gets our ACK for it.
async fn busy(ua: &Ua, inv: &Message, from: SocketAddr) {
    ua.answer(inv, from, 486, "busy").await;
    let (ack, _) = ua.recv().await;
    assert_eq!(ack.method(), Some("ACK"));
}

fn values(m: &Message, name: HeaderName) -> Vec<String> {
    m.headers_named(name)
        .map(|h| m.str_at(h.value.clone()).unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn provider_gets_the_callers_number_in_pai_and_the_forgery_is_gone() {
    let (provider, pbx) = (Ua::new().await, Ua::new().await);
    let srv = server(provider.addr, pbx.addr, "").await;
    let inv = authenticated_call(
        &srv,
        &provider,
        "alice",
        "sip:15559876543@example.com",
        "id1",
        FORGED,
    )
    .await;
    assert_eq!(
        values(&inv, HeaderName::PAssertedIdentity),
        ["<sip:+15551230001@example.com>"],
        "ours only"
    );
    assert!(values(&inv, HeaderName::PPreferredIdentity).is_empty());
    assert!(values(&inv, HeaderName::RemotePartyId).is_empty());
    assert!(inv.header(HeaderName::ProxyAuthorization).is_none());
    srv.stop().await;
}

#[tokio::test]
async fn rpid_route_asserts_the_seed_suffix_and_falls_back_to_the_username() {
    let (provider, pbx) = (Ua::new().await, Ua::new().await);
    let srv = server(provider.addr, pbx.addr, "").await;
    let inv = authenticated_call(
        &srv,
        &provider,
        "alice",
        "sip:0044123@example.com",
        "id2",
        "",
    )
    .await;
    assert_eq!(
        values(&inv, HeaderName::RemotePartyId),
        ["<sip:+15551230001@example.com>;party=calling;id-type=subscriber;screen=yes"]
    );
    assert!(values(&inv, HeaderName::PAssertedIdentity).is_empty());
    // bob has no caller ID: his username is asserted.
    let inv = authenticated_call(
        &srv,
        &provider,
        "bob",
        "sip:0044123@example.com",
        "id3",
        FORGED,
    )
    .await;
    assert_eq!(
        values(&inv, HeaderName::RemotePartyId),
        ["<sip:bob@example.com>;party=calling;id-type=subscriber;screen=yes"]
    );
    assert!(values(&inv, HeaderName::PAssertedIdentity).is_empty());
    srv.stop().await;
}

#[tokio::test]
async fn identity_headers_pass_only_from_trusted_sources() {
    // A route that asserts nothing: a phone's forged identity is removed...
    let (provider, pbx) = (Ua::new().await, Ua::new().await);
    let srv = server(provider.addr, pbx.addr, "").await;
    let caller = Ua::new().await;
    caller
        .send(
            srv.udp,
            &invite(
                "sip:200@example.com",
                "carol",
                caller.addr,
                "id4",
                1,
                FORGED,
            ),
        )
        .await;
    let (inv, from) = pbx.recv().await;
    for name in [
        HeaderName::PAssertedIdentity,
        HeaderName::PPreferredIdentity,
        HeaderName::RemotePartyId,
    ] {
        assert!(values(&inv, name).is_empty(), "{name:?} removed");
    }
    busy(&pbx, &inv, from).await;
    assert_eq!(caller.recv().await.0.status(), Some(486));
    srv.stop().await;

    // ... while an element in `security.trusted` (here: loopback, the default) passes its
    // identity on unchanged.
    let srv = server(provider.addr, pbx.addr, "\"127.0.0.0/8\"").await;
    caller
        .send(
            srv.udp,
            &invite(
                "sip:200@example.com",
                "carol",
                caller.addr,
                "id5",
                1,
                FORGED,
            ),
        )
        .await;
    let (inv, from) = pbx.recv().await;
    assert_eq!(
        values(&inv, HeaderName::PAssertedIdentity),
        ["<sip:+18005550100@example.com>"]
    );
    assert_eq!(values(&inv, HeaderName::PPreferredIdentity).len(), 1);
    assert_eq!(values(&inv, HeaderName::RemotePartyId).len(), 1);
    busy(&pbx, &inv, from).await;
    assert_eq!(caller.recv().await.0.status(), Some(486));
    srv.stop().await;
}
