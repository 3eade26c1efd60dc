//! HTTP: Prometheus metrics, KServe v2 health and model metadata.

use std::{net::SocketAddr, sync::Arc};

use axum::{
    extract::{Path, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
    Json, Router,
};
use serde_json::json;
use tokio::{net::TcpListener, sync::watch};

use crate::{health::Health, metrics::Metrics, repository::ModelSpec};

#[derive(Clone)]
pub struct AppState {
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub models: Arc<Vec<Arc<ModelSpec>>>,
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

fn find<'a>(state: &'a AppState, name: &str) -> Option<&'a Arc<ModelSpec>> {
    state.models.iter().find(|m| m.name == name)
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
        Some(spec) => Json(metadata(spec)).into_response(),
        None => not_found(format!("unknown model '{model}'")),
    }
}

async fn model_version_metadata(
    State(state): State<AppState>,
    Path((model, version)): Path<(String, String)>,
) -> Response {
    match find(&state, &model) {
        Some(spec) if spec.version.to_string() == version => Json(metadata(spec)).into_response(),
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
