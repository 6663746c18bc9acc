//! Events as they are written ([`NewEvent`]) and read ([`StoredEvent`]),
//! their [`Metadata`], typed payload helpers, and the read [`Cursor`].
//!
//! Payloads travel as JSON text: a [`NewEvent`] is serialised once when it
//! is built, and a [`StoredEvent`] keeps the raw JSON until a handler asks
//! for a typed value, so reading costs no JSON tree building.

use crate::error::{Error, Kind, Result};
use crate::typed::Event;
use bytes::BytesMut;
use chrono::{DateTime, Utc};
use postgres_types::{accepts, to_sql_checked, FromSql, IsNull, ToSql, Type};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::fmt;
use uuid::Uuid;

/// Event metadata: correlation and causation ids, a W3C `traceparent`,
/// and any user fields. Stored as the `metadata` jsonb column.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Metadata {
    /// Id shared by every event caused by one request or workflow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    /// Id of the event or command that caused this event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<String>,
    /// W3C trace context (`00-<trace-id>-<span-id>-<flags>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// Any other fields.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Metadata {
    /// Empty metadata (the same as `Metadata::default()`), to build on with
    /// the `with_*` methods.
    pub fn new() -> Metadata {
        Metadata::default()
    }

    /// Sets the correlation id.
    pub fn with_correlation_id(mut self, id: impl Into<String>) -> Metadata {
        self.correlation_id = Some(id.into());
        self
    }

    /// Sets the causation id.
    pub fn with_causation_id(mut self, id: impl Into<String>) -> Metadata {
        self.causation_id = Some(id.into());
        self
    }

    /// Sets the W3C `traceparent`.
    pub fn with_traceparent(mut self, traceparent: impl Into<String>) -> Metadata {
        self.traceparent = Some(traceparent.into());
        self
    }

    /// Sets a field of your own.
    pub fn with_field(mut self, name: impl Into<String>, value: serde_json::Value) -> Metadata {
        self.extra.insert(name.into(), value);
        self
    }

    fn is_empty(&self) -> bool {
        self.correlation_id.is_none()
            && self.causation_id.is_none()
            && self.traceparent.is_none()
            && self.extra.is_empty()
    }
}

/// An event to append. Build it from any `Serialize` payload with
/// [`NewEvent::new`]; `event_id` defaults to a fresh UUIDv7 and
/// `event_version` to 1.
#[derive(Clone, Debug)]
pub struct NewEvent {
    pub(crate) event_id: Uuid,
    pub(crate) event_type: String,
    pub(crate) event_version: i32,
    pub(crate) payload: String,
    pub(crate) metadata: String,
}

impl NewEvent {
    /// Serialises `payload` as the event body.
    pub fn new(event_type: impl Into<String>, payload: &impl Serialize) -> Result<NewEvent> {
        let event_type = event_type.into();
        let payload = serde_json::to_string(payload).map_err(|e| {
            Error::new(
                Kind::Payload,
                format!("cannot serialise the payload of a new {event_type} event: {e}"),
            )
        })?;
        Ok(NewEvent::from_json(event_type, payload))
    }

    /// The typed event `event`: its type name, current version and payload
    /// come from its [`Event`] impl.
    pub fn typed<E: Event>(event: &E) -> Result<NewEvent> {
        let event_type = event.event_type();
        let payload = event.to_payload().map_err(|e| {
            Error::new(
                Kind::Payload,
                format!("cannot serialise the payload of a new {event_type} event: {e}"),
            )
        })?;
        Ok(NewEvent::from_json(event_type, payload).with_event_version(event.event_version()))
    }

    /// Uses `payload_json` (JSON text) as the body as it is; the database
    /// rejects it on append if it is not valid JSON.
    pub fn from_json(event_type: impl Into<String>, payload_json: impl Into<String>) -> NewEvent {
        NewEvent {
            event_id: Uuid::now_v7(),
            event_type: event_type.into(),
            event_version: 1,
            payload: payload_json.into(),
            metadata: "{}".to_owned(),
        }
    }

    /// Sets the idempotency key (default: a new UUIDv7).
    pub fn with_event_id(mut self, event_id: Uuid) -> NewEvent {
        self.event_id = event_id;
        self
    }

