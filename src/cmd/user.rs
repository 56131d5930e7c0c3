//! `sipedge user add|set|del|passwd|list|import`: subscribers, stored as HA1 hashes (MD5 and
//! SHA-256) for the realm they will authenticate in (the plaintext password is never stored),
//! and their caller ID (the number a route with `identity` asserts).

use std::io::{BufRead, IsTerminal as _};
use std::path::Path;

use anyhow::{Context as _, anyhow};
use sipedge::auth::digest;
use sipedge::clock::{Clock, SystemClock};
use sipedge::config::{Config, DigestAlgorithm};
use sipedge::store::{Store, StoreError, Subscriber};

use super::{CmdError, load_config, runtime};

/// `USER[@DOMAIN]` → (user, domain); the domain defaults to the first of `server.domains`.
fn split_user(cfg: &Config, spec: &str) -> Result<(String, String), CmdError> {
    let (user, domain) = match spec.split_once('@') {
        Some((u, d)) => (u.to_owned(), d.to_ascii_lowercase()),
        None => (spec.to_owned(), cfg.server.domains[0].clone()),
    };
    let bad = |what: &str| CmdError::Usage(anyhow!("{spec:?}: {what}"));
    if user.is_empty() || user.contains([':', ' ', '\t', '"', '<', '>']) {
        return Err(bad("not a valid user name"));
    }
    if domain.is_empty() || domain.contains([' ', '@', ':']) {
        return Err(bad("not a valid domain"));
    }
    if !cfg.is_local_domain(&domain) {
        return Err(bad(
            "the domain is not in server.domains, so nobody could register with it",
        ));
    }
    Ok((user, domain))
}

/// The password from `--password`, else from the terminal without echo (asked twice), else
/// one line of standard input (a pipe or a file: scripts and tests).
fn password(given: Option<String>) -> Result<String, CmdError> {
    let pw = match given {
        Some(p) => p,
        None if std::io::stdin().is_terminal() => {
            let read = |prompt: &str| {
                rpassword::prompt_password(prompt)
                    .context("reading the password from the terminal")
                    .map_err(CmdError::Runtime)
            };
            let pw = read("password: ")?;
            if !pw.is_empty() && read("password again: ")? != pw {
                return Err(CmdError::Usage(anyhow!("the passwords differ")));
            }
            pw
        }
        None => {
            let mut line = String::new();
            std::io::stdin()
                .lock()
                .read_line(&mut line)
                .context("reading the password from standard input")
                .map_err(CmdError::Runtime)?;
            line.trim_end_matches(['\r', '\n']).to_owned()
        }
    };
    if pw.is_empty() {
        return Err(CmdError::Usage(anyhow!("empty password")));
    }
    Ok(pw)
}

/// A caller ID as given on the command line or in an import file: the user part of the
/// asserted `sip:` URI, so digits and the few characters numbers and names use
/// (`+`, `-`, `.`, `_`, `*`, `~`), at most 64. Empty means none.
fn caller_id(given: &str) -> Result<Option<String>, CmdError> {
    if given.is_empty() {
        return Ok(None);
    }
    let ok = given.len() <= 64
        && given
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-._*~".contains(&b));
    if !ok {
        return Err(CmdError::Usage(anyhow!(
            "caller ID {given:?}: use at most 64 letters, digits and + - . _ * ~"
        )));
    }
    Ok(Some(given.to_owned()))
}

/// HA1 hashes for the realm this subscriber will be challenged in.
fn hashes(cfg: &Config, user: &str, domain: &str, pw: &str) -> (String, String) {
    let realm = cfg.auth.realm.as_deref().unwrap_or(domain);
    (
        digest::ha1(DigestAlgorithm::Md5, user, realm, pw),
        digest::ha1(DigestAlgorithm::Sha256, user, realm, pw),
    )
}

/// Opens and migrates the store (also for `cdr export`).
pub(crate) async fn open(cfg: &Config) -> Result<Store, CmdError> {
    let store = Store::connect(&cfg.database_url)
        .await
        .context("opening the database")
        .map_err(CmdError::Runtime)?;
    store
        .migrate()
        .await
        .context("migrating the database")
        .map_err(CmdError::Runtime)?;
    Ok(store)
}

