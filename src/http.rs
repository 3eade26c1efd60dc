//! HTTP: Prometheus metrics, KServe v2 health and model metadata, and
//! Triton's model repository control.
//!
//! The server has limits, so that clients cannot take what the pipeline
//! needs: at most `[http] max_connections` connections (at the limit the
//! oldest makes room, so a flood of idle clients cannot keep a scraper
//! out), a header-read timeout that also closes idle kept-alive
//! connections, and a request body limit.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use axum::{
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use http_body_util::BodyExt;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::{
    net::TcpListener,
    sync::{watch, Notify, OwnedSemaphorePermit, Semaphore},
};
use tower::ServiceExt;

use crate::{
    config::{ControlMode, HttpSettings},
    health::Health,
    metrics::Metrics,
    repository::{
        control::{ControlError, RepositoryControl, Served},
        ModelSpec,
    },
};

#[derive(Clone)]
pub struct AppState {
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub models: Served,
    pub control: Option<Arc<RepositoryControl>>,
    pub mode: ControlMode,
    /// Bearer token the load and unload endpoints require; None disables them.
    pub token: Option<Arc<str>>,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/v2/health/live", get(|| async { StatusCode::OK }))
        .route("/v2/health/ready", get(ready))
        .route("/v2/models/{model}", get(model_metadata))
        .route(
            "/v2/models/{model}/versions/{version}",
            get(model_version_metadata),
        )
        .route("/v2/models/{model}/ready", get(model_ready))
        .route("/v2/repository/index", post(repository_index))
        .route("/v2/repository/models/{model}/load", post(load_model))
        .route("/v2/repository/models/{model}/unload", post(unload_model))
        .with_state(state)
}

/// The server's limits, from `[http]` and the process's file limit.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub max_request_body_bytes: usize,
}

impl Limits {
    /// `[http]`'s limits, with the connection limit lowered to half of
    /// `file_limit` (the process's open files) when it is above that.
    pub fn new(settings: &HttpSettings, file_limit: Option<u64>) -> Self {
        let half = file_limit.map_or(usize::MAX, |n| usize::try_from(n / 2).unwrap_or(usize::MAX));
        Self {
            max_connections: settings.max_connections.min(half).max(1),
            header_read_timeout: settings.header_read_timeout(),
            max_request_body_bytes: settings.max_request_body_bytes,
        }
    }
}

