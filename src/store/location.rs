//! The `location` table: the registrar's bindings, written through on every change.

use std::borrow::{Borrow, Cow};
use std::net::SocketAddr;
use std::sync::OnceLock;

use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Connection, Row};

use super::dialect::Dialect;
use super::writer::Change;
use super::{Store, StoreError, from_i64, text, to_i64};
use crate::transport::Proto;

/// One registered contact of an address-of-record.
#[derive(Debug, Clone, PartialEq)]
pub struct Binding {
    /// `user@domain`, domain lower-cased.
    pub aor: String,
    /// The Contact URI exactly as the phone sent it.
    pub contact: String,
    /// Where the REGISTER came from: the phone's NAT binding, used to reach it when
    /// [`Binding::nated`].
    pub received: SocketAddr,
    /// nathelper's tests said the REGISTER came through NAT (a private Contact, or a Via
    /// sent-by other than the source; Kamailio `fix_nated_register`): the contact is reached
    /// at `received`. Otherwise at its Contact URI (a public phone, or a registration made
    /// on its behalf by a third party).
    pub nated: bool,
    pub transport: Proto,
    /// Our socket the REGISTER arrived on.
    pub local_socket: SocketAddr,
    /// `server.instance_id` of the instance that owns the NAT binding.
    pub instance: String,
    /// Unix seconds.
    pub expires: u64,
    /// q-value in per-mille (0..=1000); 1000 when the phone gave none.
    pub q: u16,
    pub call_id: String,
    pub cseq: u32,
    pub user_agent: String,
    /// Path header values (RFC 3327), comma-joined, as received.
    pub path: String,
    /// `+sip.instance` (RFC 5626), without quotes; empty when absent.
    pub instance_urn: String,
    /// Unix seconds of the last REGISTER that refreshed it.
    pub updated: u64,
}

impl Binding {
    /// Seconds left at `now`.
    pub fn remaining(&self, now: u64) -> u64 {
        self.expires.saturating_sub(now)
    }
}

const COLS: [&str; 15] = [
    "aor",
    "contact",
    "received",
    "transport",
    "local_socket",
    "instance",
    "expires",
    "q",
    "call_id",
    "cseq",
    "user_agent",
    "path",
    "instance_urn",
    "updated",
    "nated",
];
const KEY: [&str; 2] = ["aor", "contact"];

/// Multi-row upserts are rendered once for batches of up to this many rows (the binding
/// writer's batches are mostly smaller; a larger one is rendered when it occurs).
const CACHED_ROWS: usize = 64;

/// The table's queries in one dialect.
#[derive(Debug)]
pub(super) struct Sql {
    dialect: Dialect,
    load: String,
    load_aor: String,
    upsert: String,
    /// `upsert_rows[n]`: the upsert of `n` rows in one statement, rendered on first use
    /// (formatting it per batch cost 3 % of the registrar's CPU at 8,000 registrations/s).
    upsert_rows: Box<[OnceLock<String>]>,
    delete: String,
    delete_expired: String,
}

impl Sql {
    pub(super) fn new(d: Dialect) -> Self {
        Self {
            dialect: d,
            load: d.sql(&format!(
                "SELECT {} FROM location WHERE expires > ?",
                COLS.join(", ")
            )),
            load_aor: d.sql(&format!(
                "SELECT {} FROM location WHERE aor = ? AND expires > ?",
                COLS.join(", ")
            )),
            upsert: d.upsert("location", &COLS, &KEY, &COLS[KEY.len()..]),
            upsert_rows: (0..=CACHED_ROWS).map(|_| OnceLock::new()).collect(),
            delete: d.sql("DELETE FROM location WHERE aor = ? AND contact = ?"),
            delete_expired: d.sql("DELETE FROM location WHERE expires <= ?"),
        }
    }

    /// The upsert of `rows` bindings (≥ 1) in one statement.
    fn upsert_of(&self, rows: usize) -> Cow<'_, str> {
        let render = || {
            self.dialect
                .upsert_rows("location", &COLS, &KEY, &COLS[KEY.len()..], rows)
        };
        match self.upsert_rows.get(rows) {
            _ if rows == 1 => Cow::Borrowed(&self.upsert),
            Some(cached) => Cow::Borrowed(cached.get_or_init(render)),
            None => Cow::Owned(render()),
        }
    }
}

impl Sql {
    /// [`Store::write_bindings`] on the SQLite writer thread's own connection
    /// ([`super::sqlite_writer`]): one binding refreshed is one autocommit upsert; anything
    /// more is one `BEGIN IMMEDIATE` transaction of the removals, then the upserts, each a
    /// run of the one prepared statement.
    pub(super) fn write_sqlite(
        &self,
        conn: &mut rusqlite::Connection,
        changes: &[Change],
    ) -> Result<(), StoreError> {
        if let [c] = changes
            && c.remove.is_empty()
            && c.upsert.len() == 1
        {
            return self.run_sqlite(conn, changes);
        }
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        self.run_sqlite(&tx, changes)?;
        tx.commit()?;
        Ok(())
    }

