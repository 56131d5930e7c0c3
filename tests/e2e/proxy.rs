//! The stateful proxy over real UDP sockets: a caller, sipedge, and callee sockets standing in
//! for the PBX, the provider and registered phones. Asserts what each side receives.

use std::net::SocketAddr;
use std::time::Duration;

use sipedge::sip::{HeaderName, Message, reply};

use crate::harness::{TestServer, Ua, binding};

fn invite(ruri: &str, caller: SocketAddr, call_id: &str, extra: &str) -> String {
    format!(
        "INVITE {ruri} SIP/2.0\r\n\
Via: SIP/2.0/UDP {caller};branch=z9hG4bK-{call_id};rport\r\n\
Max-Forwards: 70\r\n\
From: <sip:alice@example.com>;tag=caller-{call_id}\r\n\
To: <{ruri}>\r\n\
Call-ID: {call_id}\r\n\
CSeq: 1 INVITE\r\n\
Contact: <sip:alice@{caller}>\r\n\
{extra}Content-Length: 0\r\n\r\n"
    )
}

/// An in-dialog request from the caller along the route set.
#[allow(clippy::too_many_arguments)] // one call site per request kind; a struct would hide the fields
fn in_dialog(
    method: &str,
    cseq: u32,
    target: &str,
    caller: SocketAddr,
    call_id: &str,
    to_tag: &str,
    routes: &[String],
    branch: &str,
) -> String {
    let route = if routes.is_empty() {
        String::new()
    } else {
        format!("Route: {}\r\n", routes.join(", "))
    };
    format!(
        "{method} {target} SIP/2.0\r\n\
Via: SIP/2.0/UDP {caller};branch=z9hG4bK-{branch};rport\r\n\
Max-Forwards: 70\r\n\
{route}From: <sip:alice@example.com>;tag=caller-{call_id}\r\n\
To: <sip:callee@example.com>;tag={to_tag}\r\n\
Call-ID: {call_id}\r\n\
CSeq: {cseq} {method}\r\n\
Content-Length: 0\r\n\r\n"
    )
}

fn routes_of(m: &Message) -> Vec<String> {
    m.route_set(HeaderName::RecordRoute)
        .unwrap()
        .iter()
        .map(|r| format!("<{}>", r.uri))
        .collect()
}

/// Record-Route values without their MAC (`;m=`, checked to be there; that it verifies is
/// what the in-dialog requests of these tests prove).
fn unsigned(routes: &[String]) -> Vec<String> {
    routes
        .iter()
        .map(|r| {
            let (uri, mac) = r.rsplit_once(";m=").expect("our Record-Route is signed");
            assert_eq!(mac.len(), 16 + 1, "{r}");
            format!("{uri}>")
        })
        .collect()
}

async fn server_with_pbx(pbx: SocketAddr, extra: &str) -> TestServer {
    TestServer::start(
        "",
        &format!(
            "[[route]]\nname = \"pbx\"\nuser = '^[0-9]{{3,4}}$'\nnext_hop = \"{pbx}\"\nmedia = \"never\"\n{extra}"
        ),
    )
    .await
}

