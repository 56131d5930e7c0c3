//! The registrar over real UDP: 401 challenge → authenticated REGISTER → 200 listing the
//! contact; the binding in the store; wrong password; To ≠ authenticated user; 423; Contact *;
//! and a restart on the same database that still serves the binding. The digest response is
//! computed here with the md-5 crate, independently of sipedge's auth module.

use sipedge::registrar::location::LocationService;
use std::net::SocketAddr;

use md5::{Digest, Md5};
use sha2::Sha256;
use sipedge::sip::{ContactValue, HeaderName, Message};
use sipedge::store::Subscriber;
use tokio::net::UdpSocket;

use crate::harness::{TestServer, udp_exchange, udp_request};

fn md5_hex(s: &str) -> String {
    Md5::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub(crate) async fn add_user(srv: &TestServer, user: &str, pw: &str) {
    srv.store
        .add_subscriber(&Subscriber {
            username: user.into(),
            domain: "example.com".into(),
            ha1_md5: md5_hex(&format!("{user}:example.com:{pw}")),
            ha1_sha256: Some("unused".into()),
            created: 0,
            caller_id: None,
        })
        .await
        .unwrap();
}

/// The value of a quoted or token parameter in a challenge.
fn challenge_param(ch: &str, name: &str) -> Option<String> {
    let at = ch.find(&format!("{name}="))? + name.len() + 1;
    let rest = &ch[at..];
    Some(match rest.strip_prefix('"') {
        Some(q) => q[..q.find('"')?].to_owned(),
        None => rest.split([',', ' ']).next()?.to_owned(),
    })
}

pub(crate) struct Phone {
    pub(crate) sock: UdpSocket,
    pub(crate) addr: SocketAddr,
    user: String,
    call_id: String,
    cseq: u32,
    /// The last authenticated REGISTER sent.
    last_sent: String,
    /// The Via sent-by and parameters (default: our socket, with `;rport`).
    via: String,
}

impl Phone {
    pub(crate) async fn new(user: &str) -> Self {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        Self {
            sock,
            addr,
            user: user.into(),
            call_id: format!("reg-{user}-{}", addr.port()),
            cseq: 0,
            last_sent: String::new(),
            via: format!("{addr};rport"),
        }
    }

    fn register_text(&mut self, to_user: &str, extra: &str) -> String {
        self.cseq += 1;
        let (via, user, cseq, call_id) = (&self.via, &self.user, self.cseq, &self.call_id);
        format!(
            "REGISTER sip:example.com SIP/2.0\r\n\
Via: SIP/2.0/UDP {via};branch=z9hG4bK-{call_id}-{cseq}\r\n\
Max-Forwards: 70\r\n\
From: <sip:{user}@example.com>;tag=t{cseq}\r\n\
To: <sip:{to_user}@example.com>\r\n\
Call-ID: {call_id}\r\n\
CSeq: {cseq} REGISTER\r\n\
{extra}Content-Length: 0\r\n\r\n"
        )
    }

    /// REGISTER, answer the 401 with credentials for `password`, return the final response.
    pub(crate) async fn register(
        &mut self,
        srv: &TestServer,
        to_user: &str,
        password: &str,
        extra: &str,
    ) -> Message {
        let first = self.register_text(to_user, extra);
        // A restarted server may ping this phone's binding at any time: skip its OPTIONS.
        let r = udp_request(&self.sock, srv.udp, first.as_bytes()).await;
        assert_eq!(r.status(), Some(401), "first REGISTER is challenged");
        let ch = r
            .header_str(HeaderName::WwwAuthenticate)
            .unwrap()
            .to_owned();
        assert!(ch.starts_with("Digest "), "{ch}");
        let realm = challenge_param(&ch, "realm").unwrap();
        let nonce = challenge_param(&ch, "nonce").unwrap();
        assert_eq!(realm, "example.com");
        let uri = "sip:example.com";
        let (nc, cnonce) = ("00000001", "0a4f113b");
        let ha1 = md5_hex(&format!("{}:{realm}:{password}", self.user));
        let ha2 = md5_hex(&format!("REGISTER:{uri}"));
        let response = md5_hex(&format!("{ha1}:{nonce}:{nc}:{cnonce}:auth:{ha2}"));
        let auth = format!(
            "Authorization: Digest username=\"{}\", realm=\"{realm}\", nonce=\"{nonce}\", uri=\"{uri}\", \
response=\"{response}\", algorithm=MD5, qop=auth, nc={nc}, cnonce=\"{cnonce}\"\r\n",
            self.user
        );
        let second = self.register_text(to_user, &format!("{auth}{extra}"));
        self.last_sent = second.clone();
        udp_request(&self.sock, srv.udp, second.as_bytes()).await
    }
}

fn contact_uris(m: &Message) -> Vec<String> {
    m.contacts()
        .unwrap()
        .into_iter()
        .filter_map(|c| match c {
            ContactValue::Addr(a) => Some(format!(
                "{};expires={}",
                a.uri,
                a.param("expires").unwrap_or("?")
            )),
            ContactValue::Star => None,
        })
        .collect()
}

/// Issue #11: a phone behind NAT whose REGISTER has no `rport` (its Via names its private
/// address and port) gets the 401 and the 200 at the address the REGISTER came from
/// (force_rport, the one responder), not at its Via, which cannot be reached.
#[tokio::test]
async fn natted_register_without_rport_is_answered_at_its_source() {
    let srv = TestServer::start("", "").await;
    add_user(&srv, "carol", "pw").await;
    let mut phone = Phone::new("carol").await;
    phone.via = "10.0.0.9:5090".into();
    let contact = "sip:carol@10.0.0.9:5090";
    // `udp_exchange` receives on the phone's socket: a reply sent to 10.0.0.9:5090 would
    // never arrive and the exchange would time out.
    let r = phone
        .register(&srv, "carol", "pw", &format!("Contact: <{contact}>\r\n"))
        .await;
    assert_eq!(r.status(), Some(200));
    assert_eq!(r.top_via().unwrap().param("received"), Some("127.0.0.1"));
    // The binding keeps the private Contact, reached at the NAT mapping it came from.
    let rows = srv.store.load_bindings(0).await.unwrap();
    assert_eq!(
        (rows[0].contact.as_str(), rows[0].received),
        (contact, phone.addr)
    );
    srv.stop().await;
}

/// The counters registry sees what the layers did: the binding, a REGISTER whose
/// authentication with a wrong password counts as one failure, and the exposition is
/// Prometheus text.
#[tokio::test]
async fn the_registry_reports_every_layer() {
    let srv = TestServer::start("", "").await;
    add_user(&srv, "dave", "pw").await;
    assert_eq!(srv.metrics.get("registrar_bindings"), Some(0));
    let mut phone = Phone::new("dave").await;
    let r = phone
        .register(&srv, "dave", "pw", "Contact: <sip:dave@10.0.0.7:5060>\r\n")
        .await;
    assert_eq!(r.status(), Some(200));
    let r = phone
        .register(
            &srv,
            "dave",
            "wrong",
            "Contact: <sip:dave@10.0.0.7:5060>\r\n",
        )
        .await;
    assert_eq!(r.status(), Some(401));
    srv.metrics.refresh().await;
    assert_eq!(srv.metrics.get("registrar_bindings"), Some(1));
    assert_eq!(srv.metrics.get("registrar_aors"), Some(1));
    assert_eq!(srv.metrics.get("security_auth_failures"), Some(1));
    assert_eq!(srv.metrics.get("relay_ports_in_use"), Some(0));
    let text = srv.metrics.encode();
    assert!(text.contains("\nsipedge_registrar_bindings 1\n"), "{text}");
    assert!(
        text.contains("\nsipedge_security_auth_failures_total 1\n"),
        "{text}"
    );
    assert!(
        text.contains("sipedge_proxy_transactions{side=\"server\"} 0\n"),
        "{text}"
    );
    assert!(text.ends_with("# EOF\n"));
    srv.stop().await;
}

#[tokio::test]
async fn register_authenticate_persist_restart() {
    let srv = TestServer::start("", "").await;
    add_user(&srv, "alice", "s3cret").await;
    let mut phone = Phone::new("alice").await;
    let contact = "sip:alice@10.0.0.2:5062;transport=udp".to_owned();
    let r = phone
        .register(
            &srv,
            "alice",
            "s3cret",
            &format!("Contact: <{contact}>;expires=120\r\n"),
        )
        .await;
    assert_eq!(r.status(), Some(200));
    assert_eq!(contact_uris(&r), vec![format!("{contact};expires=120")]);
    assert!(r.headers_other("date").next().is_some(), "200 carries Date");

    // Written through to the store with the flow it came from.
    let rows = srv.store.load_bindings(0).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].aor, "alice@example.com");
    assert_eq!(rows[0].contact, contact);
    assert_eq!(rows[0].received, phone.addr);

    // Restart on the same database: the binding is served (a query REGISTER lists it).
    let db = srv.db_url.clone();
    srv.stop().await;
    let srv = TestServer::start_on(&db, "127.0.0.1:0", "", "").await;
    assert_eq!(srv.location.binding_count(), 1);
    let r = phone.register(&srv, "alice", "s3cret", "").await;
    assert_eq!(r.status(), Some(200));
    assert_eq!(contact_uris(&r).len(), 1);

    // Contact: * with Expires: 0 removes everything, in memory and in the store.
    let r = phone
        .register(&srv, "alice", "s3cret", "Contact: *\r\nExpires: 0\r\n")
        .await;
    assert_eq!(r.status(), Some(200));
    assert!(contact_uris(&r).is_empty());
    assert!(srv.store.load_bindings(0).await.unwrap().is_empty());
    assert_eq!(srv.location.binding_count(), 0);
    srv.stop().await;
}