pub(crate) fn add(
    path: &Path,
    spec: &str,
    pw: Option<String>,
    caller: Option<String>,
) -> Result<(), CmdError> {
    let cfg = load_config(path)?;
    let (user, domain) = split_user(&cfg, spec)?;
    let caller_id = caller_id(caller.as_deref().unwrap_or_default())?;
    let pw = password(pw)?;
    let (ha1_md5, ha1_sha256) = hashes(&cfg, &user, &domain, &pw);
    runtime()?.block_on(async {
        let store = open(&cfg).await?;
        let s = Subscriber {
            username: user.clone(),
            domain: domain.clone(),
            ha1_md5,
            ha1_sha256: Some(ha1_sha256),
            created: SystemClock.unix(),
            caller_id,
        };
        match store.add_subscriber(&s).await {
            Ok(()) => {
                println!("added {user}@{domain}");
                Ok(())
            }
            Err(e @ StoreError::Exists(_)) => Err(CmdError::Usage(e.into())),
            Err(e) => Err(CmdError::Runtime(e.into())),
        }
    })
}

pub(crate) fn passwd(path: &Path, spec: &str, pw: Option<String>) -> Result<(), CmdError> {
    let cfg = load_config(path)?;
    let (user, domain) = split_user(&cfg, spec)?;
    let pw = password(pw)?;
    let (md5, sha256) = hashes(&cfg, &user, &domain, &pw);
    runtime()?.block_on(async {
        let store = open(&cfg).await?;
        match store
            .set_subscriber_hashes(&user, &domain, &md5, &sha256)
            .await
        {
            Ok(true) => {
                println!("password changed for {user}@{domain}");
                Ok(())
            }
            Ok(false) => Err(CmdError::Usage(anyhow!("no subscriber {user}@{domain}"))),
            Err(e) => Err(CmdError::Runtime(e.into())),
        }
    })
}

/// `user set USER --caller-id NUM`: changes what a subscriber's calls assert ("" clears it:
/// the username is asserted then).
pub(crate) fn set(path: &Path, spec: &str, caller: &str) -> Result<(), CmdError> {
    let cfg = load_config(path)?;
    let (user, domain) = split_user(&cfg, spec)?;
    let id = caller_id(caller)?;
    runtime()?.block_on(async {
        let store = open(&cfg).await?;
        match store.set_caller_id(&user, &domain, id.as_deref()).await {
            Ok(true) => {
                match id {
                    Some(id) => println!("caller ID of {user}@{domain} set to {id}"),
                    None => println!("caller ID of {user}@{domain} cleared"),
                }
                Ok(())
            }
            Ok(false) => Err(CmdError::Usage(anyhow!("no subscriber {user}@{domain}"))),
            Err(e) => Err(CmdError::Runtime(e.into())),
        }
    })
}

pub(crate) fn del(path: &Path, spec: &str) -> Result<(), CmdError> {
    let cfg = load_config(path)?;
    let (user, domain) = split_user(&cfg, spec)?;
    runtime()?.block_on(async {
        let store = open(&cfg).await?;
        match store.delete_subscriber(&user, &domain).await {
            Ok(true) => {
                println!("deleted {user}@{domain} and their registrations");
                Ok(())
            }
            Ok(false) => Err(CmdError::Usage(anyhow!("no subscriber {user}@{domain}"))),
            Err(e) => Err(CmdError::Runtime(e.into())),
        }
    })
}

pub(crate) fn list(path: &Path) -> Result<(), CmdError> {
    let cfg = load_config(path)?;
    runtime()?.block_on(async {
        let store = open(&cfg).await?;
        let subs = store
            .list_subscribers()
            .await
            .map_err(|e| CmdError::Runtime(e.into()))?;
        for s in subs {
            match s.caller_id {
                Some(id) => println!("{}@{} caller-id={id}", s.username, s.domain),
                None => println!("{}@{}", s.username, s.domain),
            }
        }
        Ok(())
    })
}

