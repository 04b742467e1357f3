//! The HTTP edge: all axum code lives here. One file per capability, each exposing
//! `router()`; errors become the JSON envelope of API.md in one place ([`error`]).
//!
//! Handlers stay thin: parse into domain types, call the capability, turn the result
//! into a response.

pub mod admin;
pub mod auth;
pub mod awards;
pub mod coupons;
pub mod error;
pub mod openapi;
pub mod packets;
pub mod pages;
pub mod public;
pub mod request_id;
pub mod wallet;
pub mod wire;
pub mod withdrawals;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

use crate::app::App;
use crate::error::Error;

pub use auth::{Caller, Operator, User};
pub use wire::{
    check_list_len, decode_body, parse_json, reply, Bounded, Format, JsonBody, Wire, LIST_MAX,
    PROTOBUF,
};

/// What handlers see: the assembled application.
pub type AppState = Arc<App>;

/// The whole HTTP surface: the real app's routes, and in front of them the dispatch of
/// shadow traffic (`X-RPW-Shadow: 1`) to the shadow app's own routes.
pub fn router(app: Arc<App>) -> Router {
    let shadow = app.shadow.as_ref().map(|s| ShadowRoute {
        real: app.clone(),
        router: app_router(s.app.clone()),
    });
    app_router(app)
        .layer(axum::middleware::from_fn_with_state(
            shadow,
            shadow_dispatch,
        ))
        .layer(axum::middleware::from_fn(request_id::layer))
}

#[derive(Clone)]
struct ShadowRoute {
    real: Arc<App>,
    router: Router,
}

/// `X-RPW-Shadow: 1` goes to the shadow app, as shadow work (no metrics); `0` or no
/// header to the real one. Any other value is refused rather than guessed: a load test
/// that misspells it must never write real data.
async fn shadow_dispatch(
    axum::extract::State(shadow): axum::extract::State<Option<ShadowRoute>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match request
        .headers()
        .get(crate::shadow::HEADER)
        .map(|v| v.as_bytes())
    {
        None | Some(b"0") => return next.run(request).await,
        Some(b"1") => {}
        Some(_) => {
            return Error::InvalidRequest("X-RPW-Shadow must be 1 (shadow traffic) or 0".into())
                .into_response()
        }
    }
    let Some(ShadowRoute { real, router }) = shadow else {
        return Error::Unavailable("shadow traffic is not served here (shadow.enabled)".into())
            .into_response();
    };
    // The real router has matched the route already (this runs after routing): the
    // request goes on without what that left in its extensions (the path parameters),
    // for the shadow router to match it again.
    let (mut parts, body) = request.into_parts();
    parts.extensions = axum::http::Extensions::new();
    let request = axum::extract::Request::from_parts(parts, body);
    crate::shadow::scope(async move {
        if let Some(s) = &real.shadow {
            s.expiry.touch(&s.app.redis).await;
        }
        match tower::ServiceExt::oneshot(router, request).await {
            Ok(response) => response,
            Err(never) => match never {},
        }
    })
    .await
}

/// One app's routes, one router per capability.
fn app_router(app: Arc<App>) -> Router {
    let settings = &app.settings.http;
    let (routes, _) = described();
    routes
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(settings.body_limit_bytes))
        // A body whose Content-Length is over the limit is refused before a byte of it
        // is read; one without a length is cut off where it passes the limit.
        .layer(RequestBodyLimitLayer::new(settings.body_limit_bytes))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            Duration::from_millis(settings.request_timeout_ms),
        ))
        .layer(axum::middleware::map_response(envelope_errors))
        .layer(TraceLayer::new_for_http().make_span_with(request_span))
        .with_state(app)
}

/// Every route, each registered with its OpenAPI description (`utoipa_axum::routes!`):
/// the router and the document come from the one registration, so no route is served
/// undescribed.
fn described() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    use utoipa::OpenApi;
    utoipa_axum::router::OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .routes(utoipa_axum::routes!(openapi_json))
        .merge(public::router())
        .merge(pages::router())
        .merge(awards::router())
        .merge(wallet::router())
        .merge(withdrawals::router())
        .merge(packets::router())
        .merge(coupons::router())
        .merge(admin::router())
        .split_for_parts()
}

/// The OpenAPI 3.1 document of every route, as served at `/openapi.json`.
pub fn openapi_document() -> &'static str {
    static DOC: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DOC.get_or_init(|| {
        described()
            .1
            .to_pretty_json()
            .expect("the OpenAPI document serializes")
    })
}

#[utoipa::path(get, path = "/openapi.json", tag = "anyone",
    responses((status = 200, description = "This document: OpenAPI 3.1 of every route", body = Object)))]
async fn openapi_json() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        openapi_document(),
    )
        .into_response()
}

/// The span every log line of a request is written in: its method, path and id. At the
/// error level so that it is on whenever any line is (a span filtered out would leave
/// the lines written in it without their request id).
fn request_span(request: &axum::http::Request<axum::body::Body>) -> tracing::Span {
    let id = request
        .headers()
        .get(&request_id::HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    tracing::error_span!(
        "request",
        method = %request.method(),
        path = %request.uri().path(),
        request_id = %id,
    )
}

/// Gives every error response the API's envelope: those produced below the handlers
/// (a rejected query string, an over-long body, a timeout, an unknown method) arrive as
/// plain text and are rewritten here with the stable code for their status.
pub async fn envelope_errors(response: Response) -> Response {
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/json"));
    if is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 4096)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let error = match status {
        StatusCode::PAYLOAD_TOO_LARGE => Error::PayloadTooLarge,
        StatusCode::NOT_FOUND => Error::NotFound("no such route".into()),
        StatusCode::UNAUTHORIZED => Error::Unauthorized,
        StatusCode::FORBIDDEN => Error::Forbidden(text),
        StatusCode::REQUEST_TIMEOUT
        | StatusCode::SERVICE_UNAVAILABLE
        | StatusCode::GATEWAY_TIMEOUT => {
            Error::Unavailable("the request took too long or a dependency is down".into())
        }
        s if s.is_server_error() => Error::Internal(anyhow::anyhow!("{s}: {text}")),
        _ if text.is_empty() => Error::InvalidRequest(
            status
                .canonical_reason()
                .unwrap_or("bad request")
                .to_string(),
        ),
        _ => Error::InvalidRequest(text),
    };
    let mut rewritten = error.into_response();
    *rewritten.status_mut() = status;
    for (name, value) in parts.headers.iter() {
        if name == header::RETRY_AFTER || name == header::ALLOW {
            rewritten.headers_mut().insert(name.clone(), value.clone());
        }
    }
    rewritten
}

/// A create's answer: 201 with the new resource, or 200 with the identical one that
/// existed.
pub fn created<T>(created: crate::activity::Created<T>) -> (StatusCode, axum::Json<T>) {
    match created {
        crate::activity::Created::New(t) => (StatusCode::CREATED, axum::Json(t)),
        crate::activity::Created::Existing(t) => (StatusCode::OK, axum::Json(t)),
    }
}

/// Unknown routes: 404 with the envelope.
pub async fn not_found() -> Error {
    Error::NotFound("no such route".into())
}
