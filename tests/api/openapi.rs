//! `/openapi.json`: the OpenAPI 3.1 description of every route. The routes and the
//! document come from one registration; these tests check that the document is whole
//! (every route of the contract, no route that is not served), sound (every reference
//! resolves, every path parameter is declared), and true (real answers have exactly the
//! fields their documented schema names).

use std::collections::BTreeSet;

use serde_json::{json, Value};

use crate::helpers::*;

/// Every route of API.md and the README's additions, as "METHOD /path".
const CONTRACT: &[&str] = &[
    "GET /",
    "GET /assets/{name}",
    "GET /console",
    "GET /healthz",
    "GET /metrics",
    "GET /openapi.json",
    "GET /readyz",
    "GET /v1/activities/{id}/stats",
    "GET /v1/admin/activities",
    "POST /v1/admin/activities",
    "GET /v1/admin/activities/{id}",
    "POST /v1/admin/activities/{id}/budget",
    "POST /v1/admin/activities/{id}/release-in-doubt",
    "POST /v1/admin/activities/{id}/repair-leak",
    "POST /v1/admin/activities/{id}/scenes",
    "GET /v1/admin/health",
    "GET /v1/admin/parked",
    "GET /v1/admin/reconciliation",
    "GET /v1/admin/switches",
    "GET /v1/admin/blacklist",
    "PUT /v1/admin/blacklist",
    "GET /v1/admin/flagged",
    "GET /v1/admin/packets",
    "GET /v1/admin/coupon-templates",
    "POST /v1/admin/coupon-templates",
    "POST /v1/coupons:redeem",
    "GET /v1/wallet/coupons",
    "PUT /v1/admin/switches/{name}",
    "GET /v1/admin/webhooks",
    "POST /v1/admin/webhooks",
    "DELETE /v1/admin/webhooks/{id}",
    "GET /v1/admin/webhooks/{id}/deliveries",
    "POST /v1/awards",
    "POST /v1/awards:batch",
    "GET /v1/keys",
    "POST /v1/packets",
    "GET /v1/packets/{id}",
    "POST /v1/packets/{id}/grab",
    "POST /v1/packets/{id}/open",
    "GET /v1/wallet",
    "GET /v1/wallet/flows",
    "POST /v1/wallet/tokens:sync",
    "POST /v1/withdrawals",
    "GET /v1/withdrawals/{id}",
    "POST /v1/withdrawals/{id}/result",
    "GET /wallet",
];

const METHODS: [&str; 5] = ["get", "post", "put", "delete", "patch"];

fn operations(doc: &Value) -> Vec<(String, String, Value)> {
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for m in METHODS {
            if let Some(op) = item.get(m) {
                out.push((m.to_uppercase(), path.clone(), op.clone()));
            }
        }
    }
    out
}

fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let name = r.strip_prefix("#/components/schemas/").expect(r);
            let target = &doc["components"]["schemas"][name];
            assert!(!target.is_null(), "unresolved {r}");
            resolve(doc, target)
        }
        None => schema,
    }
}

