//! `sipedge show registrations|calls|transactions|stats [--json]`: the running server's live
//! state, read from its loopback control endpoint (`[control] listen`) and printed as a table
//! (kamcmd `ul.dump`, rtpengine-ctl `list sessions`), or as the endpoint's JSON with `--json`.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde_json::Value;

use super::{CmdError, load_config, runtime};

/// What to show.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum What {
    /// The location service's bindings.
    Registrations,
    /// Relayed calls in progress, with live packets, loss and jitter per direction.
    Calls,
    /// Live SIP transactions.
    Transactions,
    /// Every counter.
    Stats,
}

impl What {
    fn path(self) -> &'static str {
        match self {
            Self::Registrations => "/api/registrations",
            Self::Calls => "/api/calls",
            Self::Transactions => "/api/transactions",
            Self::Stats => "/api/stats",
        }
    }
}

/// How long the server may take to answer.
const TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) fn run(
    config: &Path,
    what: What,
    json: bool,
    control: Option<SocketAddr>,
) -> Result<(), CmdError> {
    let addr = match control {
        Some(a) => a,
        None => load_config(config)?.control.ok_or_else(|| {
            CmdError::Usage(anyhow!(
                "the control endpoint is off in {} (control.listen = \"\"); `show` reads it",
                config.display()
            ))
        })?,
    };
    let body = runtime()?
        .block_on(get(addr, what.path()))
        .map_err(CmdError::Runtime)?;
    if json {
        println!("{body}");
        return Ok(());
    }
    let v: Value = serde_json::from_str(&body)
        .context("the control endpoint answered something that is not JSON")
        .map_err(CmdError::Runtime)?;
    print!("{}", render(what, &v));
    Ok(())
}

/// One GET over HTTP/1.1 to the control endpoint; the body when the status is 2xx.
async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let work = async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| {
                format!("cannot reach the control endpoint at {addr} (is `sipedge serve` running?)")
            })?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let req = hyper::Request::get(path)
            .header(hyper::header::HOST, addr.to_string())
            .body(Empty::<Bytes>::new())?;
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        let text = String::from_utf8_lossy(&body).into_owned();
        if !status.is_success() {
            return Err(anyhow!("{path}: HTTP {status}: {}", text.trim()));
        }
        Ok(text)
    };
    tokio::time::timeout(TIMEOUT, work)
        .await
        .map_err(|_| anyhow!("the control endpoint at {addr} did not answer within {TIMEOUT:?}"))?
}

fn s(v: &Value, key: &str) -> String {
    match v.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "-".into(),
        Some(other) => other.to_string(),
    }
}

fn duration(secs: u64) -> String {
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    if h > 0 {
        format!("{h}:{m:02}:{s:02}")
    } else {
        format!("{m}:{s:02}")
    }
}

fn leg(v: &Value) -> String {
    match v {
        Value::Object(_) => format!(
            "{}/{}/{:.1}ms",
            s(v, "packets"),
            s(v, "lost"),
            v.get("jitter_ms").and_then(Value::as_f64).unwrap_or(0.0)
        ),
        _ => "-".into(),
    }
}

