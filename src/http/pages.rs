//! The browser pages (API.md, "Pages and description"): the operator console at
//! `/console` and the wallet page at `/wallet`, plain HTML, CSS and JavaScript embedded in
//! the binary from `web/`. They hold no privilege of their own: every action is a call
//! to the same HTTP API with the credential the person typed in. Their
//! Content-Security-Policy lets them load and call nothing but this service.

use axum::extract::Path;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Redirect, Response};
use utoipa_axum::{router::OpenApiRouter, routes};

use super::AppState;
use crate::error::Error;

/// Everything from this origin, nothing from any other; no inline script or style.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
    style-src 'self'; img-src 'self' data:; connect-src 'self'; form-action 'self'; \
    base-uri 'none'; frame-ancestors 'none'";

const HTML: &str = "text/html; charset=utf-8";

/// The embedded assets: name, content type, bytes.
const ASSETS: [(&str, &str, &str); 4] = [
    (
        "common.js",
        "text/javascript; charset=utf-8",
        include_str!("../../web/common.js"),
    ),
    (
        "console.js",
        "text/javascript; charset=utf-8",
        include_str!("../../web/console.js"),
    ),
    (
        "wallet.js",
        "text/javascript; charset=utf-8",
        include_str!("../../web/wallet.js"),
    ),
    (
        "style.css",
        "text/css; charset=utf-8",
        include_str!("../../web/style.css"),
    ),
];

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(root_page))
        .routes(routes!(console_page))
        .routes(routes!(wallet_page))
        .routes(routes!(page_asset))
}

#[utoipa::path(get, path = "/", tag = "pages",
    responses((status = 303, description = "To /wallet")))]
async fn root_page() -> Redirect {
    Redirect::to("/wallet")
}

#[utoipa::path(get, path = "/console", tag = "pages",
    responses((status = 200, description = "The operator console (asks for the operator key)", body = String, content_type = "text/html")))]
async fn console_page() -> Response {
    page(HTML, include_str!("../../web/console.html"))
}

#[utoipa::path(get, path = "/wallet", tag = "pages",
    responses((status = 200, description = "The wallet page (asks for a user JWT)", body = String, content_type = "text/html")))]
async fn wallet_page() -> Response {
    page(HTML, include_str!("../../web/wallet.html"))
}

#[utoipa::path(get, path = "/assets/{name}", tag = "pages",
    params(("name" = String, Path, description = "common.js, console.js, wallet.js or style.css")),
    responses((status = 200, description = "A script or stylesheet of the pages", body = String),
        (status = 404, description = "not_found", body = super::openapi::ErrorEnvelope)))]
async fn page_asset(Path(name): Path<String>) -> Response {
    match ASSETS.iter().find(|(n, _, _)| *n == name) {
        Some((_, content_type, body)) => page(content_type, body),
        None => Error::NotFound(format!("no asset `{name}`")).into_response(),
    }
}

fn page(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(CONTENT_SECURITY_POLICY),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
            (
                header::REFERRER_POLICY,
                HeaderValue::from_static("no-referrer"),
            ),
            // A new binary serves new assets: the browser asks again each time (cheap:
            // they are a few kilobytes from memory).
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        body,
    )
        .into_response()
}