/// Whether `value` has the shape `schema` describes: objects have every required field
/// and no field the schema does not name; arrays' items conform; types match.
fn conforms(doc: &Value, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
    let schema = resolve(doc, schema);
    if let Some(parts) = schema.get("allOf").and_then(Value::as_array) {
        // A flattened struct: one object with every part's fields.
        let mut properties = serde_json::Map::new();
        let mut required = Vec::new();
        for part in parts {
            let part = resolve(doc, part);
            properties.extend(
                part["properties"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| (k.clone(), v.clone())),
            );
            required.extend(part["required"].as_array().into_iter().flatten().cloned());
        }
        let merged = json!({"type": "object", "properties": properties, "required": required});
        return conforms(doc, &merged, value, at);
    }
    if let Some(any) = schema
        .get("oneOf")
        .or(schema.get("anyOf"))
        .and_then(Value::as_array)
    {
        let errors: Vec<String> = any
            .iter()
            .filter_map(|s| conforms(doc, s, value, at).err())
            .collect();
        return if errors.len() < any.len() {
            Ok(())
        } else {
            Err(format!("{at}: matches none of {errors:?}"))
        };
    }
    let types: Vec<&str> = match &schema["type"] {
        Value::String(t) => vec![t.as_str()],
        Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
        _ => vec![],
    };
    let actual = match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    };
    let fits = types.is_empty()
        || types.contains(&actual)
        || (actual == "integer" && types.contains(&"number"));
    if !fits {
        return Err(format!("{at}: a {actual}, documented as {types:?}"));
    }
    match value {
        Value::Object(fields) if schema.get("properties").is_some() => {
            let props = schema["properties"].as_object().unwrap();
            for req in schema["required"].as_array().into_iter().flatten() {
                let name = req.as_str().unwrap();
                if !fields.contains_key(name) {
                    return Err(format!("{at}: required `{name}` missing"));
                }
            }
            for (name, v) in fields {
                let Some(s) = props.get(name) else {
                    return Err(format!("{at}: `{name}` is not documented"));
                };
                conforms(doc, s, v, &format!("{at}.{name}"))?;
            }
            Ok(())
        }
        Value::Array(items) => match schema.get("items") {
            Some(s) => items
                .iter()
                .enumerate()
                .try_for_each(|(i, v)| conforms(doc, s, v, &format!("{at}[{i}]"))),
            None => Ok(()),
        },
        _ => Ok(()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_describes_every_route_and_nothing_else() {
    let t = spawn_app().await;
    let resp = reqwest::get(format!("{}/openapi.json", t.url))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    let doc: Value = resp.json().await.unwrap();
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1"),
        "{}",
        doc["openapi"]
    );
    assert!(doc["info"]["title"].is_string() && doc["info"]["version"].is_string());

    let described: BTreeSet<String> = operations(&doc)
        .iter()
        .map(|(m, p, _)| format!("{m} {p}"))
        .collect();
    let contract: BTreeSet<String> = CONTRACT.iter().map(|s| s.to_string()).collect();
    assert_eq!(
        described.difference(&contract).collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "described but not in the contract"
    );
    assert_eq!(
        contract.difference(&described).collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "in the contract but not described"
    );

    let mut ids = BTreeSet::new();
    for (method, path, op) in operations(&doc) {
        // Sound: unique operation ids, path parameters declared, a success answer,
        // every error answer the envelope, every reference resolved.
        assert!(
            ids.insert(op["operationId"].as_str().unwrap().to_string()),
            "{method} {path}"
        );
        for segment in path.split('/').filter(|s| s.starts_with('{')) {
            let name = segment.trim_matches(|c| c == '{' || c == '}');
            assert!(
                op["parameters"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|p| p["name"] == name && p["in"] == "path"),
                "{method} {path}: path parameter {name} undeclared"
            );
        }
        let responses = op["responses"].as_object().unwrap();
        assert!(
            responses
                .keys()
                .any(|s| s.starts_with('2') || s.starts_with('3')),
            "{method} {path}: no success answer"
        );
        for (status, r) in responses {
            if status.starts_with('4') || (status.starts_with('5') && path != "/readyz") {
                let schema = &r["content"]["application/json"]["schema"];
                assert_eq!(
                    schema["$ref"], "#/components/schemas/ErrorEnvelope",
                    "{method} {path} {status}"
                );
            }
            for content in r["content"].as_object().into_iter().flatten().map(|c| c.1) {
                resolve(&doc, &content["schema"]);
            }
        }
        if path.starts_with("/v1/admin") {
            assert!(
                op["security"].to_string().contains("operator"),
                "{method} {path}"
            );
        }
        // Served: every described operation reaches a handler (not the fallback's
        // "no such route", not 405).
        let concrete = path.replace("{id}", "1").replace("{name}", "issue_off");
        let resp = t
            .client
            .request(
                reqwest::Method::from_bytes(method.as_bytes()).unwrap(),
                format!("{}{concrete}", t.url),
            )
            .send()
            .await
            .unwrap();
        assert_ne!(resp.status(), 405, "{method} {path}");
        let body = resp.text().await.unwrap();
        assert!(
            !body.contains("no such route"),
            "{method} {path} is not served"
        );
    }
    let refs = doc.to_string().matches("\"$ref\"").count();
    assert!(refs > 30, "{refs}");

    // No route is added to the router outside the registration that describes it.
    let http = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/http");
    for entry in std::fs::read_dir(http).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            !text.contains(".route(\""),
            "{} adds a route undescribed",
            path.display()
        );
    }
    t.stop().await;
}