/// The endpoint's JSON as a table with a header line.
pub(crate) fn render(what: What, v: &Value) -> String {
    let empty = Vec::new();
    let rows = v.as_array().unwrap_or(&empty);
    match what {
        What::Registrations => table(
            &[
                "AOR",
                "CONTACT",
                "RECEIVED",
                "PROTO",
                "EXPIRES",
                "USER-AGENT",
                "INSTANCE",
            ],
            rows.iter()
                .map(|b| {
                    vec![
                        s(b, "aor"),
                        s(b, "contact"),
                        s(b, "received"),
                        s(b, "transport"),
                        duration(b.get("expires_in").and_then(Value::as_u64).unwrap_or(0)),
                        s(b, "user_agent"),
                        s(b, "instance"),
                    ]
                })
                .collect(),
            "no registration",
        ),
        What::Calls => table(
            &[
                "CALL-ID",
                "FROM",
                "TO",
                "STATE",
                "DURATION",
                "RELAY PORTS",
                "FROM CALLER pkts/lost/jitter",
                "FROM CALLEE pkts/lost/jitter",
            ],
            rows.iter()
                .map(|c| {
                    let ports = c
                        .get("ports")
                        .and_then(Value::as_array)
                        .map(|ps| {
                            ps.iter()
                                .map(|p| format!("{}/{}", p[0], p[1]))
                                .collect::<Vec<_>>()
                                .join(" ")
                        })
                        .unwrap_or_default();
                    vec![
                        s(c, "call_id"),
                        s(c, "from"),
                        s(c, "to"),
                        s(c, "state"),
                        duration(c.get("duration_s").and_then(Value::as_u64).unwrap_or(0)),
                        ports,
                        leg(c.get("from_caller").unwrap_or(&Value::Null)),
                        leg(c.get("from_callee").unwrap_or(&Value::Null)),
                    ]
                })
                .collect(),
            "no call in progress",
        ),
        What::Transactions => {
            let list = v
                .get("transactions")
                .and_then(Value::as_array)
                .unwrap_or(&empty);
            let mut out = format!(
                "server transactions: {}, client transactions: {}\n",
                s(v, "server"),
                s(v, "client")
            );
            out.push_str(&table(
                &["SIDE", "METHOD", "BRANCH", "SENT-BY"],
                list.iter()
                    .map(|t| {
                        vec![
                            s(t, "side"),
                            s(t, "method"),
                            s(t, "branch"),
                            s(t, "sent_by"),
                        ]
                    })
                    .collect(),
                "no transaction",
            ));
            out
        }
        What::Stats => table(
            &["COUNTER", "VALUE"],
            v.as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| vec![k.clone(), v.to_string()])
                        .collect()
                })
                .unwrap_or_default(),
            "no counter",
        ),
    }
}

/// Columns padded to their widest cell, two spaces apart; `empty` when there is no row.
fn table(headers: &[&str], rows: Vec<Vec<String>>, empty: &str) -> String {
    if rows.is_empty() {
        return format!("({empty})\n");
    }
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cells: &mut dyn Iterator<Item = &str>, out: &mut String| {
        let mut first = true;
        let mut text = String::new();
        for (cell, w) in cells.zip(&widths) {
            if !first {
                text.push_str("  ");
            }
            first = false;
            text.push_str(cell);
            text.extend(std::iter::repeat_n(' ', w - cell.chars().count()));
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&mut headers.iter().copied(), &mut out);
    for row in &rows {
        line(&mut row.iter().map(String::as_str), &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registrations_render_as_an_aligned_table() {
        let v: Value = serde_json::from_str(
            r#"[{"aor":"alice@example.com","contact":"sip:alice@10.0.0.2:5060","received":"203.0.113.9:40000",
                "transport":"udp","expires_in":3599,"user_agent":"Phone 1.0","instance":"edge1"}]"#,
        )
        .unwrap();
        let out = render(What::Registrations, &v);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("AOR                CONTACT"), "{out}");
        assert!(
            lines[1].starts_with("alice@example.com  sip:alice@10.0.0.2:5060"),
            "{out}"
        );
        assert!(
            lines[1].ends_with("  udp    59:59    Phone 1.0   edge1"),
            "{out}"
        );
        assert_eq!(
            render(What::Registrations, &serde_json::json!([])),
            "(no registration)\n"
        );
    }

    #[test]
    fn calls_show_ports_and_both_directions() {
        let v: Value = serde_json::from_str(
            r#"[{"call_id":"c1","from":"sip:a@x","to":"sip:b@x","state":"confirmed","duration_s":75,
                "ports":[[30000,30002]],"from_caller":{"packets":100,"bytes":17200,"lost":1,"jitter_ms":2.31,"dropped":0},
                "from_callee":null}]"#,
        )
        .unwrap();
        let out = render(What::Calls, &v);
        assert!(out.contains("c1"), "{out}");
        assert!(out.contains("1:15"), "{out}");
        assert!(out.contains("30000/30002"), "{out}");
        assert!(out.contains("100/1/2.3ms"), "{out}");
    }
}
