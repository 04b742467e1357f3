//! The service's HTTP API (docs: API.md), as the bench calls it: the stable way in.

use anyhow::bail;
use serde::Deserialize;
use serde_json::Value;

/// A client of the server under test with the operator's and one caller's credentials.
pub struct Api {
    url: String,
    http: reqwest::Client,
    admin_key: String,
    caller_key: String,
}

/// `GET /v1/admin/activities/{id}`: the live figures of an activity (the fields the bench
/// checks; the answer has more).
#[derive(Debug, Clone, Deserialize)]
pub struct ActivityFigures {
    pub issued_cents: i64,
    pub issued_count: i64,
    pub booked_cents: i64,
    pub booked_count: i64,
    pub pending_cents: i64,
    pub pending_count: i64,
    pub budget_taken_cents: i64,
}

/// `GET /v1/wallet` in JSON.
#[derive(Debug, Clone, Deserialize)]
pub struct Wallet {
    pub balance_cents: i64,
    pub booked_cents: i64,
    pub pending_cents: i64,
    pub total_income_cents: i64,
    pub withdrawn_cents: i64,
}

impl Api {
    /// With `shadow`, every request carries `X-RPW-Shadow: 1` (API.md, "Shadow traffic");
    /// with `h2c`, requests are HTTP/2 streams (prior knowledge, no TLS).
    pub fn new(
        url: String,
        admin_key: String,
        caller_key: String,
        shadow: bool,
        h2c: bool,
    ) -> anyhow::Result<Self> {
        let mut headers = reqwest::header::HeaderMap::new();
        if shadow {
            headers.insert(
                "x-rpw-shadow",
                reqwest::header::HeaderValue::from_static("1"),
            );
        }
        let mut http = reqwest::Client::builder()
            .pool_max_idle_per_host(256)
            .tcp_nodelay(true)
            .default_headers(headers);
        if h2c {
            http = http.http2_prior_knowledge();
        }
        Ok(Self {
            url,
            http: http.build()?,
            admin_key,
            caller_key,
        })
    }

    /// An operator POST with a JSON body; fails unless the answer is 2xx.
    pub async fn admin_post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        let resp = self
            .http
            .post(format!("{}{path}", self.url))
            .bearer_auth(&self.admin_key)
            .json(body)
            .send()
            .await?;
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            bail!("{path}: {status} {body}");
        }
        Ok(body)
    }

    /// The operator's view of `activity` with its live figures.
    pub async fn activity_figures(&self, activity: &str) -> anyhow::Result<ActivityFigures> {
        let resp = self
            .http
            .get(format!("{}/v1/admin/activities/{activity}", self.url))
            .bearer_auth(&self.admin_key)
            .send()
            .await?;
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        if status.as_u16() != 200 {
            bail!("operator API: {status} {body}");
        }
        Ok(serde_json::from_value(body)?)
    }

    /// A caller's protobuf POST (`/v1/awards`, `/v1/awards:batch`): the status and the
    /// body, read in full.
    pub async fn post_pb(&self, path: &str, body: Vec<u8>) -> anyhow::Result<(u16, bytes::Bytes)> {
        let resp = self
            .http
            .post(format!("{}{path}", self.url))
            .bearer_auth(&self.caller_key)
            .header("content-type", "application/x-protobuf")
            .header("accept", "application/x-protobuf")
            .body(body)
            .send()
            .await?;
        let status = resp.status().as_u16();
        Ok((status, resp.bytes().await?))
    }

    /// `GET /healthz`: the cheapest answer the server gives, the HTTP floor.
    pub async fn healthz(&self) -> anyhow::Result<bool> {
        let resp = self
            .http
            .get(format!("{}/healthz", self.url))
            .send()
            .await?;
        let ok = resp.status().is_success();
        let _ = resp.bytes().await;
        Ok(ok)
    }

    /// A user's wallet in protobuf; true when it was served (2xx, the body then read).
    pub async fn view_wallet_pb(&self, jwt: &str) -> anyhow::Result<bool> {
        let resp = self
            .http
            .get(format!("{}/v1/wallet", self.url))
            .bearer_auth(jwt)
            .header("accept", "application/x-protobuf")
            .send()
            .await?;
        if !resp.status().is_success() {
            return Ok(false);
        }
        // Read the body, as a client would; a broken body still counts as served, as it
        // always has in this bench.
        let _ = resp.bytes().await;
        Ok(true)
    }

    /// The value of one series of the server's `/metrics` (`name{labels}` exactly as
    /// the exposition writes it); 0 when absent.
    pub async fn metric(&self, series: &str) -> anyhow::Result<f64> {
        let text = self
            .http
            .get(format!("{}/metrics", self.url))
            .send()
            .await?
            .text()
            .await?;
        Ok(text
            .lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0.0))
    }

    /// A user's wallet in JSON.
    pub async fn wallet(&self, jwt: &str) -> anyhow::Result<Wallet> {
        let resp = self
            .http
            .get(format!("{}/v1/wallet", self.url))
            .bearer_auth(jwt)
            .send()
            .await?;
        let status = resp.status();
        if !status.is_success() {
            bail!(
                "GET /v1/wallet: {status} {}",
                resp.text().await.unwrap_or_default()
            );
        }
        Ok(resp.json().await?)
    }

    /// `POST /v1/withdrawals`; the status, as soon as it is known (the body is not read).
    pub async fn withdraw(
        &self,
        jwt: &str,
        request_id: &str,
        amount_cents: i64,
    ) -> anyhow::Result<u16> {
        let resp = self
            .http
            .post(format!("{}/v1/withdrawals", self.url))
            .bearer_auth(jwt)
            .json(&serde_json::json!({"request_id": request_id, "amount_cents": amount_cents}))
            .send()
            .await?;
        Ok(resp.status().as_u16())
    }
}
