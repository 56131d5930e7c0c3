//! The store on every backend this build has: SQLite always, PostgreSQL with the `postgres`
//! feature (then `SIPEDGE_TEST_POSTGRES_URL` must name a database the test may write to;
//! `scripts/postgres-test.sh` starts one), MySQL/MariaDB with the `mysql` feature
//! (`SIPEDGE_TEST_MYSQL_URL`, `scripts/mariadb-test.sh`). Asserts what is in the database, not what the code meant to write.

use sipedge::registrar::location::Binding;
use sipedge::store::{Store, StoreError, Subscriber};
use sipedge::transport::Proto;

use crate::harness::fresh_db;

/// Every backend to test, freshly migrated and emptied.
async fn backends() -> Vec<(&'static str, Store)> {
    let mut out = Vec::new();
    let sqlite = Store::connect(&fresh_db()).await.unwrap();
    sqlite.migrate().await.unwrap();
    out.push(("sqlite", sqlite));
    #[cfg(feature = "postgres")]
    {
        let url = std::env::var("SIPEDGE_TEST_POSTGRES_URL").expect(
            "built with --features postgres: set SIPEDGE_TEST_POSTGRES_URL=postgres://USER:PW@HOST/DB \
             (a scratch database; .ci/run creates one)",
        );
        let pg = Store::connect(&url).await.unwrap();
        pg.migrate().await.unwrap();
        pg.reset_for_tests().await.unwrap();
        out.push(("postgres", pg));
    }
    #[cfg(feature = "mysql")]
    {
        let url = std::env::var("SIPEDGE_TEST_MYSQL_URL").expect(
            "built with --features mysql: set SIPEDGE_TEST_MYSQL_URL=mysql://USER:PW@HOST/DB \
             (a scratch database; scripts/mariadb-test.sh creates one)",
        );
        let my = Store::connect(&url).await.unwrap();
        my.migrate().await.unwrap();
        my.reset_for_tests().await.unwrap();
        out.push(("mysql", my));
    }
    out
}

fn binding(aor: &str, contact: &str, expires: u64) -> Binding {
    Binding {
        aor: aor.into(),
        contact: contact.into(),
        received: "203.0.113.7:40123".parse().unwrap(),
        nated: false,
        transport: Proto::Tcp,
        local_socket: "198.51.100.1:5060".parse().unwrap(),
        instance: "edge-1".into(),
        expires,
        q: 750,
        call_id: "cid".into(),
        cseq: 42,
        user_agent: "Phone/1.0".into(),
        path: String::new(),
        instance_urn: "<urn:uuid:1>".into(),
        updated: 100,
    }
}

