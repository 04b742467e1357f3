//! The routes every instance serves whatever its role: health, readiness, metrics and
//! the public signing keys.

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::openapi as doc;
use serde::Serialize;

use super::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(metrics))
        .routes(routes!(keys))
}

#[utoipa::path(get, path = "/healthz", tag = "anyone",
    responses((status = 200, description = "The process is up", body = doc::Healthz)))]
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

#[utoipa::path(get, path = "/readyz", tag = "anyone",
    responses((status = 200, description = "Redis and MySQL reachable", body = doc::Ready),
        (status = 503, description = "Redis or MySQL unreachable", body = doc::Ready)))]
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

#[utoipa::path(get, path = "/metrics", tag = "anyone",
    responses((status = 200, description = "Prometheus text format", body = String, content_type = "text/plain")))]
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

#[derive(Serialize, utoipa::ToSchema)]
struct KeysBody {
    keys: Vec<crate::keys::PublicKey>,
}

#[utoipa::path(get, path = "/v1/keys", tag = "anyone",
    responses((status = 200, description = "The public signing keys: a token verifies offline against these", body = KeysBody)))]
async fn keys(State(app): State<AppState>) -> Json<KeysBody> {
    Json(KeysBody {
        keys: app.keys.current().published(),
    })
}
