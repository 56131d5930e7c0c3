//! Two instances sharing one PostgreSQL (README "Several instances"; needs the `postgres`
//! feature and `SIPEDGE_TEST_POSTGRES_URL`, as `scripts/postgres-test.sh` sets; the test
//! empties that database). A registration at A is in B's memory at once (LISTEN/NOTIFY); a
//! call arriving at B reaches the phone through A, from A's socket, with A's and B's
//! Record-Route; after the de-registration at A, B answers 404 within a second; a forged
//! inter-instance Route is refused at A. `scripts/multi-test.sh` does the same with real NAT.

use std::time::Duration;

use sipedge::registrar::location::LocationService;
use sipedge::sip::HeaderName;
use tokio::time::Instant;

use crate::harness::{TestServer, Ua, request};
use crate::registrar::{Phone, add_user};

const AOR: &str = "dora@example.com";

/// Polls `cond` every 20 ms for up to a second.
async fn within_a_second(mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + Duration::from_secs(1);
    while Instant::now() < end {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cond()
}

#[tokio::test]
async fn two_instances_share_registrations_and_forward_to_the_owner() {
    let url = std::env::var("SIPEDGE_TEST_POSTGRES_URL").expect(
        "built with --features postgres: set SIPEDGE_TEST_POSTGRES_URL (scripts/postgres-test.sh)",
    );
    {
        let s = sipedge::store::Store::connect(&url).await.unwrap();
        s.migrate().await.unwrap();
        s.reset_for_tests().await.unwrap();
        s.close().await;
    }
    let a = TestServer::start_on(&url, "127.0.0.1:0", "instance_id = \"a\"", "").await;
    let b = TestServer::start_on(&url, "127.0.0.1:0", "instance_id = \"b\"", "").await;
    add_user(&a, "dora", "pw").await;

    // 1. Register at A, from a "NATed" phone: a private Contact, reached at its source.
    let mut phone = Phone::new("dora").await;
    let contact = "Contact: <sip:dora@10.0.0.5:5060>\r\n";
    let r = phone.register(&a, "dora", "pw", contact).await;
    assert_eq!(r.status(), Some(200));
    let now = || sipedge::clock::Clock::unix(&sipedge::clock::SystemClock);
    assert!(
        within_a_second(|| b.location.lookup(AOR, now()).len() == 1).await,
        "A's registration in B's memory within a second"
    );
    assert_eq!(b.location.lookup(AOR, now())[0].instance, "a");

    // 2. A call arriving at B: through A, to the phone's binding, from A's socket.
    let caller = Ua::new().await;
    caller
        .send(
            b.udp,
            &request("INVITE", "sip:dora@example.com", caller.addr, "multi-1", ""),
        )
        .await;
    let phone_ua = Ua {
        sock: phone.sock,
        addr: phone.addr,
    };
    let (invite, from) = phone_ua.recv().await;
    assert_eq!(
        from, a.udp,
        "the phone hears from A, where its NAT binding points"
    );
    assert_eq!(invite.method(), Some("INVITE"));
    assert_eq!(invite.request_uri(), Some("sip:dora@10.0.0.5:5060"));
    assert_eq!(
        invite.headers_named(HeaderName::Route).count(),
        0,
        "A popped its Route"
    );
    let rr: Vec<String> = invite
        .headers_named(HeaderName::RecordRoute)
        .map(|h| invite.str_at(h.value.clone()).unwrap().to_owned())
        .collect();
    let rr = rr.join(", ");
    let (a_port, b_port) = (a.udp.port(), b.udp.port());
    let (at_a, at_b) = (
        rr.find(&format!("127.0.0.1:{a_port};")),
        rr.find(&format!("127.0.0.1:{b_port};")),
    );
    assert!(
        matches!((at_a, at_b), (Some(x), Some(y)) if x < y),
        "A's Record-Route then B's: {rr}"
    );
    assert!(
        rr.contains(";fe=u~127.0.0.1~"),
        "A records the phone's binding: {rr}"
    );
    phone_ua.answer(&invite, from, 200, "callee-1").await;
    let (ok, _) = caller.recv().await;
    assert_eq!(
        ok.status(),
        Some(200),
        "the caller gets the phone's 200 through B"
    );

    // 3. A forged inter-instance Route from outside, at A: refused.
    let forged = request(
        "INVITE",
        "sip:dora@10.0.0.5:5060",
        caller.addr,
        "multi-forged",
        &format!(
            "Route: <sip:127.0.0.1:{a_port};lr;ob=u~127.0.0.1~{};m=0123456789abcdef>\r\n",
            phone_ua.addr.port()
        ),
    );
    caller.send(a.udp, &forged).await;
    let (r, _) = caller.recv().await;
    assert_eq!(r.status(), Some(403), "{r:?}");
    phone_ua.silent().await;

    // 4. De-registration at A: B forgets the binding within a second and answers 404.
    let mut again = Phone::new("dora").await;
    let r = again
        .register(&a, "dora", "pw", &format!("{contact}Expires: 0\r\n"))
        .await;
    assert_eq!(r.status(), Some(200));
    let t0 = Instant::now();
    assert!(within_a_second(|| b.location.lookup(AOR, now()).is_empty()).await);
    caller
        .send(
            b.udp,
            &request("INVITE", "sip:dora@example.com", caller.addr, "multi-2", ""),
        )
        .await;
    let (r, _) = caller.recv().await;
    assert_eq!(r.status(), Some(404));
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());

    // 5. The listening connections die (a database restart, a proxy timeout): the instances
    // reconnect and read everything again, so a change made meanwhile still reaches B.
    let killed: i64 = sqlx::query_scalar(
        "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE datname = current_database() AND query LIKE 'LISTEN%'",
    )
    .fetch_one(&sqlx::PgPool::connect(&url).await.unwrap())
    .await
    .unwrap();
    assert!(killed >= 2, "both instances listen: {killed}");
    let erin = "erin@example.com";
    let mut binding = crate::harness::binding(erin, "sip:erin@10.0.0.7".into(), phone_ua.addr);
    binding.instance = "a".into();
    a.set_bindings(erin, vec![binding]).await;
    let end = Instant::now() + Duration::from_secs(5);
    while b.location.lookup(erin, now()).is_empty() && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        b.location.lookup(erin, now()).len(),
        1,
        "seen after the reconnection"
    );
    a.stop().await;
    b.stop().await;
}