/// `user import FILE`: one subscriber per line, `USER[@DOMAIN];PASSWORD` (the SIPp injection
/// format; `SEQUENTIAL`/`RANDOM` header lines, blank lines and `#` comments are skipped) or
/// `USER[@DOMAIN] PASSWORD`, optionally followed by a `caller_id=NUM` field (`;` or white
/// space before it; other further fields are ignored, as SIPp files have their own).
/// Existing subscribers get the new password, and the caller ID when one is given. One
/// transaction.
pub(crate) fn import(path: &Path, file: &Path) -> Result<(), CmdError> {
    let cfg = load_config(path)?;
    let text = if file.as_os_str() == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
            .context("reading standard input")
            .map_err(CmdError::Runtime)?;
        s
    } else {
        std::fs::read_to_string(file)
            .with_context(|| format!("reading {}", file.display()))
            .map_err(CmdError::Usage)?
    };
    let now = SystemClock.unix();
    let mut subs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line == "SEQUENTIAL" || line == "RANDOM" {
            continue;
        }
        let (spec, pw) = line
            .split_once(';')
            .or_else(|| line.split_once(char::is_whitespace))
            .ok_or_else(|| {
                CmdError::Usage(anyhow!(
                    "{}:{}: expected USER;PASSWORD",
                    file.display(),
                    i + 1
                ))
            })?;
        let mut fields = pw.split(';');
        let mut pw = fields.next().unwrap_or_default().trim();
        let mut caller = fields.find_map(|f| f.trim().strip_prefix("caller_id="));
        if caller.is_none()
            && let Some((p, c)) = pw.rsplit_once(char::is_whitespace)
            && let Some(c) = c.strip_prefix("caller_id=")
        {
            pw = p.trim();
            caller = Some(c);
        }
        let caller = caller.map(caller_id).transpose()?.flatten();
        if pw.is_empty() {
            return Err(CmdError::Usage(anyhow!(
                "{}:{}: empty password",
                file.display(),
                i + 1
            )));
        }
        let (user, domain) = split_user(&cfg, spec.trim())?;
        let (ha1_md5, ha1_sha256) = hashes(&cfg, &user, &domain, pw);
        subs.push(Subscriber {
            username: user,
            domain,
            ha1_md5,
            ha1_sha256: Some(ha1_sha256),
            created: now,
            caller_id: caller,
        });
    }
    runtime()?.block_on(async {
        let store = open(&cfg).await?;
        let n = store
            .upsert_subscribers(&subs)
            .await
            .map_err(|e| CmdError::Runtime(e.into()))?;
        println!("imported {n} subscriber(s)");
        Ok(())
    })
}

/// Where `user import --kamailio…` reads Kamailio's `subscriber` table.
#[derive(Debug)]
pub(crate) enum KamailioSource {
    /// A database URL (sqlite://, postgres://, mysql://).
    Database(String),
    /// An export with a header line: tab- or comma-separated.
    Dump(std::path::PathBuf),
}

/// `user import --kamailio URL | --kamailio-dump FILE`: Kamailio/OpenSER subscribers with
/// their MD5 HA1 (Kamailio's `ha1` column) and no SHA-256 HA1 until their password is next
/// set. HA1 = MD5(user:realm:password), so a row is imported only when the realm it was
/// hashed for (`--kamailio-realm`, else its domain, as kamctl does) is the realm sipedge will
/// challenge that user with (`auth.realm`, else the domain); other rows are skipped with a
/// line on standard error saying why. Existing subscribers get the imported hash.
pub(crate) fn import_kamailio(
    path: &Path,
    source: KamailioSource,
    kamailio_realm: Option<&str>,
) -> Result<(), CmdError> {
    let cfg = load_config(path)?;
    if !cfg.auth.algorithms.contains(&DigestAlgorithm::Md5) {
        return Err(CmdError::Usage(anyhow!(
            "auth.algorithms does not offer MD5: subscribers imported with Kamailio's MD5 \
             HA1 could not authenticate; add \"MD5\" to auth.algorithms"
        )));
    }
    let rt = runtime()?;
    let rows = match &source {
        KamailioSource::Database(url) => rt
            .block_on(sipedge::store::read_kamailio_subscribers(url))
            .context("reading Kamailio's subscriber table")
            .map_err(CmdError::Runtime)?,
        KamailioSource::Dump(file) => {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("reading {}", file.display()))
                .map_err(CmdError::Usage)?;
            parse_kamailio_dump(&text)
                .map_err(|e| CmdError::Usage(anyhow!("{}: {e}", file.display())))?
        }
    };
    let now = SystemClock.unix();
    let mut subs = Vec::new();
    let mut skipped = 0;
    for row in &rows {
        match kamailio_subscriber(&cfg, row, kamailio_realm, now) {
            Ok(s) => subs.push(s),
            Err(why) => {
                skipped += 1;
                eprintln!("sipedge: skipped {}@{}: {why}", row.username, row.domain);
            }
        }
    }
    rt.block_on(async {
        let store = open(&cfg).await?;
        let n = store
            .upsert_subscribers(&subs)
            .await
            .map_err(|e| CmdError::Runtime(e.into()))?;
        println!(
            "imported {n} subscriber(s) from Kamailio (MD5 only until `sipedge user passwd`), \
             skipped {skipped}"
        );
        Ok(())
    })
}