/// Binds `addr` (port 0 picks a free one) and serves until `shutdown` flips.
pub async fn serve(
    addr: &str,
    limits: Limits,
    state: AppState,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let metrics = state.metrics.clone();
    let app = router(state).layer(tower_http::limit::RequestBodyLimitLayer::new(
        limits.max_request_body_bytes,
    ));
    let task = tokio::spawn(async move {
        let open = Arc::new(Connections::default());
        let permits = Arc::new(Semaphore::new(limits.max_connections));
        loop {
            let stream = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(err) => {
                        // E.g. out of files: wait instead of spinning.
                        tracing::warn!(error = %err, "cannot accept an HTTP connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = stopping(&mut shutdown) => break,
            };
            // Room is made only for a client that is there: an idle
            // connection is not closed before someone needs its place.
            let permit = tokio::select! {
                permit = make_room(&permits, &open, &metrics) => permit,
                _ = stopping(&mut shutdown) => break,
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(serve_connection(
                stream,
                app.clone(),
                limits.header_read_timeout,
                permit,
                open.clone(),
                metrics.clone(),
            ));
        }
    });
    Ok((bound, task))
}

/// Resolves once shutdown is announced.
async fn stopping(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// The open connections, oldest first, each with the signal that asks it
/// to close and whether it is answering a request.
#[derive(Default)]
struct Connections {
    open: Mutex<BTreeMap<u64, Connection>>,
    next_id: std::sync::atomic::AtomicU64,
}

struct Connection {
    close: Arc<Notify>,
    in_request: Arc<AtomicBool>,
}

impl Connections {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Connection>> {
        self.open
            .lock()
            .expect("connection list updates never panic")
    }
}

/// A connection slot: at once when one is free; otherwise asks the oldest
/// connection to close (the oldest idle one first) until one is.
async fn make_room(
    permits: &Arc<Semaphore>,
    open: &Connections,
    metrics: &Metrics,
) -> OwnedSemaphorePermit {
    loop {
        if let Ok(permit) = permits.clone().try_acquire_owned() {
            return permit;
        }
        let oldest = {
            let mut open = open.lock();
            let idle = open
                .iter()
                .find(|(_, c)| !c.in_request.load(Ordering::Relaxed))
                .map(|(id, _)| *id);
            idle.or_else(|| open.keys().next().copied())
                .and_then(|id| open.remove(&id))
        };
        if let Some(connection) = oldest {
            connection.close.notify_one();
            metrics.http_connections_evicted.inc();
        }
        // A connection answering a request closes once it has answered.
        let wait = permits.clone().acquire_owned();
        if let Ok(Ok(permit)) = tokio::time::timeout(Duration::from_millis(50), wait).await {
            return permit;
        }
    }
}

/// Marks a connection as answering a request from when its headers are read
/// until its response is written (or abandoned), when this drops.
struct Answering(Arc<AtomicBool>);

impl Answering {
    fn start(flag: Arc<AtomicBool>) -> Self {
        flag.store(true, Ordering::Relaxed);
        Self(flag)
    }

    /// Keeps the guard alive inside the response body.
    fn hold(&self) {}
}

impl Drop for Answering {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

/// Serves one connection until the client leaves, its header-read timeout
/// passes, or it is asked to make room.
async fn serve_connection(
    stream: tokio::net::TcpStream,
    app: Router,
    header_read_timeout: Duration,
    permit: OwnedSemaphorePermit,
    open: Arc<Connections>,
    metrics: Arc<Metrics>,
) {
    let _permit = permit;
    metrics.http_connections.inc();
    let close = Arc::new(Notify::new());
    let in_request = Arc::new(AtomicBool::new(false));
    let id = open
        .next_id
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    open.lock().insert(
        id,
        Connection {
            close: close.clone(),
            in_request: in_request.clone(),
        },
    );
    let busy = in_request.clone();
    let service = hyper::service::service_fn(move |request| {
        let answering = Answering::start(busy.clone());
        let response = app.clone().oneshot(request);
        async move {
            let response = response.await?;
            // Busy until the body is written: hyper drops it then.
            Ok::<_, std::convert::Infallible>(response.map(|body| {
                axum::body::Body::new(body.map_frame(move |frame| {
                    answering.hold();
                    frame
                }))
            }))
        }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        _ = close.notified() => {
            if in_request.load(Ordering::Relaxed) {
                // Answer the request in flight, then close.
                connection.as_mut().graceful_shutdown();
                connection.await
            } else {
                Ok(())
            }
        }
    };
    if let Err(err) = result {
        tracing::debug!(error = %err, "HTTP connection ended");
    }
    open.lock().remove(&id);
    metrics.http_connections.dec();
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [("content-type", "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

async fn ready(State(state): State<AppState>) -> Response {
    match state.health.readiness() {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(reasons) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", reasons.join("; ")),
        )
            .into_response(),
    }
}

fn find(state: &AppState, name: &str) -> Option<Arc<ModelSpec>> {
    let served = state
        .models
        .read()
        .expect("served list updates never panic");
    served.iter().find(|m| m.name == name).cloned()
}

fn metadata(spec: &ModelSpec) -> serde_json::Value {
    json!({
        "name": spec.name,
        "versions": [spec.version.to_string()],
        "platform": crate::repository::PLATFORM_ONNX,
        "inputs": [{"name": spec.input_name, "datatype": "FP32", "shape": [-1, spec.window as i64, spec.features as i64]}],
        "outputs": [{"name": spec.output_name, "datatype": "FP32", "shape": [-1, spec.horizon as i64]}],
    })
}

fn not_found(what: String) -> Response {
    (StatusCode::NOT_FOUND, Json(json!({ "error": what }))).into_response()
}

async fn model_metadata(State(state): State<AppState>, Path(model): Path<String>) -> Response {
    match find(&state, &model) {
        Some(spec) => Json(metadata(&spec)).into_response(),
        None => not_found(format!("unknown model '{model}'")),
    }
}

async fn model_version_metadata(
    State(state): State<AppState>,
    Path((model, version)): Path<(String, String)>,
) -> Response {
    match find(&state, &model) {
        Some(spec) if spec.version.to_string() == version => Json(metadata(&spec)).into_response(),
        Some(_) => not_found(format!("model '{model}' has no version {version} loaded")),
        None => not_found(format!("unknown model '{model}'")),
    }
}

/// KServe v2 model readiness: 200 while the model serves its channels, 503
/// with the reason while it is unavailable (its calls keep failing).
async fn model_ready(State(state): State<AppState>, Path(model): Path<String>) -> Response {
    if find(&state, &model).is_none() {
        return not_found(format!("unknown model '{model}'"));
    }
    match state.health.model_unavailable(&model) {
        None => StatusCode::OK.into_response(),
        Some(why) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("model {model} is unavailable: {why}"),
        ),
    }
}

fn error(status: StatusCode, reason: String) -> Response {
    (status, Json(json!({ "error": reason }))).into_response()
}

async fn repository_index(State(state): State<AppState>) -> Response {
    match &state.control {
        Some(control) => Json(control.index(&state.health)).into_response(),
        None => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "repository control is not running".into(),
        ),
    }
}

/// Load and unload change what is served: explicit mode only, and only with
/// the configured token. The refusal is the status and reason for `error`.
fn authorise(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<Arc<RepositoryControl>, (StatusCode, String)> {
    if state.mode != ControlMode::Explicit {
        return Err((
            StatusCode::BAD_REQUEST,
            format!(
                "model control mode is {:?}: load and unload need [repository] mode = \"explicit\"",
                state.mode
            )
            .to_lowercase(),
        ));
    }
    let Some(token) = &state.token else {
        return Err((
            StatusCode::FORBIDDEN,
            "load and unload are disabled: set SATWATCH_REPOSITORY_TOKEN (or [repository] control_token) to enable them".into(),
        ));
    };
    let given = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if !given.is_some_and(|g| constant_time_eq(g.as_bytes(), token.as_bytes())) {
        return Err((
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token".into(),
        ));
    }
    state.control.clone().ok_or_else(|| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "repository control is not running".into(),
        )
    })
}

/// Compares without an early exit, so timing does not reveal a prefix.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn control_error(err: ControlError) -> Response {
    let status = match err {
        ControlError::NotFound(_) => StatusCode::NOT_FOUND,
        ControlError::Refused(_) => StatusCode::BAD_REQUEST,
        ControlError::Conflict(_) => StatusCode::CONFLICT,
    };
    error(status, err.to_string())
}

async fn load_model(
    State(state): State<AppState>,
    Path(model): Path<String>,
    headers: HeaderMap,
) -> Response {
    let control = match authorise(&state, &headers) {
        Ok(control) => control,
        Err((status, reason)) => return error(status, reason),
    };
    match control.load(&model).await {
        Ok(version) => {
            Json(json!({ "name": model, "version": version.to_string() })).into_response()
        }
        Err(err) => control_error(err),
    }
}

async fn unload_model(
    State(state): State<AppState>,
    Path(model): Path<String>,
    headers: HeaderMap,
) -> Response {
    let control = match authorise(&state, &headers) {
        Ok(control) => control,
        Err((status, reason)) => return error(status, reason),
    };
    match control.unload(&model) {
        Ok(()) => StatusCode::OK.into_response(),
        Err(err) => control_error(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_limit_stays_under_half_the_file_limit() {
        let settings = HttpSettings::default();
        assert_eq!(Limits::new(&settings, None).max_connections, 1024);
        assert_eq!(Limits::new(&settings, Some(65536)).max_connections, 1024);
        assert_eq!(Limits::new(&settings, Some(1024)).max_connections, 512);
        assert_eq!(Limits::new(&settings, Some(1)).max_connections, 1);
    }

    #[test]
    fn token_comparison_needs_the_whole_token() {
        assert!(constant_time_eq(b"s3cret", b"s3cret"));
        assert!(!constant_time_eq(b"s3cre", b"s3cret"));
        assert!(!constant_time_eq(b"s3creT", b"s3cret"));
        assert!(!constant_time_eq(b"", b"s3cret"));
    }
}