    /// The statements of [`Self::write_sqlite`].
    fn run_sqlite(&self, db: &rusqlite::Connection, changes: &[Change]) -> Result<(), StoreError> {
        for c in changes {
            for contact in &c.remove {
                db.prepare_cached(&self.delete)?
                    .execute((c.aor.as_str(), contact.as_str()))?;
            }
        }
        let mut addr = String::with_capacity(48);
        for b in changes.iter().flat_map(|c| c.upsert.iter()) {
            let mut st = db.prepare_cached(&self.upsert)?;
            bind_row(&mut st, b, &mut addr)?;
            st.raw_execute()?;
        }
        Ok(())
    }
}

impl Store {
    /// Every binding that has not expired at `now`.
    pub async fn load_bindings(&self, now: u64) -> Result<Vec<Binding>, StoreError> {
        let rows = sqlx::query(&self.sql.location.load)
            .bind(to_i64(now))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(from_row).collect()
    }

    /// The bindings of one address-of-record that have not expired at `now`.
    pub async fn load_aor(&self, aor: &str, now: u64) -> Result<Vec<Binding>, StoreError> {
        let rows = sqlx::query(&self.sql.location.load_aor)
            .bind(aor)
            .bind(to_i64(now))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(from_row).collect()
    }

    /// Writes the new state of one address-of-record in a transaction: `upsert` are inserted
    /// or replaced, `remove` (contact URIs) deleted. On PostgreSQL the other instances are
    /// notified in the same transaction ([`super::LOCATION_CHANNEL`]).
    pub async fn save_bindings<B: Borrow<Binding>>(
        &self,
        aor: &str,
        upsert: &[B],
        remove: &[String],
    ) -> Result<(), StoreError> {
        // The common case, one contact refreshed: a single autocommit statement (a transaction
        // would cost three more round trips to the database thread).
        if let ([b], [], false) = (upsert, remove, self.is_postgres()) {
            self.upsert_binding(b.borrow()).execute(&self.pool).await?;
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        for contact in remove {
            sqlx::query(&self.sql.location.delete)
                .bind(aor)
                .bind(contact)
                .execute(&mut *tx)
                .await?;
        }
        for b in upsert {
            self.upsert_binding(b.borrow()).execute(&mut *tx).await?;
        }
        if self.is_postgres() {
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(super::LOCATION_CHANNEL)
                .bind(aor)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Writes the changes of several addresses-of-record (each at most once) on `conn`: one
    /// multi-row upsert, alone when that is all (one autocommit statement), else in a
    /// transaction with the deletes and, on PostgreSQL, one notification per AOR. The
    /// group commit of [`super::BindingWriter`].
    pub(super) async fn write_bindings(
        &self,
        conn: &mut AnyConnection,
        changes: &[Change],
    ) -> Result<(), StoreError> {
        let rows: usize = changes.iter().map(|c| c.upsert.len()).sum();
        let removes = changes.iter().any(|c| !c.remove.is_empty());
        let upsert = (rows > 0).then(|| self.sql.location.upsert_of(rows));
        let bound = |sql| {
            changes
                .iter()
                .flat_map(|c| c.upsert.iter().map(|b| &**b))
                .fold(sqlx::query(sql), bind)
        };
        if !removes && !self.is_postgres() {
            if let Some(sql) = &upsert {
                bound(sql).execute(&mut *conn).await?;
            }
            return Ok(());
        }
        let mut tx = conn.begin().await?;
        for c in changes {
            for contact in &c.remove {
                sqlx::query(&self.sql.location.delete)
                    .bind(c.aor.as_str())
                    .bind(contact.as_str())
                    .execute(&mut *tx)
                    .await?;
            }
        }
        if let Some(sql) = &upsert {
            bound(sql).execute(&mut *tx).await?;
        }
        if self.is_postgres() {
            for c in changes {
                sqlx::query("SELECT pg_notify($1, $2)")
                    .bind(super::LOCATION_CHANNEL)
                    .bind(c.aor.as_str())
                    .execute(&mut *tx)
                    .await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    /// Deletes bindings that expired at or before `now`; returns how many.
    pub async fn delete_expired(&self, now: u64) -> Result<u64, StoreError> {
        let r = sqlx::query(&self.sql.location.delete_expired)
            .bind(to_i64(now))
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected())
    }

    /// The upsert of one binding.
    fn upsert_binding<'q>(
        &'q self,
        b: &'q Binding,
    ) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
        bind(sqlx::query(&self.sql.location.upsert), b)
    }
}

use super::AnyQuery;

/// Binds one binding's values, in the order of [`COLS`]. Strings are bound as `&str`: the `Any`
/// driver borrows those, where a `&String` is cloned before the backend copies it again (one
/// allocation less per string per row; issue #15).
fn bind<'q>(q: AnyQuery<'q>, b: &'q Binding) -> AnyQuery<'q> {
    q.bind(b.aor.as_str())
        .bind(b.contact.as_str())
        .bind(b.received.to_string())
        .bind(b.transport.as_str())
        .bind(b.local_socket.to_string())
        .bind(b.instance.as_str())
        .bind(to_i64(b.expires))
        .bind(f64::from(b.q) / 1000.0)
        .bind(b.call_id.as_str())
        .bind(i64::from(b.cseq))
        .bind(b.user_agent.as_str())
        .bind(b.path.as_str())
        .bind(b.instance_urn.as_str())
        .bind(to_i64(b.updated))
        .bind(i64::from(b.nated))
}

/// [`bind`] for the SQLite writer: one binding's values, in the order of [`COLS`]. SQLite
/// copies each value as it is bound, so the two addresses share one scratch string.
fn bind_row(
    st: &mut rusqlite::Statement<'_>,
    b: &Binding,
    addr: &mut String,
) -> rusqlite::Result<()> {
    use std::fmt::Write;
    let mut text = |st: &mut rusqlite::Statement<'_>, i: usize, a: SocketAddr| {
        addr.clear();
        // invariant: writing to a String cannot fail.
        let _ = write!(addr, "{}", crate::sip::text::Addr(a));
        st.raw_bind_parameter(i, addr.as_str())
    };
    st.raw_bind_parameter(1, b.aor.as_str())?;
    st.raw_bind_parameter(2, b.contact.as_str())?;
    text(st, 3, b.received)?;
    st.raw_bind_parameter(4, b.transport.as_str())?;
    text(st, 5, b.local_socket)?;
    st.raw_bind_parameter(6, b.instance.as_str())?;
    st.raw_bind_parameter(7, to_i64(b.expires))?;
    st.raw_bind_parameter(8, f64::from(b.q) / 1000.0)?;
    st.raw_bind_parameter(9, b.call_id.as_str())?;
    st.raw_bind_parameter(10, i64::from(b.cseq))?;
    st.raw_bind_parameter(11, b.user_agent.as_str())?;
    st.raw_bind_parameter(12, b.path.as_str())?;
    st.raw_bind_parameter(13, b.instance_urn.as_str())?;
    st.raw_bind_parameter(14, to_i64(b.updated))?;
    st.raw_bind_parameter(15, i64::from(b.nated))
}

fn from_row(r: &AnyRow) -> Result<Binding, StoreError> {
    let corrupt = |what: String| StoreError::Corrupt {
        table: "location",
        what,
    };
    let addr = |col: &str| -> Result<SocketAddr, StoreError> {
        let v = text(r, col)?;
        v.parse().map_err(|_| corrupt(format!("{col} = {v:?}")))
    };
    let transport = text(r, "transport")?;
    let transport = match Proto::from_token(&transport) {
        Some(p) => p,
        None => return Err(corrupt(format!("transport = {transport:?}"))),
    };
    let q: f64 = r.try_get("q")?;
    Ok(Binding {
        aor: text(r, "aor")?,
        contact: text(r, "contact")?,
        received: addr("received")?,
        transport,
        local_socket: addr("local_socket")?,
        instance: text(r, "instance")?,
        expires: from_i64(r.try_get("expires")?),
        // invariant: q is stored from a u16 per-mille value in 0..=1000.
        q: (q * 1000.0).round().clamp(0.0, 1000.0) as u16,
        call_id: text(r, "call_id")?,
        cseq: u32::try_from(r.try_get::<i64, _>("cseq")?).map_err(|_| corrupt("cseq".into()))?,
        user_agent: text(r, "user_agent")?,
        path: text(r, "path")?,
        instance_urn: text(r, "instance_urn")?,
        updated: from_i64(r.try_get("updated")?),
        nated: r.try_get::<i64, _>("nated")? != 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch's upsert is the same statement whether it comes from the cache (rendered once)
    /// or is rendered for a batch larger than the cache holds; one row is the single upsert.
    #[test]
    fn batched_upserts_are_rendered_once_per_row_count() {
        for d in [Dialect::Sqlite, Dialect::Postgres, Dialect::Mysql] {
            let sql = Sql::new(d);
            let fresh = |n| d.upsert_rows("location", &COLS, &KEY, &COLS[KEY.len()..], n);
            assert_eq!(sql.upsert_of(1), sql.upsert.as_str());
            for n in [2, 17, CACHED_ROWS, CACHED_ROWS + 1, 256] {
                let first = sql.upsert_of(n);
                assert_eq!(first, fresh(n), "{d:?}, {n} rows");
                let again = sql.upsert_of(n);
                assert_eq!(
                    matches!(again, Cow::Borrowed(_)),
                    n <= CACHED_ROWS,
                    "{d:?}, {n} rows: cached only up to {CACHED_ROWS} rows"
                );
                if let (Cow::Borrowed(a), Cow::Borrowed(b)) = (&first, &again) {
                    assert!(std::ptr::eq(*a, *b), "rendered once");
                }
            }
        }
    }
}