    /// Sets the payload's schema version (default 1).
    pub fn with_event_version(mut self, version: i32) -> NewEvent {
        self.event_version = version;
        self
    }

    /// Sets the metadata.
    pub fn with_metadata(mut self, metadata: &Metadata) -> NewEvent {
        self.metadata = if metadata.is_empty() {
            "{}".to_owned()
        } else {
            // Serialising a map of strings and JSON values cannot fail.
            serde_json::to_string(metadata).unwrap_or_else(|_| "{}".to_owned())
        };
        self
    }

    /// The event id.
    pub fn event_id(&self) -> Uuid {
        self.event_id
    }

    /// The event type.
    pub fn event_type(&self) -> &str {
        &self.event_type
    }

    /// The payload's schema version.
    pub fn event_version(&self) -> i32 {
        self.event_version
    }

    /// The payload as JSON text.
    pub fn payload_json(&self) -> &str {
        &self.payload
    }
}

/// A position in the gap-safe read order: `(transaction_id,
/// global_position)`. Events are read strictly after the cursor. See
/// `docs/concepts.md` for why the transaction id comes first.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cursor {
    /// The appending transaction's id (`xid8`).
    pub transaction_id: u64,
    /// The event's global position.
    pub global_position: i64,
}

impl Cursor {
    /// The cursor before every event.
    pub const START: Cursor = Cursor {
        transaction_id: 0,
        global_position: 0,
    };

    /// A cursor at an event.
    pub fn new(transaction_id: u64, global_position: i64) -> Cursor {
        Cursor {
            transaction_id,
            global_position,
        }
    }

    /// The cursor after every event of every transaction older than
    /// `xmin` (the snapshot's oldest running transaction).
    pub(crate) fn below_watermark(xmin: u64) -> Cursor {
        Cursor::new(xmin.saturating_sub(1), i64::MAX)
    }
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "({}, {})", self.transaction_id, self.global_position)
    }
}

/// A PostgreSQL `xid8` (full 64-bit transaction id) in binary form.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Xid8(pub u64);

impl<'a> FromSql<'a> for Xid8 {
    fn from_sql(
        _: &Type,
        raw: &'a [u8],
    ) -> std::result::Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        let bytes: [u8; 8] = raw
            .try_into()
            .map_err(|_| format!("xid8 value has {} bytes, expected 8", raw.len()))?;
        Ok(Xid8(u64::from_be_bytes(bytes)))
    }
    accepts!(XID8);
}

impl ToSql for Xid8 {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut BytesMut,
    ) -> std::result::Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        out.extend_from_slice(&self.0.to_be_bytes());
        Ok(IsNull::No)
    }
    accepts!(XID8);
    to_sql_checked!();
}

/// JSON text read from a `json`/`jsonb` column without building a tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RawJson(pub String);

impl<'a> FromSql<'a> for RawJson {
    fn from_sql(
        ty: &Type,
        raw: &'a [u8],
    ) -> std::result::Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        let body = if *ty == Type::JSONB {
            match raw.split_first() {
                Some((1, rest)) => rest,
                Some((v, _)) => return Err(format!("unsupported jsonb format version {v}").into()),
                None => return Err("empty jsonb value".into()),
            }
        } else {
            raw
        };
        Ok(RawJson(std::str::from_utf8(body)?.to_owned()))
    }
    accepts!(JSON, JSONB);
}

/// An event read from the store.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredEvent {
    /// Order of insertion (not commit order).
    pub global_position: i64,
    /// The appending transaction's id.
    pub transaction_id: u64,
    /// The idempotency key: use it to make side effects idempotent.
    pub event_id: Uuid,
    /// The aggregate (stream) type, e.g. `Account`.
    pub aggregate_type: String,
    /// The stream id within the type.
    pub aggregate_id: String,
    /// 1, 2, 3 … within the stream.
    pub aggregate_version: i64,
    /// The event type, e.g. `MoneyDeposited`.
    pub event_type: String,
    /// The payload's schema version.
    pub event_version: i32,
    /// When it was appended.
    pub created_at: DateTime<Utc>,
    pub(crate) payload: String,
    pub(crate) metadata: String,
}