#[tokio::test]
async fn store_contract_on_every_backend() {
    for (name, store) in backends().await {
        // Migrations are idempotent.
        assert_eq!(store.migrate().await.unwrap(), 0, "{name}");

        // Subscribers: add, duplicate refused, passwd, list, delete.
        let s = Subscriber {
            username: "alice".into(),
            domain: "example.com".into(),
            ha1_md5: "a".repeat(32),
            ha1_sha256: Some("b".repeat(64)),
            created: 1,
            caller_id: None,
        };
        store.add_subscriber(&s).await.unwrap();
        assert!(
            matches!(store.add_subscriber(&s).await, Err(StoreError::Exists(_))),
            "{name}"
        );
        assert!(
            store
                .set_subscriber_hashes("alice", "example.com", "c", "d")
                .await
                .unwrap()
        );
        assert!(
            !store
                .set_subscriber_hashes("nobody", "example.com", "c", "d")
                .await
                .unwrap()
        );
        let got = store
            .subscriber("alice", "example.com")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (got.ha1_md5.as_str(), got.ha1_sha256.as_deref()),
            ("c", Some("d")),
            "{name}"
        );
        // The caller ID: set, read back, kept by an import without one, cleared.
        assert!(
            store
                .set_caller_id("alice", "example.com", Some("+15551230001"))
                .await
                .unwrap()
        );
        assert!(
            !store
                .set_caller_id("nobody", "example.com", Some("1"))
                .await
                .unwrap()
        );
        let caller_id = |store: &Store| {
            let store = store.clone();
            async move {
                store
                    .subscriber("alice", "example.com")
                    .await
                    .unwrap()
                    .unwrap()
                    .caller_id
            }
        };
        assert_eq!(
            caller_id(&store).await.as_deref(),
            Some("+15551230001"),
            "{name}"
        );
        store
            .upsert_subscribers(std::slice::from_ref(&s))
            .await
            .unwrap();
        assert_eq!(
            caller_id(&store).await.as_deref(),
            Some("+15551230001"),
            "{name}: an import without a caller ID keeps it"
        );
        let with_id = Subscriber {
            caller_id: Some("2002".into()),
            ..s.clone()
        };
        store
            .upsert_subscribers(std::slice::from_ref(&with_id))
            .await
            .unwrap();
        assert_eq!(caller_id(&store).await.as_deref(), Some("2002"), "{name}");
        assert!(
            store
                .set_caller_id("alice", "example.com", None)
                .await
                .unwrap()
        );
        assert_eq!(
            store
                .upsert_subscribers(std::slice::from_ref(&s))
                .await
                .unwrap(),
            1
        );
        assert_eq!(
            store.list_subscribers().await.unwrap(),
            vec![s.clone()],
            "{name}"
        );

        // Bindings: every column round-trips; upsert replaces; remove deletes.
        let b1 = binding("alice@example.com", "sip:alice@10.0.0.2:5060", 1000);
        let b2 = binding("alice@example.com", "sip:alice@10.0.0.3:5060", 2000);
        store
            .save_bindings("alice@example.com", &[b1.clone(), b2.clone()], &[])
            .await
            .unwrap();
        let mut loaded = store.load_bindings(0).await.unwrap();
        loaded.sort_by(|a, b| a.contact.cmp(&b.contact));
        assert_eq!(loaded, vec![b1.clone(), b2.clone()], "{name}");
        let mut b1_new = b1.clone();
        b1_new.expires = 3000;
        b1_new.cseq = 43;
        store
            .save_bindings(
                "alice@example.com",
                &[b1_new.clone()],
                std::slice::from_ref(&b2.contact),
            )
            .await
            .unwrap();
        assert_eq!(
            store.load_bindings(0).await.unwrap(),
            vec![b1_new.clone()],
            "{name}"
        );
        // Only live bindings load; expired ones are deleted.
        assert!(
            store.load_bindings(3000).await.unwrap().is_empty(),
            "{name}"
        );
        assert_eq!(store.delete_expired(3000).await.unwrap(), 1, "{name}");

        // The nonce secret: the first writer wins, later ones read it.
        let first = store.meta_get_or_insert("k", "one").await.unwrap();
        let second = store.meta_get_or_insert("k", "two").await.unwrap();
        assert_eq!((first.as_str(), second.as_str()), ("one", "one"), "{name}");

        // Deleting a subscriber removes their bindings too.
        store
            .save_bindings("alice@example.com", &[b1_new], &[])
            .await
            .unwrap();
        assert!(
            store
                .delete_subscriber("alice", "example.com")
                .await
                .unwrap()
        );
        assert!(store.load_bindings(0).await.unwrap().is_empty(), "{name}");

        // Names compare exactly on every backend (MySQL's default collation would not).
        let upper = Subscriber {
            username: "Bob".into(),
            ..s.clone()
        };
        let lower = Subscriber {
            username: "bob".into(),
            ..s.clone()
        };
        store.add_subscriber(&upper).await.unwrap();
        store.add_subscriber(&lower).await.unwrap();
        assert_eq!(store.list_subscribers().await.unwrap().len(), 2, "{name}");
        assert_eq!(
            store.subscriber("bob", "example.com").await.unwrap(),
            Some(lower),
            "{name}"
        );

        // Call records: every column written, the summary read back.
        let cdr = sipedge::store::Cdr {
            call_id: "call-1@example.com".into(),
            from_uri: "sip:alice@example.com".into(),
            to_uri: "sip:bob@example.com".into(),
            start: 10,
            answer: None,
            end: 20,
            status: 487,
            reason: "cancel".into(),
            caller: (5, 800, 1, 2.5),
            callee: (7, 1120, 0, 0.0),
            request_uri: "sip:bob@example.com".into(),
            route: "location".into(),
            auth_user: "alice".into(),
            source: "192.0.2.1:5060".into(),
            outcome: "cancelled".into(),
            hangup: String::new(),
            relayed: true,
        };
        store.insert_cdr(&cdr).await.unwrap();
        assert_eq!(
            store.cdr_summary("call-1@example.com").await.unwrap(),
            vec![("cancel".to_owned(), 487, 5, 7)],
            "{name}"
        );
        // Read back whole, through the export query.
        assert_eq!(
            store.cdrs_of("call-1@example.com").await.unwrap(),
            vec![cdr.clone()],
            "{name}"
        );
        assert_eq!(store.cdrs_since(10, 0).await.unwrap(), vec![cdr.clone()]);
        assert!(store.cdrs_since(11, 0).await.unwrap().is_empty(), "{name}");
        assert!(store.cdrs_since(0, 1).await.unwrap().is_empty(), "{name}");
        // Several in one statement (the CDR writer's group commit), each read back whole.
        let batch: Vec<_> = (2..5)
            .map(|i| sipedge::store::Cdr {
                call_id: format!("call-{i}@example.com"),
                start: 100 + i,
                end: 200 + i,
                status: 200,
                answer: Some(150),
                reason: "bye".into(),
                hangup: "caller".into(),
                relayed: false,
                ..cdr.clone()
            })
            .collect();
        store.insert_cdrs(&batch).await.unwrap();
        for c in &batch {
            assert_eq!(
                store.cdrs_of(&c.call_id).await.unwrap(),
                vec![c.clone()],
                "{name}"
            );
        }
        assert_eq!(store.cdrs_since(100, 0).await.unwrap().len(), 3, "{name}");
        store.close().await;
    }
}
