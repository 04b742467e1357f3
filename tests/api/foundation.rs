use serde_json::json;

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_endpoint_publishes_the_active_public_key() {
    let t = spawn_app().await;
    let (status, body) = t.get("/v1/keys", None).await;
    assert_eq!(status, 200);
    let keys = body["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0]["alg"], "Ed25519");
    assert_eq!(keys[0]["active"], true);
    assert_eq!(
        keys[0]["key_id"],
        t.app.keys.current().active_key_id().unwrap()
    );
    assert_eq!(keys[0]["public_key"].as_str().unwrap().len(), 43);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_metrics_answer() {
    let t = spawn_app().await;
    assert_eq!(t.get("/healthz", None).await.0, 200);
    let (status, body) = t.get("/readyz", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["ready"], true);
    let text = t.metrics_text().await;
    assert!(text.contains("rpw_settle_backlog_entries"), "{text}");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operator_validation_rule_is_a_400_and_writes_nothing() {
    let t = spawn_app().await;
    let before = t.redis_snapshot().await;
    let now = chrono::Utc::now();
    let good = json!({
        "id": "cny2027", "name": "rain", "stage": "live",
        "starts_at": now.to_rfc3339(), "ends_at": (now + chrono::Duration::hours(1)).to_rfc3339(),
        "budget_cents": 1000, "max_award_cents": 100
    });
    let mut cases = Vec::new();
    for (field, value) in [
        ("id", json!("")),
        ("id", json!("UPPER")),
        ("id", json!("has_underscore")),
        ("id", json!("x".repeat(33))),
        ("name", json!("")),
        ("stage", json!("prod")),
        ("ends_at", json!(now.to_rfc3339())),
        (
            "ends_at",
            json!((now - chrono::Duration::hours(1)).to_rfc3339()),
        ),
        ("starts_at", json!("not a time")),
        ("budget_cents", json!(0)),
        ("budget_cents", json!(-5)),
        ("max_award_cents", json!(0)),
        ("budget_cents", json!("100")),
    ] {
        let mut body = good.clone();
        body[field] = value.clone();
        cases.push((format!("{field}={value}"), body));
    }
    let mut missing = good.clone();
    missing.as_object_mut().unwrap().remove("budget_cents");
    cases.push(("missing budget".into(), missing));
    for (what, body) in cases {
        let (status, resp) = t.post("/v1/admin/activities", ADMIN, &body).await;
        assert_eq!(status, 400, "{what}: {resp}");
        assert_eq!(resp["error"]["code"], "invalid_request", "{what}");
    }
    let resp = t
        .client
        .post(format!("{}/v1/admin/activities", t.url))
        .bearer_auth(ADMIN)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    assert_eq!(t.sql_i64("SELECT COUNT(*) FROM activities").await, 0);
    assert_eq!(
        t.redis_snapshot().await,
        before,
        "refused creates touched Redis"
    );

    // Scenes and budgets validate too.
    t.open_activity("cny2027", 1000, 100).await;
    let after_create = t.redis_snapshot().await;
    for body in [
        json!({"id": "Bad Id", "name": "x", "award_type": "cash"}),
        json!({"id": "ok", "name": "", "award_type": "cash"}),
        json!({"id": "ok", "name": "x", "award_type": "cash_money"}),
        json!({"id": "ok", "name": "x", "award_type": "cash", "admission_fraction": 1.5}),
    ] {
        let (status, resp) = t
            .post("/v1/admin/activities/cny2027/scenes", ADMIN, &body)
            .await;
        assert_eq!(status, 400, "{body}: {resp}");
    }
    for delta in [0, -10] {
        let (status, _) = t
            .post(
                "/v1/admin/activities/cny2027/budget",
                ADMIN,
                &json!({"delta_cents": delta}),
            )
            .await;
        assert_eq!(status, 400);
    }
    let (status, _) = t
        .post(
            "/v1/admin/activities/nope/budget",
            ADMIN,
            &json!({"delta_cents": 5}),
        )
        .await;
    assert_eq!(status, 404);
    assert_eq!(t.sql_i64("SELECT COUNT(*) FROM activities").await, 1);
    assert_eq!(t.sql_i64("SELECT COUNT(*) FROM scenes").await, 1);
    assert_eq!(
        t.sql_i64("SELECT CAST(budget_cents AS SIGNED) FROM activities")
            .await,
        1000
    );
    assert_eq!(t.redis_snapshot().await, after_create);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_added_during_the_event_is_spread_and_shown() {
    let t = spawn_app().await;
    t.open_activity("cny2027", 1_000, 100).await;
    let (status, body) = t
        .post(
            "/v1/admin/activities/cny2027/budget",
            ADMIN,
            &json!({"delta_cents": 600}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["budget_cents"], 1_600);
    assert_eq!(body["budget_remaining_cents"], 1_600);
    let figures = t.budget_figures("cny2027").await;
    assert_eq!(figures.budget_cents, 1_600);
    assert_eq!(figures.remaining_cents, 1_600);
    assert_eq!(
        figures.granted_cents, figures.available_cents,
        "what was granted is in the sub-stocks"
    );
    assert!(figures.granted_cents <= 1_600);
    let (status, again) = t.get("/v1/admin/activities/cny2027", Some(ADMIN)).await;
    assert_eq!(status, 200);
    assert_eq!(again["scenes"][0]["id"], "rain");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_are_checked_per_route() {
    let t = spawn_app().await;
    // None.
    assert_eq!(t.get("/v1/admin/activities/x", None).await.0, 401);
    assert_eq!(t.get("/v1/wallet", None).await.0, 401);
    let (status, body) = t.post("/v1/awards", "", &json!({})).await;
    assert_eq!(status, 401);
    assert_eq!(body["error"]["code"], "unauthorized");
    // A user's JWT on operator and caller routes.
    let jwt = t.jwt(42);
    assert_eq!(t.get("/v1/admin/activities/x", Some(&jwt)).await.0, 401);
    assert_eq!(t.post("/v1/awards", &jwt, &json!({})).await.0, 401);
    // A caller key on an operator route, the admin key on a user route.
    assert_eq!(t.get("/v1/admin/activities/x", Some(CALLER)).await.0, 401);
    assert_eq!(t.get("/v1/wallet", Some(ADMIN)).await.0, 401);
    // An expired JWT, a JWT signed with another secret, garbage.
    let claims = redpacket_wallet::http::auth::Claims {
        sub: "42".into(),
        exp: (chrono::Utc::now().timestamp() - 10) as u64,
    };
    let expired = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .unwrap();
    assert_eq!(t.get("/v1/wallet", Some(&expired)).await.0, 401);
    let claims = redpacket_wallet::http::auth::Claims {
        sub: "42".into(),
        exp: (chrono::Utc::now().timestamp() + 600) as u64,
    };
    let forged = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(b"another-secret"),
    )
    .unwrap();
    assert_eq!(t.get("/v1/wallet", Some(&forged)).await.0, 401);
    assert_eq!(t.get("/v1/wallet", Some("not.a.jwt")).await.0, 401);
    // The right credential works.
    assert_eq!(t.get("/v1/wallet", Some(&jwt)).await.0, 200);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_reports_an_unreachable_mysql() {
    // Nothing listens on port 1: every MySQL connection is refused.
    let t = spawn_app_with(Options {
        mysql_url: Some("mysql://rpw:rpw@127.0.0.1:1/rpw".into()),
        skip_migrations: true,
        env: vec![("RPW_MYSQL__ACQUIRE_TIMEOUT_MS".into(), "500".into())],
        ..Default::default()
    })
    .await;
    let (status, body) = t.get("/readyz", None).await;
    assert_eq!(status, 503);
    assert_eq!(body["mysql"], "unreachable");
    assert_eq!(body["redis"], "ok");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_reports_a_redis_that_was_killed() {
    let mut redis = PrivateRedis::start();
    let t = spawn_app_with(Options {
        redis_url: Some(redis.url()),
        env: vec![("RPW_REDIS__COMMAND_TIMEOUT_MS".into(), "500".into())],
        ..Default::default()
    })
    .await;
    assert_eq!(t.get("/readyz", None).await.0, 200);
    redis.kill();
    let (status, body) = t.get("/readyz", None).await;
    assert_eq!(status, 503);
    assert_eq!(body["redis"], "unreachable");
    assert_eq!(body["mysql"], "ok");
    t.stop().await;
}

fn cli(keys_dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_redpacket-wallet"))
        .args(args)
        .env("RPW_KEYS__DIR", keys_dir)
        .env("RPW_AUTH__JWT_SECRET", JWT_SECRET)
        .env("RPW_MYSQL__URL", "mysql://rpw:rpw@127.0.0.1:1/rpw")
        .env("RPW_MYSQL__ACQUIRE_TIMEOUT_MS", "300")
        .output()
        .expect("the binary runs")
}

#[test]
fn the_command_line_manages_keys_and_prints_user_jwts() {
    let dir = std::env::temp_dir().join(format!("rpw-cli-keys-{:08x}", rand::random::<u32>()));
    let first = cli(&dir, &["keys", "generate"]);
    assert!(first.status.success(), "{first:?}");
    let first_id = String::from_utf8(first.stdout).unwrap().trim().to_string();
    std::thread::sleep(std::time::Duration::from_millis(5));
    let second = cli(&dir, &["keys", "generate"]);
    let second_id = String::from_utf8(second.stdout).unwrap().trim().to_string();
    let list = String::from_utf8(cli(&dir, &["keys", "list"]).stdout).unwrap();
    assert!(
        list.contains(&format!("{first_id}\tEd25519\tverifies")),
        "{list}"
    );
    assert!(
        list.contains(&format!("{second_id}\tEd25519\tactive")),
        "{list}"
    );
    // Retiring works without MySQL (it says so) and shows in the list.
    let retired = cli(&dir, &["keys", "retire", &first_id]);
    assert!(retired.status.success(), "{retired:?}");
    let list = String::from_utf8(cli(&dir, &["keys", "list"]).stdout).unwrap();
    assert!(
        list.contains(&format!("{first_id}\tEd25519\tretired")),
        "{list}"
    );
    assert!(!cli(&dir, &["keys", "retire", "no-such-key"])
        .status
        .success());
    // The private halves are owner-only.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.join(format!("{second_id}.pk8")))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let jwt = cli(&dir, &["dev-jwt", "42"]);
    assert!(jwt.status.success());
    let token = String::from_utf8(jwt.stdout).unwrap();
    let claims = jsonwebtoken::decode::<redpacket_wallet::http::auth::Claims>(
        token.trim(),
        &jsonwebtoken::DecodingKey::from_secret(JWT_SECRET.as_bytes()),
        &jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256),
    )
    .unwrap();
    assert_eq!(claims.claims.sub, "42");
    assert!(!cli(&dir, &["dev-jwt", "0"]).status.success());
    // A bad setting names its key.
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_redpacket-wallet"))
        .args(["keys", "list"])
        .env("RPW_ISSUE__SUB_STOCKS", "many")
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("issue.sub_stocks"),
        "{bad:?}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_shuts_down_cleanly_on_sigterm() {
    let db = create_database().await;
    let keys = temp_keys_dir();
    let port = free_port();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_redpacket-wallet"))
        .args(["serve", "--no-cron"])
        .env("RPW_HTTP__ADDR", format!("127.0.0.1:{port}"))
        .env("RPW_REDIS__URL", redis_url())
        .env("RPW_REDIS__KEY_PREFIX", format!("tsig{port}"))
        .env("RPW_MYSQL__URL", mysql_url_for(&db))
        .env("RPW_KEYS__DIR", &keys)
        .env("RPW_AUTH__ADMIN_KEY", ADMIN)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let client = reqwest::Client::new();
    let mut up = false;
    for _ in 0..100 {
        if let Ok(r) = client
            .get(format!("http://127.0.0.1:{port}/readyz"))
            .send()
            .await
        {
            up = r.status().as_u16() == 200;
            if up {
                break;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(up, "the server came up");
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let mut status = None;
    for _ in 0..100 {
        if let Some(s) = child.try_wait().unwrap() {
            status = Some(s);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let status = status.unwrap_or_else(|| {
        let _ = child.kill();
        panic!("serve did not stop within 10 s of SIGTERM")
    });
    assert!(status.success(), "{status:?}");
    assert!(client
        .get(format!("http://127.0.0.1:{port}/healthz"))
        .send()
        .await
        .is_err());
    let pool = sqlx::MySqlPool::connect(&mysql_base_url()).await.unwrap();
    // Its database, and the shadow database serve made beside it.
    for name in [db.to_string(), format!("{db}_shadow")] {
        sqlx::query(&format!("DROP DATABASE IF EXISTS `{name}`"))
            .execute(&pool)
            .await
            .unwrap();
    }
    std::fs::remove_dir_all(keys).unwrap();
}
