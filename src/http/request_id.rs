//! Request ids: every response carries `x-request-id` (the caller's, when it is a
//! reasonable one, or a new one), every log line of the request carries it (the
//! request's span), and error envelopes include it, so a client's report of a failed
//! call finds its log lines.

use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;

pub const HEADER: HeaderName = HeaderName::from_static("x-request-id");

tokio::task_local! {
    static CURRENT: HeaderValue;
}

/// The id of the request being served on this task, if any.
pub fn current() -> Option<String> {
    CURRENT
        .try_with(|id| id.to_str().ok().map(str::to_string))
        .ok()
        .flatten()
}

/// A caller's id is kept when it is 1–128 characters of `[A-Za-z0-9._:-]` (it goes into
/// logs as it is); anything else is replaced by a new one.
fn acceptable(value: &HeaderValue) -> bool {
    let bytes = value.as_bytes();
    (1..=128).contains(&bytes.len())
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(b))
}

fn fresh() -> HeaderValue {
    let bytes: [u8; 16] = rand::random();
    HeaderValue::from_str(&crate::domain::hex(&bytes)).expect("hex is a valid header value")
}

/// Sets the request's id (on the request, for the layers and handlers below), serves it
/// with the id current on its task, and returns the id on the response.
pub async fn layer(mut request: Request, next: Next) -> Response {
    let id = match request.headers().get(&HEADER) {
        Some(v) if acceptable(v) => v.clone(),
        _ => fresh(),
    };
    request.headers_mut().insert(HEADER, id.clone());
    let mut response = CURRENT.scope(id.clone(), next.run(request)).await;
    response.headers_mut().insert(HEADER, id);
    response
}