/// Waits (bounded) until the proxy holds no server transaction (client transactions over
/// UDP linger for Timer D, 32 s, to absorb retransmitted finals).
async fn drained(srv: &TestServer) {
    for _ in 0..200 {
        if srv.proxy.transaction_count().0 == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("transactions left: {:?}", srv.proxy.transaction_count());
}

#[tokio::test]
async fn extension_call_through_the_pbx_route() {
    let pbx = Ua::new().await;
    let srv = server_with_pbx(pbx.addr, "").await;
    let caller = Ua::new().await;
    let ruri = "sip:1234@example.com";
    caller
        .send(srv.udp, &invite(ruri, caller.addr, "ext1", ""))
        .await;

    // The PBX gets the INVITE with our Via on top, Record-Route, Max-Forwards capped.
    let (inv, from) = pbx.recv().await;
    assert_eq!(inv.method(), Some("INVITE"));
    assert_eq!(
        inv.request_uri(),
        Some(format!("sip:1234@{}", pbx.addr).as_str()),
        "host:port rewritten to the next hop"
    );
    let vias = inv.vias().unwrap();
    assert_eq!(vias.len(), 2);
    assert_eq!(vias[0].port, Some(srv.udp.port()));
    // The caller's Via says where we got it from (RFC 3261 §18.2.1, RFC 3581).
    assert_eq!(vias[1].param("received"), Some("127.0.0.1"));
    assert_eq!(
        vias[1].param("rport"),
        Some(caller.addr.port().to_string().as_str())
    );
    assert_eq!(
        inv.max_forwards().unwrap(),
        Some(10),
        "capped at server.max_forwards"
    );
    let rr = routes_of(&inv);
    // The caller's Contact is a loopback address, which nathelper's tests call NATed: the
    // Record-Route carries the seed's `;nat=yes` mark and the caller's binding.
    assert_eq!(
        unsigned(&rr),
        vec![format!(
            "<sip:127.0.0.1:{};lr;nat=yes;fc=u~127.0.0.1~{}>",
            srv.udp.port(),
            caller.addr.port()
        )]
    );

    pbx.answer(&inv, from, 180, "pbx-tag").await;
    let (r180, _) = caller.recv().await;
    assert_eq!(r180.status(), Some(180));
    assert_eq!(r180.vias().unwrap().len(), 1, "our Via was popped");
    pbx.answer(&inv, from, 200, "pbx-tag").await;
    let (r200, _) = caller.recv().await;
    assert_eq!(r200.status(), Some(200));
    assert_eq!(r200.to().unwrap().tag(), Some("pbx-tag"));

    // ACK and BYE follow the Record-Route through us to the PBX's Contact.
    let routes = routes_of(&r200);
    let target = format!("sip:callee@{}", pbx.addr);
    caller
        .send(
            srv.udp,
            &in_dialog(
                "ACK",
                1,
                &target,
                caller.addr,
                "ext1",
                "pbx-tag",
                &routes,
                "ack1",
            ),
        )
        .await;
    let (ack, _) = pbx.recv().await;
    assert_eq!(ack.method(), Some("ACK"));
    assert!(
        ack.header(HeaderName::Route).is_none(),
        "our Route was removed"
    );
    caller
        .send(
            srv.udp,
            &in_dialog(
                "BYE",
                2,
                &target,
                caller.addr,
                "ext1",
                "pbx-tag",
                &routes,
                "bye1",
            ),
        )
        .await;
    let (bye, bye_from) = pbx.recv().await;
    assert_eq!(bye.method(), Some("BYE"));
    pbx.answer(&bye, bye_from, 200, "pbx-tag").await;
    let (bye_ok, _) = caller.recv().await;
    assert_eq!(bye_ok.status(), Some(200));
    assert_eq!(bye_ok.cseq().unwrap().method, "BYE");
    srv.stop().await;
}

#[tokio::test]
async fn registered_user_fork_cancel_the_loser() {
    let srv = TestServer::start("", "").await;
    let (desk, mobile) = (Ua::new().await, Ua::new().await);
    // Contacts as the phones would write them (private addresses), reached at their flows.
    srv.set_bindings(
        "bob@example.com",
        vec![
            binding("bob@example.com", "sip:bob@10.0.0.7:5060".into(), desk.addr),
            binding(
                "bob@example.com",
                "sip:bob@10.0.0.8:5060".into(),
                mobile.addr,
            ),
        ],
    )
    .await;
    let caller = Ua::new().await;
    caller
        .send(
            srv.udp,
            &invite("sip:bob@example.com", caller.addr, "fork1", ""),
        )
        .await;
    let (inv_d, from_d) = desk.recv().await;
    let (inv_m, from_m) = mobile.recv().await;
    // The Request-URI is the contact each phone registered.
    assert_eq!(inv_d.request_uri(), Some("sip:bob@10.0.0.7:5060"));
    assert_eq!(inv_m.request_uri(), Some("sip:bob@10.0.0.8:5060"));
    assert_ne!(
        inv_d.top_via().unwrap().branch(),
        inv_m.top_via().unwrap().branch()
    );

    desk.answer(&inv_d, from_d, 180, "desk").await;
    mobile.answer(&inv_m, from_m, 180, "mobile").await;
    let (a, _) = caller.recv().await;
    let (b, _) = caller.recv().await;
    assert_eq!((a.status(), b.status()), (Some(180), Some(180)));
    // The mobile answers: the caller gets the 200, the desk phone gets a CANCEL.
    mobile.answer(&inv_m, from_m, 200, "mobile").await;
    let (ok, _) = caller.recv().await;
    assert_eq!(ok.status(), Some(200));
    assert_eq!(ok.to().unwrap().tag(), Some("mobile"));
    let (cancel, cfrom) = desk.recv().await;
    assert_eq!(cancel.method(), Some("CANCEL"));
    assert_eq!(
        cancel.top_via().unwrap().branch(),
        inv_d.top_via().unwrap().branch()
    );
    desk.answer(&cancel, cfrom, 200, "desk").await;
    desk.answer(&inv_d, from_d, 487, "desk").await;
    // The 487 is ACKed hop by hop and never reaches the caller.
    let (ack, _) = desk.recv().await;
    assert_eq!(ack.method(), Some("ACK"));
    caller.silent().await;
    srv.stop().await;
}

#[tokio::test]
async fn forked_challenges_reach_the_caller_in_one_response() {
    // RFC 3261 §16.7 step 7: both of bob's phones challenge (different realms); the caller
    // gets one 401 with both WWW-Authenticate values and the phones get their ACKs.
    let srv = TestServer::start("", "").await;
    let (desk, mobile) = (Ua::new().await, Ua::new().await);
    srv.set_bindings(
        "bob@example.com",
        vec![
            binding("bob@example.com", "sip:bob@10.0.0.7:5060".into(), desk.addr),
            binding(
                "bob@example.com",
                "sip:bob@10.0.0.8:5060".into(),
                mobile.addr,
            ),
        ],
    )
    .await;
    let caller = Ua::new().await;
    caller
        .send(
            srv.udp,
            &invite("sip:bob@example.com", caller.addr, "forkauth1", ""),
        )
        .await;
    for (ua, realm) in [(&desk, "desk.example"), (&mobile, "mobile.example")] {
        let (inv, from) = ua.recv().await;
        let value = format!("Digest realm=\"{realm}\", nonce=\"{realm}-n\"");
        let resp = reply::response(
            &inv,
            from,
            401,
            "Unauthorized",
            &[("WWW-Authenticate", &value)],
        );
        ua.sock.send_to(&resp, from).await.unwrap();
        let (ack, _) = ua.recv().await;
        assert_eq!(ack.method(), Some("ACK"), "the proxy ACKs each challenge");
    }
    let (up, _) = caller.recv().await;
    assert_eq!(up.status(), Some(401));
    let mut realms: Vec<String> = up
        .headers_named(HeaderName::WwwAuthenticate)
        .map(|h| up.str_at(h.value.clone()).unwrap().to_owned())
        .collect();
    realms.sort();
    assert_eq!(
        realms,
        vec![
            "Digest realm=\"desk.example\", nonce=\"desk.example-n\"".to_owned(),
            "Digest realm=\"mobile.example\", nonce=\"mobile.example-n\"".to_owned(),
        ]
    );
    caller.silent().await;
    srv.stop().await;
}

/// A call on the PBX route that rang and was cancelled by the caller; the PBX has answered
/// the forwarded CANCEL with 200 and still owes the INVITE its 487.
struct Cancelled {
    srv: TestServer,
    pbx: Ua,
    caller: Ua,
    /// The INVITE as the PBX got it, and where from.
    inv: (Message, SocketAddr),
    /// The CANCEL as the PBX got it, and where from.
    cancel: (Message, SocketAddr),
}

async fn ring_then_cancel(call_id: &str) -> Cancelled {
    let pbx = Ua::new().await;
    let srv = server_with_pbx(pbx.addr, "").await;
    let caller = Ua::new().await;
    let inv_text = invite("sip:200@example.com", caller.addr, call_id, "");
    caller.send(srv.udp, &inv_text).await;
    let (inv, from) = pbx.recv().await;
    pbx.answer(&inv, from, 180, "pbx").await;
    assert_eq!(caller.recv().await.0.status(), Some(180));
    // CANCEL: same branch as the INVITE, CSeq method CANCEL.
    let cancel = inv_text
        .replacen("INVITE sip:", "CANCEL sip:", 1)
        .replace("CSeq: 1 INVITE", "CSeq: 1 CANCEL");
    caller.send(srv.udp, &cancel).await;
    let (c200, _) = caller.recv().await;
    assert_eq!(
        (c200.status(), c200.cseq().unwrap().method),
        (Some(200), "CANCEL")
    );
    let (fwd_cancel, cfrom) = pbx.recv().await;
    assert_eq!(fwd_cancel.method(), Some("CANCEL"));
    pbx.answer(&fwd_cancel, cfrom, 200, "pbx").await;
    Cancelled {
        srv,
        pbx,
        caller,
        inv: (inv, from),
        cancel: (fwd_cancel, cfrom),
    }
}

#[tokio::test]
async fn caller_cancels_while_ringing() {
    let c = ring_then_cancel("cxl1").await;
    c.pbx.answer(&c.inv.0, c.inv.1, 487, "pbx").await;
    let (r487, _) = c.caller.recv().await;
    assert_eq!(r487.status(), Some(487));
    assert_eq!(
        c.pbx.recv().await.0.method(),
        Some("ACK"),
        "hop-by-hop ACK for the 487"
    );
    c.srv.stop().await;
}

/// A callee that builds its 487 from our CANCEL (one Via: ours, as an old SIPp scenario did):
/// RFC 3261 §16.7 step 3, such a response is not forwarded; the caller gets our own 487.
#[tokio::test]
async fn final_response_with_only_our_via_is_answered_by_us() {
    let c = ring_then_cancel("cxl2").await;
    let (fwd_cancel, cfrom) = &c.cancel;
    let bad = String::from_utf8(reply::response(fwd_cancel, *cfrom, 487, "Terminated", &[]))
        .unwrap()
        .replace("CSeq: 1 CANCEL", "CSeq: 1 INVITE");
    c.pbx.send(*cfrom, &bad).await;
    let (r487, _) = c.caller.recv().await;
    assert_eq!(r487.status(), Some(487));
    let vias = r487.vias().unwrap();
    assert_eq!(vias.len(), 1);
    assert_eq!(
        vias[0].branch(),
        Some("z9hG4bK-cxl2"),
        "the caller's own Via"
    );
    assert_eq!(c.pbx.recv().await.0.method(), Some("ACK"));
    c.srv.stop().await;
}

#[tokio::test]
async fn unanswered_invite_times_out_with_408() {
    let pbx = Ua::new().await;
    let srv = server_with_pbx(pbx.addr, "").await;
    drop(srv);
    let srv = TestServer::start(
        "fr_inv_timer = 1\nfr_timer = 1",
        &format!(
            "[[route]]\nname = \"pbx\"\nuser = '^[0-9]{{3,4}}$'\nnext_hop = \"{}\"\n",
            pbx.addr
        ),
    )
    .await;
    let caller = Ua::new().await;
    caller
        .send(
            srv.udp,
            &invite("sip:300@example.com", caller.addr, "to1", ""),
        )
        .await;
    let (inv, from) = pbx.recv().await;
    pbx.answer(&inv, from, 180, "pbx").await;
    assert_eq!(caller.recv().await.0.status(), Some(180));
    // No final within fr_inv_timer: 408 upstream, CANCEL downstream.
    let (r, _) = caller.recv().await;
    assert_eq!(r.status(), Some(408));
    let (cancel, _) = pbx.recv().await;
    assert_eq!(cancel.method(), Some("CANCEL"));
    srv.stop().await;
}

#[tokio::test]
async fn retransmitted_invite_is_absorbed_and_transactions_drain() {
    let pbx = Ua::new().await;
    let srv = server_with_pbx(pbx.addr, "").await;
    let caller = Ua::new().await;
    let text = invite("sip:400@example.com", caller.addr, "rtx1", "");
    caller.send(srv.udp, &text).await;
    let (inv, from) = pbx.recv().await;
    pbx.answer(&inv, from, 486, "pbx").await;
    let (busy, _) = caller.recv().await;
    assert_eq!(busy.status(), Some(486));
    assert_eq!(pbx.recv().await.0.method(), Some("ACK"));
    // The caller did not see the 486 yet and retransmits: it gets the 486 again from our
    // server transaction, and the PBX sees nothing new.
    caller.send(srv.udp, &text).await;
    let (again, _) = caller.recv().await;
    assert_eq!(again.status(), Some(486));
    pbx.silent().await;
    // The caller's ACK for the 486 is absorbed by our transaction.
    let ack = text
        .replacen("INVITE sip:", "ACK sip:", 1)
        .replace("CSeq: 1 INVITE", "CSeq: 1 ACK");
    caller.send(srv.udp, &ack).await;
    pbx.silent().await;
    drained(&srv).await;
    srv.stop().await;
}

/// Once a transaction has its final, its task ends and the shared table of finished
/// transactions answers for it until its RFC timers end (src/proxy/linger.rs): a retransmitted
/// non-INVITE request gets the final again, a retransmitted non-2xx final gets our ACK again,
/// a retransmitted 2xx still reaches the caller, retransmitted finals of a non-INVITE are
/// absorbed, a late CANCEL gets its 200 and goes no further.
#[tokio::test]
async fn finished_transactions_answer_from_the_shared_table() {
    let pbx = Ua::new().await;
    let srv = server_with_pbx(pbx.addr, "").await;
    let caller = Ua::new().await;
    let ruri = "sip:1234@example.com";
    let text = invite(ruri, caller.addr, "fin1", "");
    caller.send(srv.udp, &text).await;
    let (inv, inv_from) = pbx.recv().await;
    pbx.answer(&inv, inv_from, 200, "pbx-tag").await;
    let (r200, _) = caller.recv().await;
    assert_eq!(r200.status(), Some(200));
    // The INVITE's server and client transactions are in the table now (RFC 6026 Accepted,
    // Timers L and M), not in a task.
    srv.finished_are((1, 1)).await;
    // The callee retransmits its 2xx: it still reaches the caller (RFC 6026 §8.4).
    pbx.answer(&inv, inv_from, 200, "pbx-tag").await;
    let (again, _) = caller.recv().await;
    assert_eq!(again.status(), Some(200));
    assert_eq!(again.to().unwrap().tag(), Some("pbx-tag"));
    assert_eq!(again.vias().unwrap().len(), 1, "our Via popped");
    // The caller retransmits its INVITE: absorbed (Accepted), nothing goes anywhere.
    caller.send(srv.udp, &text).await;
    pbx.silent().await;
    caller.silent().await;
    // A late CANCEL: its 200 from us, nothing downstream.
    let cancel = text
        .replacen("INVITE sip:", "CANCEL sip:", 1)
        .replace("CSeq: 1 INVITE", "CSeq: 1 CANCEL");
    caller.send(srv.udp, &cancel).await;
    let (c200, _) = caller.recv().await;
    assert_eq!(c200.status(), Some(200));
    assert_eq!(c200.cseq().unwrap().method, "CANCEL");
    pbx.silent().await;

    // A BYE: its 200 comes back, then the caller's retransmitted BYE gets that 200 again
    // from the table, and the callee's retransmitted 200 is absorbed.
    let routes = routes_of(&r200);
    let target = format!("sip:callee@{}", pbx.addr);
    let bye_text = in_dialog(
        "BYE",
        2,
        &target,
        caller.addr,
        "fin1",
        "pbx-tag",
        &routes,
        "finbye",
    );
    caller.send(srv.udp, &bye_text).await;
    let (bye, bye_from) = pbx.recv().await;
    assert_eq!(bye.method(), Some("BYE"));
    pbx.answer(&bye, bye_from, 200, "pbx-tag").await;
    let (bye_ok, _) = caller.recv().await;
    assert_eq!(bye_ok.status(), Some(200));
    srv.finished_are((2, 2)).await;
    caller.send(srv.udp, &bye_text).await;
    let (bye_again, _) = caller.recv().await;
    assert_eq!(bye_again.status(), Some(200));
    assert_eq!(bye_again.cseq().unwrap().method, "BYE");
    pbx.silent().await;
    pbx.answer(&bye, bye_from, 200, "pbx-tag").await;
    caller.silent().await;

    // A busy callee: our ACK for its 486, and again for its retransmitted 486.
    let busy_text = invite("sip:4000@example.com", caller.addr, "fin2", "");
    caller.send(srv.udp, &busy_text).await;
    let (inv2, inv2_from) = pbx.recv().await;
    pbx.answer(&inv2, inv2_from, 486, "pbx-busy").await;
    assert_eq!(pbx.recv().await.0.method(), Some("ACK"));
    let (busy, _) = caller.recv().await;
    assert_eq!(busy.status(), Some(486));
    let ack = busy_text
        .replacen("INVITE sip:", "ACK sip:", 1)
        .replace("CSeq: 1 INVITE", "CSeq: 1 ACK");
    caller.send(srv.udp, &ack).await;
    // ACKed: the server side is Confirmed and goes to the table as well.
    srv.finished_are((3, 3)).await;
    pbx.answer(&inv2, inv2_from, 486, "pbx-busy").await;
    let (ack_again, _) = pbx.recv().await;
    assert_eq!(ack_again.method(), Some("ACK"));
    caller.silent().await;
    srv.stop().await;
}

/// Both parties behind NAT (private Contacts): in-dialog requests reach each one at its NAT
/// binding, recorded in our Record-Route, while the Request-URI stays the Contact it sent
/// (no Contact rewriting; opensips#1566/#3769 are what rewriting breaks).
#[tokio::test]
async fn in_dialog_requests_follow_the_nat_bindings() {
    let srv = TestServer::start("", "").await;
    let phone = Ua::new().await;
    srv.set_bindings(
        "bob@example.com",
        vec![binding(
            "bob@example.com",
            "sip:bob@10.0.0.7:5060".into(),
            phone.addr,
        )],
    )
    .await;
    let caller = Ua::new().await;
    let text = invite("sip:bob@example.com", caller.addr, "nat1", "").replace(
        &format!("Contact: <sip:alice@{}>", caller.addr),
        "Contact: <sip:alice@192.168.1.5:5060>",
    );
    caller.send(srv.udp, &text).await;
    let (inv, from) = phone.recv().await;
    let rr = routes_of(&inv);
    assert_eq!(rr.len(), 1);
    assert!(
        rr[0].contains(&format!(
            ";fc=u~{}~{}",
            caller.addr.ip(),
            caller.addr.port()
        )),
        "{rr:?}"
    );
    assert!(
        rr[0].contains(&format!(";fe=u~{}~{}", phone.addr.ip(), phone.addr.port())),
        "{rr:?}"
    );
    assert!(rr[0].contains(";nat=yes"));

    // The phone answers with its private Contact.
    let ok = reply::response(
        &inv,
        from,
        200,
        "OK",
        &[
            ("Record-Route", &rr[0]),
            ("Contact", "<sip:bob@10.0.0.7:5060>"),
        ],
    );
    let ok = String::from_utf8(ok)
        .unwrap()
        .replace(&reply::local_tag(&inv), "bob-tag");
    phone.sock.send_to(ok.as_bytes(), from).await.unwrap();
    let (r200, _) = caller.recv().await;
    assert_eq!(r200.status(), Some(200));

    // Caller → phone: the Request-URI is the phone's private Contact; it arrives at its binding.
    let routes = routes_of(&r200);
    caller
        .send(
            srv.udp,
            &in_dialog(
                "BYE",
                2,
                "sip:bob@10.0.0.7:5060",
                caller.addr,
                "nat1",
                "bob-tag",
                &routes,
                "natbye",
            ),
        )
        .await;
    let (bye, _) = phone.recv().await;
    assert_eq!(bye.method(), Some("BYE"));
    assert_eq!(
        bye.request_uri(),
        Some("sip:bob@10.0.0.7:5060"),
        "Request-URI untouched"
    );

    // Phone → caller: an in-dialog INFO to the caller's private Contact reaches the caller.
    let info = format!(
        "INFO sip:alice@192.168.1.5:5060 SIP/2.0\r\n\
Via: SIP/2.0/UDP 10.0.0.7:5060;branch=z9hG4bK-natinfo;rport\r\n\
Max-Forwards: 70\r\n\
Route: {}\r\n\
From: <sip:bob@example.com>;tag=bob-tag\r\n\
To: <sip:alice@example.com>;tag=caller-nat1\r\n\
Call-ID: nat1\r\n\
CSeq: 1 INFO\r\n\
Content-Length: 0\r\n\r\n",
        rr[0]
    );
    phone.send(srv.udp, &info).await;
    let (got, _) = caller.recv().await;
    assert_eq!(got.method(), Some("INFO"));
    assert_eq!(got.request_uri(), Some("sip:alice@192.168.1.5:5060"));
    srv.stop().await;
}