#[tokio::test]
async fn wrong_password_other_user_and_too_brief() {
    let srv = TestServer::start("", "").await;
    add_user(&srv, "bob", "right").await;
    add_user(&srv, "carol", "hers").await;
    let mut phone = Phone::new("bob").await;
    let r = phone
        .register(&srv, "bob", "wrong", "Contact: <sip:bob@10.0.0.3>\r\n")
        .await;
    assert_eq!(
        r.status(),
        Some(401),
        "a wrong password is challenged again"
    );
    // Authenticated as bob, registering carol: 403 (check_to).
    let r = phone
        .register(&srv, "carol", "right", "Contact: <sip:bob@10.0.0.3>\r\n")
        .await;
    assert_eq!(r.status(), Some(403));
    // Below min_expires: 423 with Min-Expires.
    let r = phone
        .register(
            &srv,
            "bob",
            "right",
            "Contact: <sip:bob@10.0.0.3>;expires=5\r\n",
        )
        .await;
    assert_eq!(r.status(), Some(423));
    assert_eq!(
        r.headers_other("min-expires")
            .next()
            .map(|h| r.bytes_at(h.value.clone()).to_vec()),
        Some(b"30".to_vec())
    );
    assert!(srv.store.load_bindings(0).await.unwrap().is_empty());
    // An unknown user is challenged, never told that the user does not exist.
    let mut stranger = Phone::new("mallory").await;
    let r = stranger
        .register(&srv, "mallory", "x", "Contact: <sip:m@10.0.0.9>\r\n")
        .await;
    assert_eq!(r.status(), Some(401));
    srv.stop().await;
}

