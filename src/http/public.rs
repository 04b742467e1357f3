//! The routes every instance serves whatever its role: health, readiness, metrics and
//! the public signing keys.

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use super::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/keys", get(keys))
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

/// Whether Redis and MySQL answer a ping within two seconds (both asked at once).
pub(super) async fn reachable(app: &crate::app::App) -> (bool, bool) {
    let timeout = std::time::Duration::from_secs(2);
    let (redis, mysql) = tokio::join!(
        tokio::time::timeout(timeout, app.redis.ping()),
        tokio::time::timeout(timeout, app.db.ping()),
    );
    (matches!(redis, Ok(Ok(()))), matches!(mysql, Ok(Ok(()))))
}

async fn readyz(State(app): State<AppState>) -> Response {
    let (redis_ok, mysql_ok) = reachable(&app).await;
    let status = if redis_ok && mysql_ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({
        "ready": redis_ok && mysql_ok,
        "redis": if redis_ok { "ok" } else { "unreachable" },
        "mysql": if mysql_ok { "ok" } else { "unreachable" },
    });
    (status, Json(body)).into_response()
}

async fn metrics(State(app): State<AppState>) -> Response {
    app.update_gauges().await;
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        )],
        app.metrics.render(),
    )
        .into_response()
}

#[derive(Serialize)]
struct KeysBody {
    keys: Vec<crate::keys::PublicKey>,
}

async fn keys(State(app): State<AppState>) -> Json<KeysBody> {
    Json(KeysBody {
        keys: app.keys.current().published(),
    })
}
