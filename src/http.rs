//! HTTP: Prometheus metrics, KServe v2 health and model metadata, and
//! Triton's model repository control.

use std::{net::SocketAddr, sync::Arc};

use axum::{
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use serde_json::json;
use tokio::{net::TcpListener, sync::watch};

use crate::{
    config::ControlMode,
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

/// Binds `addr` (port 0 picks a free one) and serves until `shutdown` flips.
pub async fn serve(
    addr: &str,
    state: AppState,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = router(state);
    let task = tokio::spawn(async move {
        let stop = async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        };
        if let Err(err) = axum::serve(listener, app)
            .with_graceful_shutdown(stop)
            .await
        {
            tracing::warn!(error = %err, "HTTP server stopped");
        }
    });
    Ok((bound, task))
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

async fn model_ready(State(state): State<AppState>, Path(model): Path<String>) -> Response {
    match find(&state, &model) {
        Some(_) => StatusCode::OK.into_response(),
        None => not_found(format!("unknown model '{model}'")),
    }
}

fn error(status: StatusCode, reason: String) -> Response {
    (status, Json(json!({ "error": reason }))).into_response()
}

async fn repository_index(State(state): State<AppState>) -> Response {
    match &state.control {
        Some(control) => Json(control.index()).into_response(),
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
    fn token_comparison_needs_the_whole_token() {
        assert!(constant_time_eq(b"s3cret", b"s3cret"));
        assert!(!constant_time_eq(b"s3cre", b"s3cret"));
        assert!(!constant_time_eq(b"s3creT", b"s3cret"));
        assert!(!constant_time_eq(b"", b"s3cret"));
    }
}