#[tokio::test]
async fn retransmitted_register_gets_the_same_answer() {
    let srv = TestServer::start("", "").await;
    add_user(&srv, "dave", "pw").await;
    let mut phone = Phone::new("dave").await;
    let r = phone
        .register(&srv, "dave", "pw", "Contact: <sip:dave@10.0.0.4>\r\n")
        .await;
    assert_eq!(r.status(), Some(200));
    // Send the exact same authenticated REGISTER again (a UDP retransmission): the cached 200
    // comes back, not a 401 for a replayed nonce count.
    let again = udp_exchange(&phone.sock, srv.udp, phone.last_sent.as_bytes()).await;
    assert_eq!(again.status(), Some(200));
    assert_eq!(
        again.as_bytes(),
        r.as_bytes(),
        "byte-identical retransmitted response"
    );
    srv.stop().await;
}

fn sha256_hex(s: &str) -> String {
    Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// RFC 8760: with `algorithms = ["SHA-256", "MD5"]` the 401 carries both challenges, SHA-256
/// first, and a SHA-256 client registers with the SHA-256 HA1 stored by `user add`.
#[tokio::test]
async fn sha256_client_registers() {
    let srv = TestServer::start("", "[auth]\nalgorithms = [\"SHA-256\", \"MD5\"]\n").await;
    srv.store
        .add_subscriber(&Subscriber {
            username: "erin".into(),
            domain: "example.com".into(),
            ha1_md5: md5_hex("erin:example.com:pw"),
            ha1_sha256: Some(sha256_hex("erin:example.com:pw")),
            created: 0,
            caller_id: None,
        })
        .await
        .unwrap();
    let mut phone = Phone::new("erin").await;
    let first = phone.register_text("erin", "Contact: <sip:erin@10.0.0.5>\r\n");
    let r = udp_exchange(&phone.sock, srv.udp, first.as_bytes()).await;
    assert_eq!(r.status(), Some(401));
    let challenges: Vec<String> = r
        .headers_named(HeaderName::WwwAuthenticate)
        .map(|h| r.str_at(h.value.clone()).unwrap().to_owned())
        .collect();
    assert_eq!(challenges.len(), 2);
    assert!(
        challenges[0].contains("algorithm=SHA-256"),
        "{challenges:?}"
    );
    assert!(challenges[1].contains("algorithm=MD5"), "{challenges:?}");
    let nonce = challenge_param(&challenges[0], "nonce").unwrap();
    let uri = "sip:example.com";
    let ha1 = sha256_hex("erin:example.com:pw");
    let ha2 = sha256_hex(&format!("REGISTER:{uri}"));
    let response = sha256_hex(&format!("{ha1}:{nonce}:00000001:c1:auth:{ha2}"));
    let auth = format!(
        "Authorization: Digest username=\"erin\", realm=\"example.com\", nonce=\"{nonce}\", uri=\"{uri}\", \
response=\"{response}\", algorithm=SHA-256, qop=auth, nc=00000001, cnonce=\"c1\"\r\n"
    );
    let second = phone.register_text("erin", &format!("{auth}Contact: <sip:erin@10.0.0.5>\r\n"));
    let r = udp_exchange(&phone.sock, srv.udp, second.as_bytes()).await;
    assert_eq!(r.status(), Some(200));
    assert_eq!(srv.store.load_bindings(0).await.unwrap().len(), 1);
    srv.stop().await;
}

/// The hashes are cached for a short while, but a new password works at once: a cached entry
/// that does not verify is read again from the store.
#[tokio::test]
async fn new_password_works_at_once() {
    let srv = TestServer::start("", "").await;
    add_user(&srv, "hank", "old").await;
    let mut phone = Phone::new("hank").await;
    let contact = "Contact: <sip:hank@10.0.0.6>\r\n";
    assert_eq!(
        phone.register(&srv, "hank", "old", contact).await.status(),
        Some(200)
    );
    srv.store
        .set_subscriber_hashes("hank", "example.com", &md5_hex("hank:example.com:new"), "x")
        .await
        .unwrap();
    assert_eq!(
        phone.register(&srv, "hank", "new", contact).await.status(),
        Some(200)
    );
    srv.stop().await;
}

/// Kamailio's own `subscriber` schema (`/usr/share/kamailio/db_sqlite/standard-create.sql` and
/// `auth_db-create.sql`, Debian package kamailio-sqlite-modules); when that package is
/// installed, the copy must be what it ships.
const KAMAILIO_SCHEMA: &str = "\
CREATE TABLE version (
    id INTEGER PRIMARY KEY NOT NULL,
    table_name VARCHAR(32) NOT NULL,
    table_version INTEGER DEFAULT 0 NOT NULL,
    CONSTRAINT version_table_name_idx UNIQUE (table_name)
);

