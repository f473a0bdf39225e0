//! The Confluent wire format: byte `0x00`, the writer schema's id as a big-endian u32, then the
//! Avro binary datum.
//!
//! Binary Avro cannot be read without the schema that wrote it, so decoding looks the id up in
//! the registry and then resolves the datum to the reader's version ([`SchemaVersion::LATEST`]):
//! v1 bytes read as v2 get `payload = None`; bytes from a newer writer lose fields this reader
//! does not know.

use std::sync::Arc;

use apache_avro::Schema;

use crate::event::{BuildEvent, SchemaVersion};
use crate::registry::{BUILD_EVENT_SUBJECT, HttpRegistry, RegistryError, SchemaRegistry};

/// How many times [`Codec::for_registry`] asks a registry that does not answer.
pub const REGISTRY_ATTEMPTS: usize = 5;

const MAGIC: u8 = 0;
const HEADER_LEN: usize = 5;

/// Why bytes could not be turned into an event (or an event into bytes). Every decode error
/// but a transient registry failure means the record can never be read: dead-letter it.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("record is {0} bytes, shorter than the 5-byte Confluent header")]
    TooShort(usize),
    #[error("bad magic byte {0:#04x}: not Confluent wire format")]
    BadMagic(u8),
    #[error("unknown schema id {0}")]
    UnknownSchemaId(u32),
    #[error("schema registry: {0}")]
    Registry(RegistryError),
    #[error("corrupt or truncated Avro datum: {0}")]
    Corrupt(String),
    /// A string, bytes or array length in the datum is over the allocation cap
    /// ([`cap_allocation`]): no event of this size was ever written, so the record is corrupt or
    /// hostile, and it is refused before anything that size is allocated.
    #[error(
        "the datum claims a field of {claimed} bytes, over the {limit}-byte cap (the event size limit): corrupt or hostile, not read"
    )]
    FieldTooLarge { claimed: usize, limit: usize },
    #[error("datum does not match the BuildEvent shape: {0}")]
    Shape(String),
    #[error("encoding failed: {0}")]
    Encode(String),
}

impl CodecError {
    /// A stable, short name for metrics labels and dead-letter reason headers.
    pub fn kind(&self) -> &'static str {
        match self {
            CodecError::TooShort(_) => "too_short",
            CodecError::BadMagic(_) => "bad_magic",
            CodecError::UnknownSchemaId(_) => "unknown_schema_id",
            CodecError::Registry(_) => "registry_unavailable",
            CodecError::Corrupt(_) => "corrupt_datum",
            CodecError::FieldTooLarge { .. } => "field_too_large",
            CodecError::Shape(_) => "bad_shape",
            CodecError::Encode(_) => "encode",
        }
    }

    /// True when retrying later may succeed (the registry could not be reached).
    pub fn is_transient(&self) -> bool {
        matches!(self, CodecError::Registry(e) if e.is_transient())
    }
}

impl From<RegistryError> for CodecError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::UnknownId(id) => CodecError::UnknownSchemaId(id),
            other => CodecError::Registry(other),
        }
    }
}

/// An event with the id of the schema that wrote it.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedEvent {
    pub event: BuildEvent,
    pub writer_schema_id: u32,
}

/// Encodes with one writer version and decodes anything the registry knows.
#[derive(Debug, Clone)]
pub struct Codec {
    registry: Arc<dyn SchemaRegistry>,
    reader: Arc<Schema>,
    writer: SchemaVersion,
    writer_schema: Arc<Schema>,
    writer_id: u32,
}

impl Codec {
    /// Registers (or looks up) the writer version's schema and returns a codec that writes it.
    pub async fn new(
        registry: Arc<dyn SchemaRegistry>,
        writer: SchemaVersion,
    ) -> Result<Self, CodecError> {
        let writer_schema = writer.schema();
        let writer_id = registry
            .register(BUILD_EVENT_SUBJECT, &writer_schema)
            .await?;
        Ok(Self {
            registry,
            reader: Arc::new(SchemaVersion::LATEST.schema()),
            writer,
            writer_schema: Arc::new(writer_schema),
            writer_id,
        })
    }

    /// The codec of a deployment: with no URL, the embedded registry's; with one, a client of
    /// that Confluent-compatible registry, where `writer` is registered now (its id goes in every
    /// record written; a reader fetches writer schemas by id, once each). A registry that does
    /// not answer is asked [`REGISTRY_ATTEMPTS`] times in all before the error is returned, so a
    /// service started beside its registry does not fail on the race.
    pub async fn for_registry(
        url: Option<&str>,
        writer: SchemaVersion,
    ) -> Result<Self, CodecError> {
        use backon::{ExponentialBuilder, Retryable};
        let Some(url) = url else {
            return Ok(Self::embedded_writing(writer));
        };
        let registry: Arc<dyn SchemaRegistry> = Arc::new(HttpRegistry::new(url)?);
        let backoff = ExponentialBuilder::default()
            .with_min_delay(std::time::Duration::from_millis(200))
            .with_max_delay(std::time::Duration::from_secs(2))
            .with_max_times(REGISTRY_ATTEMPTS - 1)
            .with_jitter();
        (|| Self::new(registry.clone(), writer))
            .retry(backoff)
            .when(CodecError::is_transient)
            .notify(|error, wait| {
                tracing::warn!(%url, %error, ?wait, "schema registry unavailable; retrying")
            })
            .await
    }

