//! Credentials as extractors: a handler that takes an [`Operator`], a [`Caller`] or a
//! [`User`] cannot run without one.
//!
//! Admin and caller keys are kept only as SHA-256 digests and compared in constant time.

use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use ring::digest::{digest, SHA256};
use serde::{Deserialize, Serialize};

use super::AppState;
use crate::config::AuthSettings;
use crate::domain::UserId;
use crate::error::Error;

pub struct AuthKeys {
    admin: Option<Vec<u8>>,
    callers: Vec<(String, Vec<u8>)>,
    jwt_decoding: Option<DecodingKey>,
    jwt_encoding: Option<EncodingKey>,
    validation: Validation,
}

fn hash(secret: &str) -> Vec<u8> {
    digest(&SHA256, secret.as_bytes()).as_ref().to_vec()
}

fn equal(a: &[u8], b: &[u8]) -> bool {
    // Both are SHA-256 digests of the same length; fold every byte so the time taken
    // does not depend on where they differ.
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub exp: u64,
}

impl AuthKeys {
    pub fn new(
        settings: &AuthSettings,
        callers: Vec<(String, crate::config::Secret)>,
        leeway_secs: u64,
    ) -> Self {
        let admin =
            (!settings.admin_key.expose().is_empty()).then(|| hash(settings.admin_key.expose()));
        let secret = settings.jwt_secret.expose();
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = leeway_secs;
        validation.validate_exp = true;
        Self {
            admin,
            callers: callers
                .into_iter()
                .map(|(n, k)| (n, hash(k.expose())))
                .collect(),
            jwt_decoding: (!secret.is_empty()).then(|| DecodingKey::from_secret(secret.as_bytes())),
            jwt_encoding: (!secret.is_empty()).then(|| EncodingKey::from_secret(secret.as_bytes())),
            validation,
        }
    }

    pub fn is_admin(&self, presented: &str) -> bool {
        self.admin
            .as_ref()
            .is_some_and(|h| equal(h, &hash(presented)))
    }

    pub fn caller(&self, presented: &str) -> Option<&str> {
        let h = hash(presented);
        self.callers
            .iter()
            .find(|(_, k)| equal(k, &h))
            .map(|(n, _)| n.as_str())
    }

    pub fn user(&self, jwt: &str) -> Option<UserId> {
        let key = self.jwt_decoding.as_ref()?;
        let data = jsonwebtoken::decode::<Claims>(jwt, key, &self.validation).ok()?;
        let id: i64 = data.claims.sub.parse().ok()?;
        UserId::parse(id).ok()
    }

    /// A user JWT signed with the configured secret (for `dev-jwt` and tests).
    pub fn issue_user_jwt(&self, user: UserId, ttl_secs: u64) -> anyhow::Result<String> {
        let key = self
            .jwt_encoding
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("auth.jwt_secret is not set"))?;
        let exp = chrono::Utc::now().timestamp().max(0) as u64 + ttl_secs;
        Ok(jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &Claims {
                sub: user.to_string(),
                exp,
            },
            key,
        )?)
    }
}

fn bearer(parts: &Parts) -> Result<&str, Error> {
    let value = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or(Error::Unauthorized)?;
    value
        .strip_prefix("Bearer ")
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or(Error::Unauthorized)
}

/// An operator, authenticated by the admin key.
pub struct Operator;

/// An upstream service, authenticated by its API key; holds the caller's name.
pub struct Caller(pub String);

/// A mobile client's user, authenticated by a JWT whose subject is the user id.
pub struct User(pub UserId);

impl FromRequestParts<AppState> for Operator {
    type Rejection = Error;
    async fn from_request_parts(parts: &mut Parts, app: &AppState) -> Result<Self, Error> {
        if app.auth.is_admin(bearer(parts)?) {
            Ok(Operator)
        } else {
            Err(Error::Unauthorized)
        }
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = Error;
    async fn from_request_parts(parts: &mut Parts, app: &AppState) -> Result<Self, Error> {
        app.auth
            .caller(bearer(parts)?)
            .map(|name| Caller(name.to_string()))
            .ok_or(Error::Unauthorized)
    }
}

impl FromRequestParts<AppState> for User {
    type Rejection = Error;
    async fn from_request_parts(parts: &mut Parts, app: &AppState) -> Result<Self, Error> {
        app.auth
            .user(bearer(parts)?)
            .map(User)
            .ok_or(Error::Unauthorized)
    }
}
