//! The browser pages as HTTP sees them (the browser itself drives them in
//! tests/browser/pages.py), and the operator routes the console reads: the activity
//! list and health.

use serde_json::json;

use crate::helpers::*;

/// Each page and asset: served from the binary, with a policy under which the browser
/// loads and calls nothing but this service, and no reference to another origin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_are_served_whole_and_load_nothing_from_elsewhere() {
    let t = spawn_app().await;
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let root = client.get(format!("{}/", t.url)).send().await.unwrap();
    assert!(root.status().is_redirection(), "{}", root.status());
    assert_eq!(root.headers()["location"], "/wallet");
    let mut scripts = Vec::new();
    for (path, content_type) in [
        ("/console", "text/html"),
        ("/wallet", "text/html"),
        ("/assets/common.js", "text/javascript"),
        ("/assets/console.js", "text/javascript"),
        ("/assets/wallet.js", "text/javascript"),
        ("/assets/style.css", "text/css"),
    ] {
        let resp = client.get(format!("{}{path}", t.url)).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        let headers = resp.headers().clone();
        assert!(
            headers["content-type"]
                .to_str()
                .unwrap()
                .starts_with(content_type),
            "{path}: {:?}",
            headers["content-type"]
        );
        let csp = headers["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("default-src 'none'"), "{csp}");
        assert!(csp.contains("script-src 'self'"), "{csp}");
        assert!(csp.contains("connect-src 'self'"), "{csp}");
        assert_eq!(headers["x-content-type-options"], "nosniff");
        let body = resp.text().await.unwrap();
        assert!(
            body.len() > 500,
            "{path} is a real page, {} bytes",
            body.len()
        );
        // No load from another origin: no absolute or protocol-relative URL in a src,
        // an href, a CSS url() or a fetch (the SVG namespace is a name, not a load).
        for needle in [
            "src=\"http",
            "src=\"//",
            "href=\"http",
            "href=\"//",
            "url(http",
            "url(//",
            "fetch(\"http",
            "fetch(`http",
            "@import",
        ] {
            assert!(!body.contains(needle), "{path} contains {needle}");
        }
        if path.ends_with(".html") || !path.contains('.') {
            for src in body.split("src=\"").skip(1) {
                scripts.push(src.split('"').next().unwrap().to_string());
            }
        }
    }
    // Every script a page names is one the service serves.
    assert!(scripts.len() >= 4, "{scripts:?}");
    for src in scripts {
        assert!(src.starts_with("/assets/"), "{src}");
        let (status, _) = t.get(&src, None).await;
        assert_ne!(status, 404, "{src}");
    }
    let (status, body) = t.get("/assets/missing.js", None).await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "not_found");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_list_activities_and_read_health_with_the_backlog() {
    let t = spawn_app().await;
    for path in ["/v1/admin/activities", "/v1/admin/health"] {
        let (status, body) = t.get(path, None).await;
        assert_eq!(status, 401, "{path}: {body}");
        let (status, _) = t.get(path, Some("not-the-key")).await;
        assert_eq!(status, 401, "{path}");
    }
    t.open_activity("cny2027", 1_000_000, 1_000).await;
    t.activity_with_window("later", "gray", 5_000, 100, 3_600, 7_200)
        .await;
    let (status, body) = t.get("/v1/admin/activities", Some(ADMIN)).await;
    assert_eq!(status, 200, "{body}");
    let ids: Vec<&str> = body["activities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["later", "cny2027"], "the latest to start first");
    assert_eq!(body["activities"][0]["stage"], "gray");
    assert_eq!(body["activities"][0]["budget_cents"], 5_000);
    let (status, body) = t.get("/v1/admin/activities?limit=1", Some(ADMIN)).await;
    assert_eq!(status, 200);
    assert_eq!(body["activities"].as_array().unwrap().len(), 1);

    // A backlog while booking is paused: counted per partition, with its age.
    t.pause_booking(true).await;
    issue_all(&t, (0..40).map(|i| award(1 + i % 7, i, 10)).collect()).await;
    let (status, h) = t.get("/v1/admin/health", Some(ADMIN)).await;
    assert_eq!(status, 200, "{h}");
    assert_eq!(h["redis"], "ok");
    assert_eq!(h["mysql"], "ok");
    assert_eq!(h["booking"]["paused"], true);
    assert_eq!(
        h["booking"]["max_tps"], t.app.settings.settle.max_tps,
        "{h}"
    );
    let parts = h["backlog"]["partitions"].as_array().unwrap();
    assert_eq!(parts.len() as u32, t.app.redis.partitions());
    let entries: u64 = parts.iter().map(|p| p["entries"].as_u64().unwrap()).sum();
    assert!(entries > 0, "{h}");
    assert_eq!(h["backlog"]["entries"], entries);
    for p in parts {
        if p["entries"].as_u64().unwrap() > 0 {
            assert!(p["oldest_age_ms"].as_i64().unwrap() >= 0, "{p}");
        } else {
            assert!(p["oldest_age_ms"].is_null(), "{p}");
        }
    }
    let before = h["booking"]["booked_tokens"].as_u64().unwrap();

    t.pause_booking(false).await;
    assert_eq!(t.drain().await, 40);
    let (_, h) = t.get("/v1/admin/health", Some(ADMIN)).await;
    assert_eq!(h["backlog"]["entries"], 0, "{h}");
    assert_eq!(h["booking"]["paused"], false);
    assert_eq!(
        h["booking"]["booked_tokens"].as_u64().unwrap(),
        before + 40,
        "the worker's bookings are counted"
    );
    t.stop().await;
}

/// A malformed body's message names the field it is about, so a form can show it
/// beside that field (the console does).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_field_is_named_in_the_message() {
    let t = spawn_app().await;
    let (status, body) = t
        .post(
            "/v1/admin/activities",
            ADMIN,
            &json!({"id": "x", "name": "x", "stage": "live", "starts_at": "2026-01-01T00:00:00Z",
                    "ends_at": null, "budget_cents": 1, "max_award_cents": 1}),
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "invalid_request");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("ends_at: invalid type: null"), "{message}");
    let (status, body) = t
        .post(
            "/v1/admin/activities/cny2027/budget",
            ADMIN,
            &json!({"delta_cents": "lots"}),
        )
        .await;
    assert_eq!(status, 400);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("delta_cents: invalid type: string"),
        "{body}"
    );
    t.stop().await;
}
