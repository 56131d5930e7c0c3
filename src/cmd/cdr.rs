//! `sipedge cdr export [--since UNIX|RFC3339] [--format csv|json]`: the call records (one per
//! call, README "Accounting") on standard output, oldest first, read a page at a time.

use std::io::Write as _;
use std::path::Path;

use anyhow::{Context as _, anyhow};
use sipedge::store::Cdr;

use super::{CmdError, load_config, runtime};

/// How `cdr export` writes the rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Format {
    /// A header line, then one line per call; times are unix seconds.
    Csv,
    /// One JSON object per line (the CDR spool's format).
    Json,
}

/// The CSV columns, in order.
const HEADER: &str = "call_id,start,answer,end,duration,status,outcome,reason,hangup,route,\
auth_user,source,from_uri,to_uri,request_uri,relayed,caller_pkts,caller_bytes,caller_lost,\
caller_jitter_ms,callee_pkts,callee_bytes,callee_lost,callee_jitter_ms";

pub(crate) fn export(path: &Path, since: Option<&str>, format: Format) -> Result<(), CmdError> {
    let since = match since {
        None => 0,
        Some(s) => parse_since(s).map_err(|e| CmdError::Usage(anyhow!("--since {s:?}: {e}")))?,
    };
    let cfg = load_config(path)?;
    runtime()?.block_on(async {
        let store = super::user::open(&cfg).await?;
        let stdout = std::io::stdout();
        let mut out = std::io::BufWriter::new(stdout.lock());
        let write_err = |e: std::io::Error| CmdError::Runtime(anyhow!(e).context("writing"));
        if format == Format::Csv {
            writeln!(out, "{HEADER}").map_err(write_err)?;
        }
        let mut page = 0;
        loop {
            let rows = store
                .cdrs_since(since, page)
                .await
                .context("reading the cdr table")
                .map_err(CmdError::Runtime)?;
            if rows.is_empty() {
                break;
            }
            for r in &rows {
                let line = match format {
                    Format::Csv => csv_line(r),
                    Format::Json => serde_json::to_string(r)
                        .context("encoding a CDR")
                        .map_err(CmdError::Runtime)?,
                };
                writeln!(out, "{line}").map_err(write_err)?;
            }
            page += 1;
        }
        out.flush().map_err(write_err)?;
        store.close().await;
        Ok(())
    })
}

/// One CSV line (RFC 4180 quoting) in [`HEADER`]'s order.
fn csv_line(c: &Cdr) -> String {
    let duration = c.answer.map_or(0, |a| c.end.saturating_sub(a));
    let fields: [String; 24] = [
        field(&c.call_id),
        c.start.to_string(),
        c.answer.map_or_else(String::new, |a| a.to_string()),
        c.end.to_string(),
        duration.to_string(),
        c.status.to_string(),
        field(&c.outcome),
        field(&c.reason),
        field(&c.hangup),
        field(&c.route),
        field(&c.auth_user),
        field(&c.source),
        field(&c.from_uri),
        field(&c.to_uri),
        field(&c.request_uri),
        c.relayed.to_string(),
        c.caller.0.to_string(),
        c.caller.1.to_string(),
        c.caller.2.to_string(),
        c.caller.3.to_string(),
        c.callee.0.to_string(),
        c.callee.1.to_string(),
        c.callee.2.to_string(),
        c.callee.3.to_string(),
    ];
    fields.join(",")
}

