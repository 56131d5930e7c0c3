//! The loopback control endpoint (`[control] listen`, default `127.0.0.1:8060`): JSON for
//! `sipedge show`, `/metrics` for Prometheus, and a read-only web page.
//!
//! | path                     | what                                                        |
//! | ------------------------ | ----------------------------------------------------------- |
//! | `/`                      | the web page (registrations, live calls, recent calls)      |
//! | `/metrics`               | every counter of the registry, OpenMetrics text             |
//! | `/api/status`            | version, pid, uptime, instance                              |
//! | `/api/registrations`     | the location service's bindings (kamcmd `ul.dump`)          |
//! | `/api/calls`             | relayed calls with live per-direction figures (rtpengine-ctl `list sessions`) |
//! | `/api/transactions`      | live transactions                                           |
//! | `/api/stats`             | the counters as JSON                                        |
//! | `/api/cdr?limit=N`       | the most recent CDR rows                                    |
//!
//! Read-only, on loopback only (the configuration refuses other addresses): the endpoint has
//! no credentials, so what it serves is what any local user may read, and nothing it serves
//! changes the server (`sipedge reload` signals the process, which needs the OS's permission).
//! Bounded like every listener: [`MAX_CONNECTIONS`] at once, a header deadline, one request
//! per connection.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tracing::{debug, info};

use crate::clock::Clock;
use crate::media::session::Media;
use crate::metrics::Registry;
use crate::proxy::stateful::Proxy;
use crate::registrar::location::LocationService;
use crate::store::Store;

/// Connections served at once; more wait in the kernel's backlog.
pub const MAX_CONNECTIONS: usize = 32;
/// A request's headers must arrive within this.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// A response must be produced within this (the relay's figures are a round trip each).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);
/// Rows listed at most per table.
const MAX_ROWS: usize = 10_000;

const PAGE: &str = include_str!("page.html");

/// What the endpoint reads.
pub struct State {
    pub location: Arc<dyn LocationService>,
    pub media: Arc<Media>,
    pub proxy: Arc<Proxy>,
    pub metrics: Arc<Registry>,
    pub store: Store,
    pub clock: Arc<dyn Clock>,
    /// `server.instance_id`.
    pub instance: String,
    /// Unix seconds at start.
    pub started: u64,
}

/// The bound endpoint.
pub struct Control {
    listener: TcpListener,
    state: Arc<State>,
}

impl Control {
    /// Binds `addr` (a loopback address, checked by the configuration).
    pub async fn bind(addr: SocketAddr, state: State) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        Ok(Self {
            listener,
            state: Arc::new(state),
        })
    }

    /// The bound address (the real port when 0 was configured).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` becomes true.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        if let Ok(addr) = self.listener.local_addr() {
            info!(%addr, "control endpoint listening");
        }
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        loop {
            let permit = tokio::select! {
                p = slots.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return,
                },
                _ = shutdown.changed() => return,
            };
            let (stream, peer) = tokio::select! {
                r = self.listener.accept() => match r {
                    Ok(c) => c,
                    Err(error) => {
                        debug!(%error, "control endpoint accept failed");
                        continue;
                    }
                },
                _ = shutdown.changed() => return,
            };
            let state = self.state.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(respond(&state, req).await) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .keep_alive(false)
                    .serve_connection(TokioIo::new(stream), service);
                if let Err(error) = tokio::time::timeout(RESPONSE_TIMEOUT * 2, conn)
                    .await
                    .unwrap_or(Ok(()))
                {
                    debug!(%error, %peer, "control connection ended");
                }
                drop(permit);
            });
        }
    }
}

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(CONTENT_TYPE, v);
    }
    if let Ok(v) = "no-store".parse() {
        r.headers_mut().insert(CACHE_CONTROL, v);
    }
    r
}

fn json_reply(v: &Value) -> Response<Full<Bytes>> {
    reply(StatusCode::OK, "application/json", v.to_string())
}

