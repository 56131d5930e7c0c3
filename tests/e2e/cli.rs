//! The `sipedge` binary: `check-config` exit codes and messages, and `serve` answering OPTIONS
//! and stopping cleanly on SIGTERM.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use tokio::net::UdpSocket;

use crate::harness::{request, udp_exchange};

pub(crate) fn sipedge() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sipedge"));
    c.env_remove("SIPEDGE_CONFIG").env_remove("RUST_LOG");
    c
}

pub(crate) fn temp_config(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sipedge-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn check_config_accepts_the_seed_file() {
    let seed = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/sipedge.toml");
    let out = sipedge()
        .arg("check-config")
        .arg("-c")
        .arg(&seed)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let effective = String::from_utf8(out.stdout).unwrap();
    // Derived values are written out.
    assert!(effective.contains("advertise = "), "{effective}");
    assert!(
        !effective.contains("[[route]]"),
        "the seed routes are examples: {effective}"
    );
}

#[test]
fn check_config_names_the_bad_key_and_exits_2() {
    for (name, text, key) in [
        (
            "unknown.toml",
            "[media]\nports = \"30000-40000\"\nport_rnage = 1\n",
            "media.port_rnage",
        ),
        (
            "ports.toml",
            "[media]\nports = \"30001-30000\"\n",
            "media.ports",
        ),
        (
            "regex.toml",
            "[[route]]\nname = \"pbx\"\nuser = '^[0-9{3,4}$'\nnext_hop = \"pbx:5060\"\n",
            "route.user",
        ),
    ] {
        let path = temp_config(name, text);
        let out = sipedge()
            .arg("check-config")
            .arg("-c")
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: {stderr}");
        assert!(stderr.contains(key), "{name}: {stderr} does not name {key}");
    }
    // SIPEDGE_CONFIG names the file when -c is absent; a missing file is a usage error.
    let out = sipedge()
        .arg("check-config")
        .env("SIPEDGE_CONFIG", "/nonexistent/sipedge.toml")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/sipedge.toml"));
}

#[tokio::test]
async fn serve_answers_and_stops_on_sigterm() {
    let path = temp_config(
        "serve.toml",
        &format!(
            "[server]\nlisten = [\"udp:127.0.0.1:0\"]\ndomains = [\"example.com\"]\n[database]\nurl = \"{}\"\n[control]\nlisten = \"127.0.0.1:0\"\n",
            crate::harness::fresh_db()
        ),
    );
    let mut child = sipedge()
        .args(["--log-level", "info", "serve", "-c"])
        .arg(&path)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The "listening" line carries the bound address.
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("server exited before listening")
            .unwrap();
        if line.contains("listening transport=\"udp\"")
            && let Some(rest) = line.split(" addr=").nth(1)
        {
            break rest
                .split_whitespace()
                .next()
                .unwrap()
                .parse::<std::net::SocketAddr>()
                .unwrap();
        }
    };
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let me = sock.local_addr().unwrap();
    let resp = udp_exchange(
        &sock,
        addr,
        request("OPTIONS", "sip:example.com", me, "bin", "").as_bytes(),
    )
    .await;
    assert_eq!(resp.status(), Some(200));

    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{rest:?}");
    assert!(
        rest.iter().any(|l| l.contains("sipedge stopped")),
        "{rest:?}"
    );
}