impl StoredEvent {
    /// The event `new` as if it had been stored as version
    /// `aggregate_version` of the stream `(aggregate_type, aggregate_id)`:
    /// for unit tests of handlers and upcasters, without a database. Its
    /// position is 1 in transaction 1 ([`StoredEvent::with_position`]
    /// changes it) and `created_at` is now.
    pub fn from_new(
        new: &NewEvent,
        aggregate_type: impl Into<String>,
        aggregate_id: impl Into<String>,
        aggregate_version: i64,
    ) -> StoredEvent {
        StoredEvent {
            global_position: 1,
            transaction_id: 1,
            event_id: new.event_id,
            aggregate_type: aggregate_type.into(),
            aggregate_id: aggregate_id.into(),
            aggregate_version,
            event_type: new.event_type.clone(),
            event_version: new.event_version,
            created_at: Utc::now(),
            payload: new.payload.clone(),
            metadata: new.metadata.clone(),
        }
    }

    /// Sets the global position and the appending transaction's id (for
    /// tests).
    pub fn with_position(mut self, global_position: i64, transaction_id: u64) -> StoredEvent {
        self.global_position = global_position;
        self.transaction_id = transaction_id;
        self
    }

    /// Sets when the event was appended (for tests).
    pub fn with_created_at(mut self, created_at: DateTime<Utc>) -> StoredEvent {
        self.created_at = created_at;
        self
    }

    /// Decodes the event into the [`Event`] enum `E`. Fails (a payload
    /// error naming the event) when `E` does not declare the type, when
    /// the stored version is not `E`'s current one (a newer release wrote
    /// it, or no upcaster brought it up to date), or when the payload does
    /// not decode.
    pub fn typed<E: Event>(&self) -> Result<E> {
        self.try_typed::<E>()?.ok_or_else(|| {
            let known: Vec<&str> = E::types().iter().map(|t| t.name).collect();
            self.payload_error(format!(
                "{} does not declare the event type {} (it declares {}): add a variant, or use \
                 StoredEvent::try_typed to pass over types a handler does not handle",
                std::any::type_name::<E>(),
                self.event_type,
                known.join(", ")
            ))
        })
    }

    /// Like [`StoredEvent::typed`], but `Ok(None)` when `E` does not
    /// declare the event's type.
    pub fn try_typed<E: Event>(&self) -> Result<Option<E>> {
        let Some(t) = E::types().iter().find(|t| t.name == self.event_type) else {
            return Ok(None);
        };
        if t.version != self.event_version {
            return Err(self.payload_error(if self.event_version > t.version {
                format!(
                    "it is version {}, newer than the version {} this binary knows: it was written by a newer \
                     release; deploy that release",
                    self.event_version, t.version
                )
            } else {
                format!(
                    "it is version {}, older than the current version {}: register an upcaster from version {} \
                     in the store's Registry (StoreConfig::registry), so that reads bring it up to date",
                    self.event_version, t.version, self.event_version
                )
            }));
        }
        match E::from_payload(&self.event_type, &self.payload) {
            Some(Ok(e)) => Ok(Some(e)),
            Some(Err(e)) => Err(self.payload_error(e.to_string())),
            None => Ok(None),
        }
    }

    fn payload_error(&self, why: String) -> Error {
        Error::new(
            Kind::Payload,
            format!(
                "cannot decode the {} version {} event at global position {} ({} {} v{}): {why}",
                self.event_type,
                self.event_version,
                self.global_position,
                self.aggregate_type,
                self.aggregate_id,
                self.aggregate_version,
            ),
        )
    }

    /// The cursor at this event.
    pub fn cursor(&self) -> Cursor {
        Cursor::new(self.transaction_id, self.global_position)
    }

    /// The payload as JSON text.
    pub fn payload_json(&self) -> &str {
        &self.payload
    }