INSERT INTO version (table_name, table_version) values ('version','1');
CREATE TABLE subscriber (
    id INTEGER PRIMARY KEY NOT NULL,
    username VARCHAR(64) DEFAULT '' NOT NULL,
    domain VARCHAR(64) DEFAULT '' NOT NULL,
    password VARCHAR(64) DEFAULT '' NOT NULL,
    ha1 VARCHAR(128) DEFAULT '' NOT NULL,
    ha1b VARCHAR(128) DEFAULT '' NOT NULL,
    CONSTRAINT subscriber_account_idx UNIQUE (username, domain)
);

CREATE INDEX subscriber_username_idx ON subscriber (username);

INSERT INTO version (table_name, table_version) values ('subscriber','7');
";

/// Issue #14: a Kamailio `subscriber` table (Kamailio's schema, kamctl's hashes: ha1 =
/// MD5(user:domain:pw), ha1b = MD5(user@domain:domain:pw), and the plaintext kamctl keeps by
/// default) is imported with `user import --kamailio sqlite://…`; the plaintext is not; a row
/// for a domain we do not serve is skipped. The imported user registers with the old password,
/// offered MD5 alone while SHA-256 is configured first, and gets SHA-256 once the password is
/// set again.
#[tokio::test]
async fn kamailio_subscribers_register_with_their_old_passwords() {
    let dir = std::path::Path::new("/usr/share/kamailio/db_sqlite");
    if dir.is_dir() {
        let shipped = ["standard-create.sql", "auth_db-create.sql"]
            .map(|f| std::fs::read_to_string(dir.join(f)).unwrap())
            .concat();
        let norm = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
        assert_eq!(
            norm(&shipped),
            norm(KAMAILIO_SCHEMA),
            "Kamailio's schema changed"
        );
    }
    let kam_db = crate::harness::fresh_db();
    let kam_path = kam_db.trim_start_matches("sqlite://").to_owned();
    {
        let pool = sqlx::SqlitePool::connect(&format!("{kam_db}?mode=rwc"))
            .await
            .unwrap();
        sqlx::raw_sql(KAMAILIO_SCHEMA).execute(&pool).await.unwrap();
        for (user, domain, pw) in [
            ("kim", "example.com", "Kam-old-pw1"),
            ("olaf", "other.example", "Kam-old-pw2"),
        ] {
            sqlx::query(
                "INSERT INTO subscriber (username, domain, password, ha1, ha1b) VALUES (?, ?, ?, ?, ?)",
            )
            .bind(user)
            .bind(domain)
            .bind(pw)
            .bind(md5_hex(&format!("{user}:{domain}:{pw}")))
            .bind(md5_hex(&format!("{user}@{domain}:{domain}:{pw}")))
            .execute(&pool)
            .await
            .unwrap();
        }
        pool.close().await;
    }
    let db = crate::harness::fresh_db();
    let cfg = std::env::temp_dir().join(format!("sipedge-kam-{}.toml", std::process::id()));
    std::fs::write(
        &cfg,
        format!(
            "[server]\ndomains = [\"example.com\"]\n[database]\nurl = \"{db}\"\n\
             [auth]\nalgorithms = [\"SHA-256\", \"MD5\"]\n"
        ),
    )
    .unwrap();
    let sipedge = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_sipedge"))
            .env_remove("SIPEDGE_CONFIG")
            .arg("-c")
            .arg(&cfg)
            .args(args)
            .output()
            .unwrap()
    };
    let out = sipedge(&[
        "user",
        "import",
        "--kamailio",
        &format!("sqlite://{kam_path}"),
    ]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stdout.contains("imported 1 subscriber(s)"), "{stdout}");
    assert!(stdout.contains("skipped 1"), "{stdout}");
    assert!(stderr.contains("skipped olaf@other.example"), "{stderr}");

    // The same from an export (`mysql -B -e 'SELECT * FROM subscriber'`: tab-separated).
    let dump = cfg.with_extension("tsv");
    std::fs::write(
        &dump,
        format!(
            "id\tusername\tdomain\tpassword\tha1\tha1b\n3\tlars\texample.com\tLars-pw\t{}\t{}\n",
            md5_hex("lars:example.com:Lars-pw"),
            md5_hex("lars@example.com:example.com:Lars-pw")
        ),
    )
    .unwrap();
    let out = sipedge(&["user", "import", "--kamailio-dump", dump.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("imported 1 subscriber(s)"));
    let srv = TestServer::start_on(
        &db,
        "127.0.0.1:0",
        "",
        "[auth]\nalgorithms = [\"SHA-256\", \"MD5\"]\n",
    )
    .await;
    let lars = srv
        .store
        .subscriber("lars", "example.com")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (lars.ha1_md5, lars.ha1_sha256),
        (md5_hex("lars:example.com:Lars-pw"), None)
    );
    let kim = srv
        .store
        .subscriber("kim", "example.com")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(kim.ha1_md5, md5_hex("kim:example.com:Kam-old-pw1"));
    assert_eq!(kim.ha1_sha256, None);
    for f in [
        db.trim_start_matches("sqlite://").to_owned(),
        format!("{}-wal", db.trim_start_matches("sqlite://")),
    ] {
        if let Ok(bytes) = std::fs::read(&f) {
            assert!(
                !bytes.windows(11).any(|w| w == b"Kam-old-pw1"),
                "plaintext in {f}"
            );
        }
    }
    let mut phone = Phone::new("kim").await;
    let contact = "Contact: <sip:kim@10.0.0.8>\r\n";
    let offered = |r: &Message| {
        r.headers_named(HeaderName::WwwAuthenticate)
            .map(|h| challenge_param(r.str_at(h.value.clone()).unwrap(), "algorithm").unwrap())
            .collect::<Vec<_>>()
    };
    let first = phone.register_text("kim", contact);
    let r = udp_exchange(&phone.sock, srv.udp, first.as_bytes()).await;
    assert_eq!(offered(&r), ["MD5"], "no SHA-256 HA1 yet: MD5 alone");
    let r = phone.register(&srv, "kim", "Kam-old-pw1", contact).await;
    assert_eq!(r.status(), Some(200));
    assert_eq!(srv.store.load_bindings(0).await.unwrap().len(), 1);

    let out = sipedge(&["user", "passwd", "kim", "--password", "new-pw"]);
    assert_eq!(out.status.code(), Some(0));
    let kim = srv
        .store
        .subscriber("kim", "example.com")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(kim.ha1_sha256, Some(sha256_hex("kim:example.com:new-pw")));
    // The hashes are cached up to 30 s; a fresh server reads them at once.
    srv.stop().await;
    let srv = TestServer::start_on(
        &db,
        "127.0.0.1:0",
        "",
        "[auth]\nalgorithms = [\"SHA-256\", \"MD5\"]\n",
    )
    .await;
    let first = phone.register_text("kim", contact);
    let r = udp_exchange(&phone.sock, srv.udp, first.as_bytes()).await;
    assert_eq!(offered(&r), ["SHA-256", "MD5"]);
    srv.stop().await;
}
