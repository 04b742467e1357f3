//! Body formats: JSON or protobuf in and out, bounded lists, and JSON bodies whose
//! rejection is the API's envelope.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::Error;

pub const PROTOBUF: &str = "application/x-protobuf";

/// The body format of a request or a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Protobuf,
}

impl Format {
    pub fn of_request(headers: &HeaderMap) -> Self {
        match headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
        {
            Some(ct) if ct.starts_with(PROTOBUF) => Format::Protobuf,
            _ => Format::Json,
        }
    }

    /// `Accept: application/x-protobuf` asks for protobuf; without an Accept header a
    /// protobuf request gets a protobuf answer.
    pub fn of_response(headers: &HeaderMap) -> Self {
        match headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()) {
            Some(accept) if accept.contains(PROTOBUF) => Format::Protobuf,
            Some(accept) if accept.contains("json") => Format::Json,
            _ => Self::of_request(headers),
        }
    }
}

/// A value with a JSON shape and a protobuf shape.
pub trait Wire: Serialize {
    type Pb: prost::Message;
    fn to_pb(&self) -> Self::Pb;
}

/// Answers `value` in the asked format.
pub fn reply<T: Wire>(format: Format, status: StatusCode, value: &T) -> Response {
    match format {
        Format::Json => (status, Json(value)).into_response(),
        Format::Protobuf => {
            let bytes = prost::Message::encode_to_vec(&value.to_pb());
            (
                status,
                [(header::CONTENT_TYPE, HeaderValue::from_static(PROTOBUF))],
                bytes,
            )
                .into_response()
        }
    }
}

/// Decodes a body that may be JSON (into `J`) or protobuf (into `P`, then `J`).
pub fn decode_body<J, P>(headers: &HeaderMap, body: &[u8]) -> Result<J, Error>
where
    J: DeserializeOwned,
    P: prost::Message + Default + Into<J>,
{
    match Format::of_request(headers) {
        Format::Protobuf => P::decode(body)
            .map(Into::into)
            .map_err(|e| Error::InvalidRequest(format!("malformed protobuf body: {e}"))),
        Format::Json => parse_json(body),
    }
}

/// Refuses a protobuf body whose top-level repeated field `field` holds more than `max`
/// items, by walking the wire format without decoding it: a refusal costs no more
/// memory than the body itself (a million empty items would otherwise become a million
/// decoded structs).
pub fn check_list_len(
    headers: &HeaderMap,
    body: &[u8],
    field: u32,
    max: usize,
) -> Result<(), Error> {
    if Format::of_request(headers) != Format::Protobuf {
        return Ok(());
    }
    let malformed = || Error::InvalidRequest("malformed protobuf body".into());
    let mut buf = body;
    let mut count = 0usize;
    while !buf.is_empty() {
        let key = prost::encoding::decode_varint(&mut buf).map_err(|_| malformed())?;
        let wire = key & 7;
        if key >> 3 == u64::from(field) {
            count += 1;
            if count > max {
                return Err(Error::InvalidRequest(format!(
                    "at most {max} items per request"
                )));
            }
        }
        match wire {
            0 => {
                prost::encoding::decode_varint(&mut buf).map_err(|_| malformed())?;
            }
            1 | 5 => {
                let n = if wire == 1 { 8 } else { 4 };
                buf = buf.get(n..).ok_or_else(malformed)?;
            }
            2 => {
                let len = prost::encoding::decode_varint(&mut buf).map_err(|_| malformed())?;
                let len = usize::try_from(len).map_err(|_| malformed())?;
                buf = buf.get(len..).ok_or_else(malformed)?;
            }
            _ => return Err(malformed()),
        }
    }
    Ok(())
}

/// The most items any list in a request body may hold while it is decoded (the
/// configured limits, `issue.batch_max` and `wallet.sync_max`, are at most this).
pub const LIST_MAX: usize = 10_000;

/// A JSON list refused while it is decoded once it holds more than [`LIST_MAX`] items.
#[derive(Debug)]
pub struct Bounded<T>(pub Vec<T>);

impl<'de, T: serde::Deserialize<'de>> serde::Deserialize<'de> for Bounded<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit<T>(std::marker::PhantomData<T>);
        impl<'de, T: serde::Deserialize<'de>> serde::de::Visitor<'de> for Visit<T> {
            type Value = Bounded<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                write!(f, "a list of at most {LIST_MAX} items")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Self::Value, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
                while let Some(item) = seq.next_element()? {
                    if out.len() == LIST_MAX {
                        return Err(serde::de::Error::custom(format!(
                            "at most {LIST_MAX} items per request"
                        )));
                    }
                    out.push(item);
                }
                Ok(Bounded(out))
            }
        }
        d.deserialize_seq(Visit(std::marker::PhantomData))
    }
}

pub fn parse_json<J: DeserializeOwned>(body: &[u8]) -> Result<J, Error> {
    // The error names the field it is about ("starts_at: invalid type: null, ..."), so a
    // form can show it beside that field.
    let mut de = serde_json::Deserializer::from_slice(body);
    let value: J = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path.is_empty() || path == "." {
            Error::InvalidRequest(format!("malformed JSON body: {inner}"))
        } else {
            Error::InvalidRequest(format!("malformed JSON body: {path}: {inner}"))
        }
    })?;
    de.end()
        .map_err(|e| Error::InvalidRequest(format!("malformed JSON body: {e}")))?;
    Ok(value)
}

/// A JSON body whose rejection is the API's error envelope, not axum's plain text.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = Error;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                Error::PayloadTooLarge
            } else {
                Error::InvalidRequest(format!("unreadable body: {e}"))
            }
        })?;
        Ok(JsonBody(parse_json(&bytes)?))
    }
}