/// A Kamailio row as a subscriber, or why it cannot be one.
fn kamailio_subscriber(
    cfg: &Config,
    row: &sipedge::store::KamailioSubscriber,
    kamailio_realm: Option<&str>,
    now: u64,
) -> Result<Subscriber, String> {
    let spec = if row.domain.is_empty() {
        row.username.clone()
    } else {
        format!("{}@{}", row.username, row.domain)
    };
    let (username, domain) = split_user(cfg, &spec).map_err(|e| match e {
        CmdError::Usage(e) | CmdError::Runtime(e) => e.to_string(),
    })?;
    let ha1 = row.ha1.trim().to_ascii_lowercase();
    if ha1.len() != 32 || !ha1.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "ha1 {:?} is not an MD5 digest (32 hex digits)",
            row.ha1
        ));
    }
    // kamctl hashes with the domain as the realm (`_gen_ha1 user domain password`), and the
    // default kamailio.cfg challenges with it (auth_check($fd, …)).
    let theirs = kamailio_realm.map_or_else(|| domain.clone(), str::to_ascii_lowercase);
    let ours = cfg.auth.realm.clone().unwrap_or_else(|| domain.clone());
    if theirs != ours.to_ascii_lowercase() {
        return Err(format!(
            "its HA1 was computed for realm {theirs:?}, but sipedge challenges this user in \
             realm {ours:?} (auth.realm, else the domain): the hash could never match; set \
             auth.realm or --kamailio-realm, or add the user with a new password"
        ));
    }
    Ok(Subscriber {
        username,
        domain,
        ha1_md5: ha1,
        ha1_sha256: None,
        caller_id: None,
        created: now,
    })
}

/// An export of Kamailio's `subscriber` table: a header line naming the columns (`username`,
/// `ha1` and, with `use_domain`, `domain`; any others, such as `id`, `password` or `ha1b`, are
/// ignored), then one row per line; tab-separated when the header holds a tab (`mysql -B`),
/// else comma-separated with optional double quotes (`psql --csv`, `sqlite3 -csv -header`).
fn parse_kamailio_dump(text: &str) -> Result<Vec<sipedge::store::KamailioSubscriber>, String> {
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty());
    let (_, header) = lines.next().ok_or("empty file: expected a header line")?;
    let sep = if header.contains('\t') { '\t' } else { ',' };
    let names = split_fields(header, sep);
    let col = |name: &str| names.iter().position(|n| n.eq_ignore_ascii_case(name));
    let (Some(user_col), Some(ha1_col)) = (col("username"), col("ha1")) else {
        return Err(format!(
            "the header line {header:?} must name the columns, with username and ha1 among them"
        ));
    };
    let domain_col = col("domain");
    let mut rows = Vec::new();
    for (i, line) in lines {
        let fields = split_fields(line, sep);
        let field = |c: usize| fields.get(c).cloned();
        let (Some(username), Some(ha1)) = (field(user_col), field(ha1_col)) else {
            return Err(format!(
                "line {}: {} field(s), the header has {}",
                i + 1,
                fields.len(),
                names.len()
            ));
        };
        rows.push(sipedge::store::KamailioSubscriber {
            username,
            domain: domain_col.and_then(field).unwrap_or_default(),
            ha1,
        });
    }
    Ok(rows)
}