/// Started with an open-file limit below what the limits allow (`ulimit -n 1000`: 2,000 relay
/// sessions x 4 + 4,096 TCP connections by default), `serve` says so before it listens, with
/// how many relayed calls fit.
#[test]
fn serve_names_an_open_file_limit_below_the_limits() {
    let path = temp_config(
        "fd-limit.toml",
        &format!(
            "[server]\nlisten = [\"udp:127.0.0.1:0\"]\ndomains = [\"example.com\"]\n[database]\nurl = \"{}\"\n[limits]\ntcp_connections = 100\n",
            crate::harness::fresh_db()
        ),
    );
    // sh's `ulimit -n` lowers the soft and the hard limit: sipedge cannot raise it back.
    let mut child = Command::new("sh")
        .args([
            "-c",
            "ulimit -n 1000 && exec \"$0\" --log-level info serve -c \"$1\"",
        ])
        .arg(env!("CARGO_BIN_EXE_sipedge"))
        .arg(&path)
        .env_remove("SIPEDGE_CONFIG")
        .env_remove("RUST_LOG")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut warned = None;
    for line in BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        if line.contains("open-file limit") {
            warned = Some(line.clone());
        }
        if line.contains("listening transport=\"udp\"") {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let line = warned.expect("a warning about the open-file limit before listening");
    // 2,000 sessions x 4 + 100 connections + 256 = 8,356; (1000 - 356) / 4 = 161 calls.
    assert!(
        line.contains("WARN")
            && line.contains("the open-file limit 1000 is below the 8356 descriptors")
            && line.contains("about 161 relayed calls fit"),
        "{line}"
    );
}

/// `user add` (password on stdin) → `user list` → `user passwd` → `user del`, on a fresh
/// database; the stored hashes change with the password and no plaintext is stored.
#[tokio::test]
async fn user_commands() {
    let db = crate::harness::fresh_db();
    let path = temp_config(
        "users.toml",
        &format!("[server]\ndomains = [\"example.com\"]\n[database]\nurl = \"{db}\"\n"),
    );
    let run = |args: &[&str], stdin: &str| {
        let mut child = sipedge()
            .arg("-c")
            .arg(&path)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let out = run(&["user", "add", "frank"], "Secr3t-pw\n");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&["user", "add", "frank@example.com", "--password", "x"], "");
    assert_eq!(out.status.code(), Some(2), "a duplicate is a usage error");
    let out = run(
        &["user", "add", "gina@elsewhere.org", "--password", "x"],
        "",
    );
    assert_eq!(out.status.code(), Some(2), "a domain we do not serve");
    let out = run(&["user", "list"], "");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "frank@example.com\n");

    let store = sipedge::store::Store::connect(&db).await.unwrap();
    let before = store
        .subscriber("frank", "example.com")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(before.ha1_md5, {
        use md5::Digest;
        md5::Md5::digest(b"frank:example.com:Secr3t-pw")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    });
    let out = run(&["user", "passwd", "frank", "--password", "other"], "");
    assert_eq!(out.status.code(), Some(0));
    let after = store
        .subscriber("frank", "example.com")
        .await
        .unwrap()
        .unwrap();
    assert_ne!(before.ha1_md5, after.ha1_md5);
    assert_ne!(before.ha1_sha256, after.ha1_sha256);
    store.close().await;
    // No plaintext anywhere in the database files.
    let file = db.trim_start_matches("sqlite://");
    for f in [file.to_owned(), format!("{file}-wal")] {
        if let Ok(bytes) = std::fs::read(&f) {
            assert!(
                !bytes.windows(9).any(|w| w == b"Secr3t-pw"),
                "plaintext in {f}"
            );
        }
    }
    let out = run(&["user", "del", "frank"], "");
    assert_eq!(out.status.code(), Some(0));
    let out = run(&["user", "del", "frank"], "");
    assert_eq!(out.status.code(), Some(2));

    // Caller IDs: given at add, changed and cleared by set, shown by list, stored.
    let out = run(
        &[
            "user",
            "add",
            "hal",
            "--password",
            "x",
            "--caller-id",
            "+15551230002",
        ],
        "",
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let out = run(&["user", "list"], "");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hal@example.com caller-id=+15551230002\n"
    );
    let stored = |user: &'static str| {
        let db = db.clone();
        async move {
            let store = sipedge::store::Store::connect(&db).await.unwrap();
            let s = store
                .subscriber(user, "example.com")
                .await
                .unwrap()
                .unwrap();
            store.close().await;
            s.caller_id
        }
    };
    assert_eq!(stored("hal").await.as_deref(), Some("+15551230002"));
    let out = run(&["user", "set", "hal", "--caller-id", "2002"], "");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(stored("hal").await.as_deref(), Some("2002"));
    let out = run(&["user", "set", "hal", "--caller-id", "<sip:x>"], "");
    assert_eq!(out.status.code(), Some(2), "not a URI user part");
    assert_eq!(stored("hal").await.as_deref(), Some("2002"), "unchanged");
    let out = run(&["user", "set", "nobody", "--caller-id", "1"], "");
    assert_eq!(out.status.code(), Some(2));
    let out = run(&["user", "set", "hal", "--caller-id", ""], "");
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(stored("hal").await, None, "cleared");

    // Import: a caller_id= field after the password, in both line formats.
    let out = run(
        &["user", "import", "-"],
        "SEQUENTIAL\nivy;pw1;caller_id=+15551230003\njoe pass word caller_id=3003\nkim;pw3\n",
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(stored("ivy").await.as_deref(), Some("+15551230003"));
    assert_eq!(stored("joe").await.as_deref(), Some("3003"));
    assert_eq!(stored("kim").await, None);
}

