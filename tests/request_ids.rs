//! Request ids: every response carries `x-request-id` (the caller's or a new one), the
//! error envelope includes it, and the log lines written while serving the request
//! carry it.
//!
//! A test binary of its own: it installs the process's log subscriber, capturing JSON
//! lines to check.

#[allow(dead_code)]
#[path = "api/helpers.rs"]
mod helpers;

use std::io::Write;
use std::sync::{Arc, Mutex};

use crate::helpers::*;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn lines(&self) -> Vec<serde_json::Value> {
        let bytes = self.0.lock().unwrap().clone();
        String::from_utf8_lossy(&bytes)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

fn is_fresh_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_response_log_line_and_error_carries_the_request_id() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .json()
        // The HTTP layer's own lines (one as each request starts) are written inside the
        // request's span: enough to see what every line of a request carries.
        .with_env_filter(tracing_subscriber::EnvFilter::new("warn,tower_http=debug"))
        .with_writer(move || writer.clone())
        .init();
    let t = spawn_app().await;
    let client = reqwest::Client::new();

    // No id sent: a new one, on a success and on an error.
    let ok = client
        .get(format!("{}/healthz", t.url))
        .send()
        .await
        .unwrap();
    let ok_id = ok.headers()["x-request-id"].to_str().unwrap().to_string();
    assert!(is_fresh_id(&ok_id), "{ok_id}");
    let missing = client
        .get(format!("{}/v1/wallet", t.url))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 401);
    let missing_id = missing.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(is_fresh_id(&missing_id) && missing_id != ok_id);
    let body: serde_json::Value = missing.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unauthorized");
    assert_eq!(body["error"]["request_id"], missing_id.as_str());

    // The caller's id is kept, in the header and in the envelope, also for errors
    // produced below the handlers (an unknown route, a refused query string).
    for path in ["/v1/nowhere", "/v1/wallet/flows?limit=x"] {
        let resp = client
            .get(format!("{}{path}", t.url))
            .header("x-request-id", "client-req.42:a_b-c")
            .bearer_auth(t.jwt(7))
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_client_error(), "{path}");
        assert_eq!(resp.headers()["x-request-id"], "client-req.42:a_b-c");
        let body: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["request_id"], "client-req.42:a_b-c", "{path}");
    }
    // One that could forge a log line, or is too long, is replaced.
    for bad in ["has space", &"x".repeat(129), "quote\"d"] {
        let resp = client
            .get(format!("{}/healthz", t.url))
            .header("x-request-id", bad)
            .send()
            .await
            .unwrap();
        let id = resp.headers()["x-request-id"].to_str().unwrap();
        assert!(is_fresh_id(id), "{bad:?} became {id}");
    }
    // Shadow traffic is served with an id too (its dispatch sits inside the id's layer).
    let resp = client
        .get(format!("{}/healthz", t.url))
        .header("x-rpw-shadow", "2")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["request_id"], id.as_str());

    // The log lines of a request carry its id.
    let lines = captured.lines();
    let with_id = |id: &str| {
        lines
            .iter()
            .filter(|l| l["span"]["request_id"] == id)
            .count()
    };
    assert!(with_id(&ok_id) >= 1, "no line of {ok_id}: {lines:?}");
    assert!(with_id(&missing_id) >= 1);
    assert!(with_id("client-req.42:a_b-c") >= 2);
    for line in lines.iter().filter(|l| {
        l["target"]
            .as_str()
            .is_some_and(|t| t.starts_with("tower_http"))
    }) {
        let id = line["span"]["request_id"].as_str().unwrap_or("");
        assert!(!id.is_empty(), "a request's line without its id: {line}");
    }
    t.stop().await;
}