/// Real answers have exactly the fields their documented schema names, no more, no
/// fewer: the document cannot drift from what the handlers write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_answers_match_their_documented_schemas() {
    let t = spawn_app().await;
    let doc: Value = reqwest::get(format!("{}/openapi.json", t.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let check = |method: &str, path: &str, status: u16, body: &Value| {
        let op = &doc["paths"][path][method.to_lowercase()];
        assert!(!op.is_null(), "{method} {path} undescribed");
        let schema = &op["responses"][status.to_string()]["content"]["application/json"]["schema"];
        assert!(
            !schema.is_null(),
            "{method} {path}: {status} undocumented: {body}"
        );
        if let Err(e) = conforms(&doc, schema, body, "body") {
            panic!("{method} {path} {status}: {e}\n{body}");
        }
    };
    let mut checked = 0;
    macro_rules! call {
        ($method:expr, $doc_path:expr, $path:expr, $bearer:expr, $body:expr) => {{
            let (status, body) = match $method {
                "GET" => t.get($path, $bearer).await,
                m => {
                    t.send(
                        reqwest::Method::from_bytes(m.as_bytes()).unwrap(),
                        $path,
                        $bearer.unwrap_or(""),
                        &$body,
                    )
                    .await
                }
            };
            check($method, $doc_path, status, &body);
            checked += 1;
            body
        }};
    }
    let none = Value::Null;
    call!("GET", "/healthz", "/healthz", None, none);
    call!("GET", "/readyz", "/readyz", None, none);
    call!("GET", "/v1/keys", "/v1/keys", None, none);
    let new = json!({"id": "cny2027", "name": "New year", "stage": "live",
        "starts_at": "2020-01-01T00:00:00Z", "ends_at": "2099-01-01T00:00:00Z",
        "budget_cents": 1_000_000, "max_award_cents": 1000});
    call!(
        "POST",
        "/v1/admin/activities",
        "/v1/admin/activities",
        Some(ADMIN),
        new
    );
    call!(
        "POST",
        "/v1/admin/activities",
        "/v1/admin/activities",
        Some(ADMIN),
        json!({"id": "Bad"})
    );
    call!(
        "POST",
        "/v1/admin/activities/{id}/scenes",
        "/v1/admin/activities/cny2027/scenes",
        Some(ADMIN),
        json!({"id": "rain", "name": "Rain", "award_type": "cash"})
    );
    call!(
        "GET",
        "/v1/admin/activities",
        "/v1/admin/activities",
        Some(ADMIN),
        none
    );
    call!(
        "POST",
        "/v1/admin/activities/{id}/budget",
        "/v1/admin/activities/cny2027/budget",
        Some(ADMIN),
        json!({"delta_cents": 500})
    );
    let one = award(42, 1, 88);
    let body = call!("POST", "/v1/awards", "/v1/awards", Some(CALLER), one);
    let token = body["token"].as_str().unwrap().to_string();
    call!("POST", "/v1/awards", "/v1/awards", Some(CALLER), one);
    call!(
        "POST",
        "/v1/awards:batch",
        "/v1/awards:batch",
        Some(CALLER),
        json!({"awards": [award(42, 2, 10), award(42, 3, 1_000_000)]})
    );
    call!(
        "GET",
        "/v1/admin/activities/{id}",
        "/v1/admin/activities/cny2027",
        Some(ADMIN),
        none
    );
    call!(
        "GET",
        "/v1/activities/{id}/stats",
        "/v1/activities/cny2027/stats",
        None,
        none
    );
    let jwt = t.jwt(42);
    call!("GET", "/v1/wallet", "/v1/wallet", Some(jwt.as_str()), none);
    call!(
        "GET",
        "/v1/wallet/flows",
        "/v1/wallet/flows?limit=1",
        Some(jwt.as_str()),
        none
    );
    call!(
        "POST",
        "/v1/wallet/tokens:sync",
        "/v1/wallet/tokens:sync",
        Some(jwt.as_str()),
        json!({"tokens": [token, "garbage"]})
    );
    let w = call!(
        "POST",
        "/v1/withdrawals",
        "/v1/withdrawals",
        Some(jwt.as_str()),
        json!({"request_id": "doc-1", "amount_cents": 5})
    );
    let id = w["withdrawal_id"].as_str().unwrap().to_string();
    call!(
        "POST",
        "/v1/withdrawals",
        "/v1/withdrawals",
        Some(jwt.as_str()),
        json!({"request_id": "doc-2", "amount_cents": 100_000})
    );
    call!(
        "GET",
        "/v1/withdrawals/{id}",
        &format!("/v1/withdrawals/{id}"),
        Some(jwt.as_str()),
        none
    );
    call!(
        "POST",
        "/v1/withdrawals/{id}/result",
        &format!("/v1/withdrawals/{id}/result"),
        Some(CALLER),
        json!({"status": "paid"})
    );
    t.drain().await;
    let hour = redpacket_wallet::store::hour_of(redpacket_wallet::store::now_ms());
    t.app
        .reconciler
        .reconcile("cny2027", &hour, "manual")
        .await
        .unwrap();
    call!(
        "GET",
        "/v1/admin/reconciliation",
        "/v1/admin/reconciliation",
        Some(ADMIN),
        none
    );
    call!(
        "GET",
        "/v1/admin/parked",
        "/v1/admin/parked",
        Some(ADMIN),
        none
    );
    call!(
        "GET",
        "/v1/admin/switches",
        "/v1/admin/switches",
        Some(ADMIN),
        none
    );
    call!(
        "PUT",
        "/v1/admin/switches/{name}",
        "/v1/admin/switches/views_fallback",
        Some(ADMIN),
        json!({"on": false})
    );
    call!(
        "GET",
        "/v1/admin/health",
        "/v1/admin/health",
        Some(ADMIN),
        none
    );
    call!(
        "POST",
        "/v1/admin/activities/{id}/repair-leak",
        "/v1/admin/activities/cny2027/repair-leak",
        Some(ADMIN),
        none
    );
    call!(
        "POST",
        "/v1/admin/activities/{id}/release-in-doubt",
        "/v1/admin/activities/cny2027/release-in-doubt",
        Some(ADMIN),
        none
    );
    let hook = call!(
        "POST",
        "/v1/admin/webhooks",
        "/v1/admin/webhooks",
        Some(ADMIN),
        json!({"url": "http://127.0.0.1:9/x", "events": ["withdrawal.paid"], "secret": "0123456789abcdef"})
    );
    call!(
        "GET",
        "/v1/admin/webhooks",
        "/v1/admin/webhooks",
        Some(ADMIN),
        none
    );
    let hook_id = hook["id"].as_i64().unwrap();
    call!(
        "POST",
        "/v1/withdrawals",
        "/v1/withdrawals",
        Some(jwt.as_str()),
        json!({"request_id": "doc-3", "amount_cents": 1})
    );
    tokio::time::sleep(std::time::Duration::from_millis(1_500)).await;
    call!(
        "GET",
        "/v1/admin/webhooks/{id}/deliveries",
        &format!("/v1/admin/webhooks/{hook_id}/deliveries"),
        Some(ADMIN),
        none
    );
    let packet = call!(
        "POST",
        "/v1/packets",
        "/v1/packets",
        Some(jwt.as_str()),
        json!({"request_id": "doc-p", "total_cents": 3, "shares": 1, "greeting": "hi"})
    );
    let pid = packet["packet_id"].as_str().unwrap().to_string();
    call!(
        "POST",
        "/v1/packets",
        "/v1/packets",
        Some(jwt.as_str()),
        json!({"request_id": "doc-q", "total_cents": 3, "shares": 0})
    );
    call!(
        "POST",
        "/v1/packets/{id}/grab",
        &format!("/v1/packets/{pid}/grab"),
        Some(jwt.as_str()),
        json!({})
    );
    call!(
        "POST",
        "/v1/packets/{id}/open",
        &format!("/v1/packets/{pid}/open"),
        Some(jwt.as_str()),
        json!({})
    );
    call!(
        "POST",
        "/v1/packets/{id}/open",
        &format!("/v1/packets/{pid}/open"),
        Some(jwt.as_str()),
        json!({})
    );
    call!(
        "GET",
        "/v1/packets/{id}",
        &format!("/v1/packets/{pid}"),
        Some(jwt.as_str()),
        none
    );
    call!(
        "POST",
        "/v1/admin/coupon-templates",
        "/v1/admin/coupon-templates",
        Some(ADMIN),
        json!({"id": "tpl-doc", "name": "doc", "face_value_cents": 100, "stock": 3, "valid_days": 1})
    );
    call!(
        "POST",
        "/v1/admin/coupon-templates",
        "/v1/admin/coupon-templates",
        Some(ADMIN),
        json!({"id": "tpl-doc", "name": "doc", "face_value_cents": 0, "stock": 3, "valid_days": 1})
    );
    call!(
        "POST",
        "/v1/admin/activities/{id}/scenes",
        "/v1/admin/activities/cny2027/scenes",
        Some(ADMIN),
        json!({"id": "coupons", "name": "c", "award_type": "coupon", "coupon": {"template_id": "tpl-doc"}})
    );
    let coupon = call!(
        "POST",
        "/v1/awards",
        "/v1/awards",
        Some(CALLER),
        json!({"user_id": 1, "activity_id": "cny2027", "scene_id": "coupons", "rain_id": 1, "award_type": "coupon"})
    );
    call!(
        "GET",
        "/v1/wallet/coupons",
        "/v1/wallet/coupons",
        Some(jwt.as_str()),
        none
    );
    let otn = coupon["out_trade_no"].as_str().unwrap().to_string();
    call!(
        "POST",
        "/v1/coupons:redeem",
        "/v1/coupons:redeem",
        Some(CALLER),
        json!({"user_id": 1, "out_trade_no": otn, "request_id": "doc-r", "order_cents": 100})
    );
    call!(
        "POST",
        "/v1/coupons:redeem",
        "/v1/coupons:redeem",
        Some(CALLER),
        json!({"user_id": 1, "out_trade_no": otn, "request_id": "doc-s", "order_cents": 100})
    );
    call!(
        "GET",
        "/v1/admin/coupon-templates",
        "/v1/admin/coupon-templates",
        Some(ADMIN),
        none
    );
    call!("GET", "/v1/wallet", "/v1/wallet", None, none);
    assert!(checked >= 44, "{checked}");
    t.stop().await;
}