/// The fields of one line: split at `sep`, a field in double quotes may hold `sep` and `""`.
fn split_fields(line: &str, sep: char) -> Vec<String> {
    let line = line.trim_end_matches('\r');
    let mut fields = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            '"' if quoted => quoted = false,
            '"' if cur.is_empty() => quoted = true,
            c if c == sep && !quoted => fields.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    fields.push(cur);
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(auth: &str) -> Config {
        Config::from_toml(
            &format!("[server]\ndomains = [\"example.com\", \"b.example\"]\n[auth]\n{auth}\n"),
            || "192.0.2.10".parse().unwrap(),
        )
        .unwrap()
    }

    fn row(user: &str, domain: &str, ha1: &str) -> sipedge::store::KamailioSubscriber {
        sipedge::store::KamailioSubscriber {
            username: user.into(),
            domain: domain.into(),
            ha1: ha1.into(),
        }
    }

    #[test]
    fn dumps_of_mysql_psql_and_sqlite3() {
        let tsv = "id\tusername\tdomain\tpassword\tha1\tha1b\n\
                   1\talice\texample.com\t\tAAAA\tbbbb\n\n2\tbob\texample.com\t\tcccc\tdddd\n";
        let rows = parse_kamailio_dump(tsv).unwrap();
        assert_eq!(
            rows,
            [
                row("alice", "example.com", "AAAA"),
                row("bob", "example.com", "cccc")
            ]
        );
        let csv = "username,ha1,domain\r\n\"carol\",\"ee,ff\",b.example\r\n\"d\"\"q\",x,\r\n";
        let rows = parse_kamailio_dump(csv).unwrap();
        assert_eq!(
            rows,
            [row("carol", "b.example", "ee,ff"), row("d\"q", "", "x")]
        );
        // use_domain = 0: no domain column.
        assert_eq!(
            parse_kamailio_dump("username,ha1\nerin,abcd\n").unwrap(),
            [row("erin", "", "abcd")]
        );
        assert!(parse_kamailio_dump("").is_err());
        assert!(
            parse_kamailio_dump("user,hash\nalice,x\n").is_err(),
            "no named columns"
        );
        assert!(
            parse_kamailio_dump("username,domain,ha1\nalice\n").is_err(),
            "short row"
        );
    }

    #[test]
    fn rows_need_an_md5_ha1_for_the_realm_they_will_be_challenged_in() {
        let ha1 = digest::ha1(DigestAlgorithm::Md5, "alice", "example.com", "pw");
        let by_domain = cfg("");
        let s = kamailio_subscriber(
            &by_domain,
            &row("alice", "EXAMPLE.com", &ha1.to_uppercase()),
            None,
            7,
        )
        .unwrap();
        assert_eq!(
            s,
            Subscriber {
                username: "alice".into(),
                domain: "example.com".into(),
                ha1_md5: ha1.clone(),
                ha1_sha256: None,
                caller_id: None,
                created: 7,
            }
        );
        // use_domain = 0: the first served domain.
        let s = kamailio_subscriber(&by_domain, &row("alice", "", &ha1), None, 7).unwrap();
        assert_eq!(s.domain, "example.com");
        for bad in ["", "abc", &"g".repeat(32), &"a".repeat(64)] {
            let e = kamailio_subscriber(&by_domain, &row("alice", "example.com", bad), None, 7)
                .unwrap_err();
            assert!(e.contains("not an MD5 digest"), "{e}");
        }
        let e = kamailio_subscriber(&by_domain, &row("alice", "other.example", &ha1), None, 7)
            .unwrap_err();
        assert!(e.contains("server.domains"), "{e}");
        // A fixed auth.realm: rows hashed for their domain do not fit, unless Kamailio used
        // that realm too.
        let fixed = cfg("realm = \"sip.example\"");
        let e =
            kamailio_subscriber(&fixed, &row("alice", "example.com", &ha1), None, 7).unwrap_err();
        assert!(
            e.contains("realm \"example.com\"") && e.contains("\"sip.example\""),
            "{e}"
        );
        assert!(
            kamailio_subscriber(
                &fixed,
                &row("alice", "example.com", &ha1),
                Some("sip.example"),
                7
            )
            .is_ok()
        );
        // And with sipedge challenging by domain, a Kamailio fixed realm does not fit either.
        let e = kamailio_subscriber(
            &by_domain,
            &row("alice", "b.example", &ha1),
            Some("sip.example"),
            7,
        )
        .unwrap_err();
        assert!(e.contains("\"b.example\""), "{e}");
    }
}