    /// The codec of the embedded registry, writing the latest version.
    pub fn embedded() -> Self {
        Self::embedded_writing(SchemaVersion::LATEST)
    }

    /// The codec of the embedded registry, writing `writer`.
    pub fn embedded_writing(writer: SchemaVersion) -> Self {
        let registry = crate::registry::EmbeddedRegistry::new();
        let writer_id = registry.id_of(writer);
        Self {
            registry: Arc::new(registry),
            reader: Arc::new(SchemaVersion::LATEST.schema()),
            writer,
            writer_schema: Arc::new(writer.schema()),
            writer_id,
        }
    }

    pub fn writer_version(&self) -> SchemaVersion {
        self.writer
    }

    pub fn writer_schema_id(&self) -> u32 {
        self.writer_id
    }

    /// Frames `event` in the writer version. A v1 writer drops the payload.
    pub fn encode(&self, event: &BuildEvent) -> Result<Vec<u8>, CodecError> {
        let datum = apache_avro::to_avro_datum(&self.writer_schema, event.to_avro(self.writer))
            .map_err(|e| CodecError::Encode(e.to_string()))?;
        let mut out = Vec::with_capacity(HEADER_LEN + datum.len());
        out.push(MAGIC);
        out.extend_from_slice(&self.writer_id.to_be_bytes());
        out.extend_from_slice(&datum);
        Ok(out)
    }

    /// Reads a framed event written by any registered version.
    pub async fn decode(&self, bytes: &[u8]) -> Result<DecodedEvent, CodecError> {
        let id = frame_schema_id(bytes)?;
        let writer = self.registry.schema_by_id(id).await?;
        decode_datum(&writer, &self.reader, &bytes[HEADER_LEN..], id)
    }

    /// Reads a framed event, resolving it to `reader` rather than the latest version: what an
    /// older consumer sees.
    pub async fn decode_as(
        &self,
        bytes: &[u8],
        reader: SchemaVersion,
    ) -> Result<DecodedEvent, CodecError> {
        let id = frame_schema_id(bytes)?;
        let writer = self.registry.schema_by_id(id).await?;
        decode_datum(&writer, &reader.schema(), &bytes[HEADER_LEN..], id)
    }
}

/// The default largest event, in bytes (the producers' and the consumer's
/// `--max-event-bytes`): librdkafka's default `message.max.bytes`.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 1_000_000;

/// Caps what the Avro decoder allocates for one string, bytes or array length a datum claims
/// at `max_event_bytes`, the largest event a producer writes: without it, a record that claims a
/// length of hundreds of megabytes gets them allocated (apache-avro's own cap is 512 MiB) before
/// the read fails. apache-avro keeps one process-wide setting, fixed by its first use: call this
/// at start, before anything is decoded. Returns the cap in force (the first one set).
pub fn cap_allocation(max_event_bytes: usize) -> usize {
    apache_avro::util::max_allocation_bytes(max_event_bytes)
}

/// The schema id in a Confluent frame, after checking the header.
pub fn frame_schema_id(bytes: &[u8]) -> Result<u32, CodecError> {
    if bytes.len() < HEADER_LEN {
        return Err(CodecError::TooShort(bytes.len()));
    }
    if bytes[0] != MAGIC {
        return Err(CodecError::BadMagic(bytes[0]));
    }
    Ok(u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]))
}

fn decode_datum(
    writer: &Schema,
    reader: &Schema,
    datum: &[u8],
    id: u32,
) -> Result<DecodedEvent, CodecError> {
    let mut input = Input {
        rest: datum,
        read_past_end: false,
    };
    let value =
        apache_avro::from_avro_datum(writer, &mut input, None).map_err(|e| match e.details() {
            apache_avro::error::Details::MemoryAllocation { desired, maximum } => {
                CodecError::FieldTooLarge {
                    claimed: *desired,
                    limit: *maximum,
                }
            }
            _ => CodecError::Corrupt(e.to_string()),
        })?;
    if !input.rest.is_empty() {
        return Err(CodecError::Corrupt(format!(
            "{} bytes left over after the datum",
            input.rest.len()
        )));
    }
    // apache-avro reads end-of-input where a union or boolean starts as null, so a record cut
    // at a field boundary would decode. A whole datum never asks for a byte past its end.
    if input.read_past_end {
        return Err(CodecError::Corrupt(format!(
            "datum is truncated: {} bytes end before its last field",
            datum.len()
        )));
    }
    let value = value
        .resolve(reader)
        .map_err(|e| CodecError::Shape(e.to_string()))?;
    Ok(DecodedEvent {
        event: BuildEvent::from_avro(value).map_err(|e| CodecError::Shape(e.0))?,
        writer_schema_id: id,
    })
}

/// The datum being read, noting whether the decoder asked for a byte after the last one: every
/// field takes at least one byte, so a datum whose fields are all there never does.
struct Input<'a> {
    rest: &'a [u8],
    read_past_end: bool,
}

impl std::io::Read for Input<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.rest.is_empty() && !buf.is_empty() {
            self.read_past_end = true;
        }
        self.rest.read(buf)
    }
}