/// A text field, quoted when it holds a comma, a quote or a line break (quotes doubled).
fn field(s: &str) -> String {
    if s.contains([',', '"', '\r', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

/// `--since`: unix seconds, or an RFC 3339 time (`2026-12-05T07:00:00Z`, an offset such as
/// `+01:00`, fractions ignored), or a date alone (midnight UTC).
fn parse_since(s: &str) -> Result<u64, String> {
    let s = s.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse().map_err(|_| "too large".to_owned());
    }
    let bad = || "not unix seconds nor an RFC 3339 time (2026-12-05T07:00:00Z)".to_owned();
    let num = |t: &str| -> Result<i64, String> {
        if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        t.parse().map_err(|_| bad())
    };
    let (date, time) = match s.find(['T', 't', ' ']) {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    };
    let mut d = date.split('-');
    let (Some(y), Some(m), Some(day), None) = (d.next(), d.next(), d.next(), d.next()) else {
        return Err(bad());
    };
    let (y, m, day) = (num(y)?, num(m)?, num(day)?);
    if y.to_string().len() != 4 || !(1..=12).contains(&m) || !(1..=31).contains(&day) {
        return Err(bad());
    }
    let mut secs = days_from_civil(y, m, day) * 86_400;
    if let Some(time) = time {
        // The offset: Z, or ±HH:MM after the seconds.
        let (clock, offset) = if let Some(c) = time.strip_suffix(['Z', 'z']) {
            (c, 0)
        } else {
            let i = time.rfind(['+', '-']).ok_or_else(bad)?;
            let (h, mi) = time[i + 1..].split_once(':').ok_or_else(bad)?;
            let o = num(h)? * 3600 + num(mi)? * 60;
            (&time[..i], if &time[i..=i] == "-" { -o } else { o })
        };
        let clock = clock.split('.').next().unwrap_or_default();
        let mut t = clock.split(':');
        let (Some(h), Some(mi), Some(sec), None) = (t.next(), t.next(), t.next(), t.next()) else {
            return Err(bad());
        };
        let (h, mi, sec) = (num(h)?, num(mi)?, num(sec)?);
        if h > 23 || mi > 59 || sec > 60 {
            return Err(bad());
        }
        secs += h * 3600 + mi * 60 + sec - offset;
    }
    u64::try_from(secs).map_err(|_| "before 1970".to_owned())
}

/// Days from 1970-01-01 to a proleptic Gregorian date (H. Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_in_every_spelling() {
        assert_eq!(parse_since("1764918000"), Ok(1_764_918_000));
        assert_eq!(parse_since("1970-01-01T00:00:00Z"), Ok(0));
        assert_eq!(parse_since("2026-12-05T07:00:00Z"), Ok(1_796_454_000));
        assert_eq!(parse_since("2026-12-05t07:00:00.250z"), Ok(1_796_454_000));
        assert_eq!(parse_since("2026-12-05T08:00:00+01:00"), Ok(1_796_454_000));
        assert_eq!(parse_since("2026-12-05T06:30:00-00:30"), Ok(1_796_454_000));
        assert_eq!(parse_since("2026-12-05"), Ok(1_796_428_800));
        assert_eq!(
            parse_since("2000-03-01T00:00:00Z"),
            Ok(951_868_800),
            "leap year"
        );
        for bad in [
            "",
            "yesterday",
            "2026-13-01",
            "2026-12-05T07:00",
            "2026-12-05T25:00:00Z",
            "2026-12-05T07:00:00",
            "1969-12-31T23:59:59Z",
            "-5",
        ] {
            assert!(parse_since(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn csv_lines_quote_what_needs_it() {
        let c = Cdr {
            call_id: "c1".into(),
            from_uri: "\"Al, \"x\"\" <sip:a@example.com>".into(),
            start: 100,
            answer: Some(102),
            end: 160,
            status: 200,
            outcome: "answered".into(),
            reason: "bye".into(),
            hangup: "caller".into(),
            route: "location".into(),
            ..Cdr::default()
        };
        let line = csv_line(&c);
        assert!(
            line.starts_with("c1,100,102,160,58,200,answered,bye,caller,location,,,"),
            "{line}"
        );
        assert!(
            line.contains(",\"\"\"Al, \"\"x\"\"\"\" <sip:a@example.com>\","),
            "{line}"
        );
        assert_eq!(
            line.split(',').count(),
            HEADER.split(',').count() + 1,
            "one comma inside the quoted From"
        );
        let unanswered = csv_line(&Cdr {
            status: 486,
            end: 5,
            ..Cdr::default()
        });
        assert!(unanswered.starts_with(",0,,5,0,486,"), "{unanswered}");
    }
}