/// Issue #12 item 6: outside the repository (no `config/sipedge.toml` in the working
/// directory) the error says each thing once; a postgres:// URL in a build without the
/// feature is refused by `check-config`.
#[test]
fn errors_outside_the_repo_are_not_doubled() {
    let dir = std::env::temp_dir().join(format!("sipedge-test-cwd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = sipedge()
        .current_dir(&dir)
        .args(["check-config", "-c", "missing.toml"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(
        stderr.matches("No such file or directory").count(),
        1,
        "{stderr}"
    );
    assert_eq!(stderr.matches("missing.toml").count(), 1, "{stderr}");
    // No -c: the search path, each entry named once (or the package's file, when installed).
    let out = sipedge()
        .current_dir(&dir)
        .arg("check-config")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if std::path::Path::new("/etc/sipedge/sipedge.toml").exists() {
        assert!(stderr.contains("/etc/sipedge/sipedge.toml"), "{stderr}");
    } else {
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert_eq!(stderr.matches("config/sipedge.toml").count(), 1, "{stderr}");
        assert_eq!(
            stderr.matches("/etc/sipedge/sipedge.toml").count(),
            1,
            "{stderr}"
        );
    }
}

#[test]
fn check_config_refuses_postgres_without_the_feature() {
    let path = temp_config(
        "pg.toml",
        "[database]\nurl = \"postgres://sipedge:s3cret@db/sipedge\"\n",
    );
    let out = sipedge()
        .args(["check-config", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if cfg!(feature = "postgres") {
        assert_eq!(out.status.code(), Some(0), "{stderr}");
    } else {
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains("database.url"), "{stderr}");
        assert!(stderr.contains("postgres"), "{stderr}");
        assert!(
            !stderr.contains("s3cret"),
            "the password is not echoed: {stderr}"
        );
    }
}

/// `--log-format json`: every log line is a JSON object with level and fields.
#[test]
fn log_format_json_writes_json_lines() {
    let path = temp_config(
        "json.toml",
        "[server]\nlisten = [\"udp:127.0.0.1:0\"]\n[[route]]\nname = \"x\"\nuser = \"^9\"\nnext_hop = \"nowhere.invalid:5060\"\n",
    );
    let out = sipedge()
        .args(["--log-format", "json", "check-config", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    let hop = lines
        .iter()
        .find(|v| v["fields"]["next_hop"] == "nowhere.invalid:5060")
        .unwrap_or_else(|| panic!("no next-hop warning in {stderr}"));
    assert_eq!(hop["level"], "WARN");
    assert_eq!(hop["fields"]["route"], "x");
}

/// `cdr export`: CSV with a header and JSON lines, `--since` in unix seconds and RFC 3339, and
/// a bad `--since` is a usage error (exit 2).
#[tokio::test]
async fn cdr_export() {
    let db = crate::harness::fresh_db();
    let store = sipedge::store::Store::connect(&db).await.unwrap();
    store.migrate().await.unwrap();
    let row = |call_id: &str, start: u64| sipedge::store::Cdr {
        call_id: call_id.into(),
        from_uri: "sip:alice@example.com".into(),
        to_uri: "sip:1234@example.com".into(),
        request_uri: "sip:1234@example.com".into(),
        start,
        answer: Some(start + 2),
        end: start + 62,
        status: 200,
        reason: "bye".into(),
        outcome: "answered".into(),
        hangup: "caller".into(),
        route: "pbx".into(),
        source: "192.0.2.1:5060".into(),
        ..Default::default()
    };
    // 2026-12-05T07:00:00Z and an hour later.
    store
        .insert_cdr(&row("early", 1_796_454_000))
        .await
        .unwrap();
    store.insert_cdr(&row("late", 1_796_457_600)).await.unwrap();
    store.close().await;
    let path = temp_config(
        "cdr.toml",
        &format!("[server]\ndomains = [\"example.com\"]\n[database]\nurl = \"{db}\"\n"),
    );
    let export = |args: &[&str]| {
        let out = sipedge()
            .arg("-c")
            .arg(&path)
            .args(["cdr", "export"])
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        (
            out.status.code(),
            String::from_utf8(out.stdout).unwrap(),
            err,
        )
    };
    let (code, csv, err) = export(&[]);
    assert_eq!(code, Some(0), "{err}");
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 3, "{csv}");
    assert!(lines[0].starts_with("call_id,start,answer,end,duration,status,outcome"));
    assert!(
        lines[1].starts_with(
            "early,1796454000,1796454002,1796454062,60,200,answered,bye,caller,pbx,,192.0.2.1:5060,"
        ),
        "{csv}"
    );
    assert!(lines[2].starts_with("late,"), "{csv}");
    for since in ["1796454001", "2026-12-05T08:00:00+01:00"] {
        let (code, json, err) = export(&["--since", since, "--format", "json"]);
        assert_eq!(code, Some(0), "{err}");
        let rows: Vec<sipedge::store::Cdr> = json
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let ids: Vec<&str> = rows.iter().map(|r| r.call_id.as_str()).collect();
        let want: &[&str] = if since.starts_with("2026") {
            &["early", "late"]
        } else {
            &["late"]
        };
        assert_eq!(ids, want, "--since {since}");
        assert_eq!(rows[0].route, "pbx");
    }
    let (code, _, err) = export(&["--since", "yesterday"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--since"), "{err}");
}

/// The server's log lines, read on a thread so that a test can wait for one with a bound.
pub(crate) struct LogLines(std::sync::mpsc::Receiver<String>);

impl LogLines {
    pub(crate) fn new(stderr: std::process::ChildStderr) -> Self {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self(rx)
    }

    /// Reads until a line containing `what`; panics after 10 s or at the end of the log.
    pub(crate) fn until(&self, what: &str) -> String {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.0.recv_timeout(left) {
                Ok(line) if line.contains(what) => return line,
                Ok(line) => seen.push(line),
                Err(_) => panic!("no log line with {what:?}; seen: {seen:#?}"),
            }
        }
    }
}

/// SIGHUP and `sipedge reload` reload the configuration file of a running `serve`: the
/// process stays up and serves, logs `configuration reloaded` with the changed keys, takes
/// `server.log_level`, refuses an invalid file; the pid file is written and removed.
#[tokio::test]
async fn serve_reloads_on_sighup_and_on_sipedge_reload() {
    let dir = std::env::temp_dir().join(format!("sipedge-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pid_file = dir.join("reload.pid");
    let db = crate::harness::fresh_db();
    let text = |extra: &str| {
        format!(
            "[server]\nlisten = [\"udp:127.0.0.1:0\"]\ndomains = [\"example.com\"]\n\
             pid_file = \"{}\"\n{extra}\n[database]\nurl = \"{db}\"\n\
             [control]\nlisten = \"127.0.0.1:0\"\n\
             [[route]]\nname = \"ring\"\nuser = '^9'\nnext_hop = \"127.0.0.1:5999\"\n",
            pid_file.display()
        )
    };
    let path = temp_config("reload.toml", &text(""));
    let mut child = sipedge()
        .args(["serve", "-c"])
        .arg(&path)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = LogLines::new(child.stderr.take().unwrap());
    // "sipedge started" comes first, then the listeners say where they are.
    log.until("sipedge started");
    let line = log.until("listening transport=\"udp\"");
    let addr: std::net::SocketAddr = line
        .split(" addr=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap();
    let pid = child.id();
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap().trim(),
        pid.to_string()
    );
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let me = sock.local_addr().unwrap();
    let options = |id: &str| request("OPTIONS", "sip:example.com", me, id, "");

    // kill -HUP: a new next hop and a log level; the process stays and serves.
    std::fs::write(&path, text("log_level = \"debug\"").replace("5999", "5998")).unwrap();
    let hup = Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    let line = log.until("configuration reloaded");
    assert!(line.contains("changed=route,server.log_level"), "{line}");
    let resp = udp_exchange(&sock, addr, options("hup").as_bytes()).await;
    assert_eq!(resp.status(), Some(200));
    log.until("DEBUG");

    // An invalid file: refused, naming the key; still serving.
    std::fs::write(&path, text("max_forwards = 0")).unwrap();
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
    let line = log.until("configuration not reloaded");
    assert!(line.contains("server.max_forwards"), "{line}");
    // `sipedge reload` checks the file first: nothing is sent.
    let out = sipedge()
        .args(["reload", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("server.max_forwards"));

    // `sipedge reload` with a valid file: SIGHUP to the pid in server.pid_file.
    std::fs::write(
        &path,
        text("log_level = \"debug\"\nrelay_foreign = \"deny\""),
    )
    .unwrap();
    let out = sipedge()
        .args(["reload", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("pid {pid}")));
    let line = log.until("configuration reloaded");
    // Against the running configuration: the 5998 route is still in force.
    assert!(
        line.contains("changed=route,server.relay_foreign"),
        "{line}"
    );
    let resp = udp_exchange(&sock, addr, options("cli").as_bytes()).await;
    assert_eq!(resp.status(), Some(200));

    // A process that is not sipedge is never signalled.
    let mut other = Command::new("sleep").arg("30").spawn().unwrap();
    let out = sipedge()
        .args(["reload", "--pid", &other.id().to_string(), "-c"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not sipedge"));
    assert!(
        other.try_wait().unwrap().is_none(),
        "sleep was not signalled"
    );
    let _ = other.kill();
    let _ = other.wait();

    assert!(
        Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
    log.until("sipedge stopped");
    assert_eq!(child.wait().unwrap().code(), Some(0));
    assert!(!pid_file.exists(), "the pid file is removed at stop");
}