async fn respond(state: &State, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "read-only endpoint: GET only\n",
        );
    }
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    match tokio::time::timeout(RESPONSE_TIMEOUT, route(state, &path, &query)).await {
        Ok(r) => r,
        Err(_) => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain; charset=utf-8",
            "timed out\n",
        ),
    }
}

async fn route(state: &State, path: &str, query: &str) -> Response<Full<Bytes>> {
    match path {
        "/" | "/index.html" => reply(StatusCode::OK, "text/html; charset=utf-8", PAGE),
        "/metrics" => {
            state.metrics.refresh().await;
            reply(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                state.metrics.encode(),
            )
        }
        "/api/status" => json_reply(&status(state)),
        "/api/registrations" => json_reply(&registrations(state)),
        "/api/calls" => json_reply(&calls(state).await),
        "/api/transactions" => json_reply(&transactions(state)),
        "/api/stats" => {
            state.metrics.refresh().await;
            json_reply(&stats(&state.metrics))
        }
        "/api/cdr" => {
            let limit = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("limit="))
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(50)
                .min(1000);
            match state.store.recent_cdrs(limit).await {
                Ok(rows) => json_reply(&Value::Array(rows)),
                Err(error) => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain; charset=utf-8",
                    format!("database: {error}\n"),
                ),
            }
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found\n",
        ),
    }
}

fn status(state: &State) -> Value {
    let now = state.clock.unix();
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "pid": std::process::id(),
        "instance": state.instance,
        "started_unix": state.started,
        "uptime_s": now.saturating_sub(state.started),
    })
}

fn registrations(state: &State) -> Value {
    let now = state.clock.unix();
    let mut all = state.location.snapshot();
    all.retain(|b| b.expires > now);
    all.sort_by(|a, b| a.aor.cmp(&b.aor).then(a.contact.cmp(&b.contact)));
    all.truncate(MAX_ROWS);
    Value::Array(
        all.iter()
            .map(|b| {
                json!({
                    "aor": b.aor,
                    "contact": b.contact,
                    "received": b.received.to_string(),
                    // Reached at `received` (true) or at the Contact (false).
                    "nated": b.nated,
                    "transport": b.transport.as_str().to_ascii_lowercase(),
                    "local_socket": b.local_socket.to_string(),
                    "expires_in": b.remaining(now),
                    "q": f64::from(b.q) / 1000.0,
                    "user_agent": b.user_agent,
                    "instance": b.instance,
                    "path": b.path,
                    "call_id": b.call_id,
                    "cseq": b.cseq,
                    "updated_unix": b.updated,
                })
            })
            .collect(),
    )
}

async fn calls(state: &State) -> Value {
    let now = state.clock.unix();
    let calls = state.media.live_calls(MAX_ROWS).await;
    Value::Array(
        calls
            .into_iter()
            .map(|c| {
                let mut v = serde_json::to_value(&c).unwrap_or(Value::Null);
                if let Value::Object(m) = &mut v {
                    m.insert(
                        "duration_s".into(),
                        json!(now.saturating_sub(c.answer_unix.unwrap_or(c.start_unix))),
                    );
                }
                v
            })
            .collect(),
    )
}

fn transactions(state: &State) -> Value {
    let (server, client) = state.proxy.transaction_count();
    let list: Vec<Value> = state
        .proxy
        .transactions(MAX_ROWS)
        .into_iter()
        .map(|(side, k)| json!({"side": side, "method": k.method(), "branch": k.branch(), "sent_by": k.sent_by()}))
        .collect();
    json!({"server": server, "client": client, "transactions": list})
}

/// The registry as `{"name": value, "name{k=v}": value, …}` in registration order.
pub fn stats(metrics: &Registry) -> Value {
    let mut map = serde_json::Map::new();
    for s in metrics.snapshot() {
        let mut name = s.name;
        if !s.labels.is_empty() {
            let labels: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            name = format!("{name}{{{}}}", labels.join(","));
        }
        map.insert(name, json!(s.value));
    }
    Value::Object(map)
}