    /// Decodes the payload into `T`. The error names the event type, the
    /// position and serde's message.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_str(&self.payload).map_err(|e| {
            Error::new(
                Kind::Payload,
                format!(
                    "cannot decode the payload of {} event at global position {} ({} {} v{}) as {}: {e}",
                    self.event_type,
                    self.global_position,
                    self.aggregate_type,
                    self.aggregate_id,
                    self.aggregate_version,
                    std::any::type_name::<T>(),
                ),
            )
            .with_source(e)
        })
    }

    /// The payload as a JSON value.
    pub fn payload_value(&self) -> Result<serde_json::Value> {
        self.decode()
    }

    /// The metadata (correlation id, causation id, traceparent, extras).
    ///
    /// An error for events handed to a projection that declares
    /// `ProjectionOptions::reads_metadata(false)`: the engine did not read
    /// their metadata.
    pub fn metadata(&self) -> Result<Metadata> {
        if self.metadata.is_empty() {
            return Err(Error::config(format!(
                "the metadata of the event at global position {} was not read: the projection declares \
                 ProjectionOptions::reads_metadata(false); remove that declaration to receive metadata",
                self.global_position
            )));
        }
        serde_json::from_str(&self.metadata).map_err(|e| {
            Error::new(
                Kind::Payload,
                format!(
                    "cannot decode the metadata of the event at global position {}: {e}",
                    self.global_position
                ),
            )
        })
    }

    /// The metadata as JSON text; empty (not valid JSON) for events handed
    /// to a projection that declares `ProjectionOptions::reads_metadata(false)`.
    pub fn metadata_json(&self) -> &str {
        &self.metadata
    }

    /// Column list matching [`StoredEvent::from_row_at`], for `SELECT`s.
    pub(crate) const COLUMNS: &'static str =
        "global_position, transaction_id, event_id, aggregate_type, \
         aggregate_id, aggregate_version, event_type, event_version, payload, metadata, created_at";

    /// Decodes the columns of [`StoredEvent::COLUMNS`] starting at `at`.
    pub(crate) fn from_row_at(row: &tokio_postgres::Row, at: usize) -> Result<StoredEvent> {
        Ok(StoredEvent {
            global_position: row.try_get(at)?,
            transaction_id: row.try_get::<_, Xid8>(at + 1)?.0,
            event_id: row.try_get(at + 2)?,
            aggregate_type: row.try_get(at + 3)?,
            aggregate_id: row.try_get(at + 4)?,
            aggregate_version: row.try_get(at + 5)?,
            event_type: row.try_get(at + 6)?,
            event_version: row.try_get(at + 7)?,
            payload: row.try_get::<_, RawJson>(at + 8)?.0,
            // NULL only where the page did not read the column (the
            // column itself is NOT NULL): `reads_metadata(false)`.
            metadata: row
                .try_get::<_, Option<RawJson>>(at + 9)?
                .map_or_else(String::new, |m| m.0),
            created_at: row.try_get(at + 10)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Deposited {
        amount: i64,
    }

    fn stored(payload: &str) -> StoredEvent {
        StoredEvent {
            global_position: 7,
            transaction_id: 1,
            event_id: Uuid::nil(),
            aggregate_type: "Account".into(),
            aggregate_id: "a-1".into(),
            aggregate_version: 2,
            event_type: "MoneyDeposited".into(),
            event_version: 1,
            created_at: Utc::now(),
            payload: payload.into(),
            metadata: "{}".into(),
        }
    }

    #[test]
    fn decode_error_names_type_position_and_serde_message() {
        let e = stored(r#"{"amount":"ten"}"#)
            .decode::<Deposited>()
            .unwrap_err();
        let m = e.to_string();
        assert!(e.is_payload());
        assert!(m.contains("MoneyDeposited"), "{m}");
        assert!(m.contains("global position 7"), "{m}");
        assert!(m.contains("invalid type"), "{m}");
    }

    #[test]
    fn metadata_round_trips_known_and_extra_fields() {
        let mut md = Metadata {
            correlation_id: Some("c".into()),
            traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
            ..Metadata::default()
        };
        md.extra.insert("user".into(), serde_json::json!("alice"));
        let e = NewEvent::new("X", &1).unwrap().with_metadata(&md);
        let back: Metadata = serde_json::from_str(&e.metadata).unwrap();
        assert_eq!(back, md);
    }
}
