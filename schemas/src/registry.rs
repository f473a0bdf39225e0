//! Where schema ids come from.
//!
//! The wire format names the writer's schema by a 4-byte id. [`EmbeddedRegistry`] fixes the ids
//! in `avro/manifest.json` (committed beside the `.avsc` files), so a hookline deployment needs no
//! registry service; [`HttpRegistry`] speaks the Confluent Schema Registry API for fleets that run
//! one. Both cache: a schema id, once known, never changes its meaning.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use apache_avro::Schema;
use async_trait::async_trait;
use serde::Deserialize;

use crate::event::SchemaVersion;

/// The registry subject of `BuildEvent` values (Confluent's TopicNameStrategy for `build-events`).
pub const BUILD_EVENT_SUBJECT: &str = "build-events-value";

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("schema id {0} is not known to the registry")]
    UnknownId(u32),
    #[error(
        "schema is not registered under subject {subject} and this registry cannot register it"
    )]
    NotRegistered { subject: String },
    #[error("schema registry request failed: {0}")]
    Http(String),
    /// The registry answered a registration with no (a 4xx other than 408/429: an incompatible
    /// schema is 409, an invalid one 422): asking again gives the same answer.
    #[error("schema registry refused: {0}")]
    Refused(String),
    #[error("schema registry URL {0:?} must start with http:// or https://")]
    InvalidUrl(String),
    #[error("schema registry returned an unparsable schema for id {id}: {reason}")]
    BadSchema { id: u32, reason: String },
}

impl RegistryError {
    /// True when asking again later may succeed (the registry was unreachable), as opposed to an
    /// answer that will not change.
    pub fn is_transient(&self) -> bool {
        matches!(self, RegistryError::Http(_))
    }
}

#[async_trait]
pub trait SchemaRegistry: Send + Sync + std::fmt::Debug {
    /// The id of `schema` under `subject`, registering it where the registry allows.
    async fn register(&self, subject: &str, schema: &Schema) -> Result<u32, RegistryError>;
    /// The writer schema with this id.
    async fn schema_by_id(&self, id: u32) -> Result<Arc<Schema>, RegistryError>;
}

#[derive(Deserialize)]
struct Manifest {
    subject: String,
    versions: Vec<ManifestEntry>,
}

#[derive(Deserialize)]
struct ManifestEntry {
    version: u32,
    id: u32,
}

/// The schema ids fixed in `avro/manifest.json`. The default registry.
#[derive(Debug, Clone)]
pub struct EmbeddedRegistry {
    subject: String,
    by_id: HashMap<u32, Arc<Schema>>,
    by_canonical: HashMap<String, u32>,
}

impl EmbeddedRegistry {
    pub fn new() -> Self {
        let manifest: Manifest = serde_json::from_str(include_str!("../avro/manifest.json"))
            .expect("committed manifest parses");
        let mut by_id = HashMap::new();
        let mut by_canonical = HashMap::new();
        for entry in manifest.versions {
            let version = SchemaVersion::from_number(entry.version)
                .expect("every manifest version is a known SchemaVersion");
            let schema = version.schema();
            by_canonical.insert(schema.canonical_form(), entry.id);
            by_id.insert(entry.id, Arc::new(schema));
        }
        Self {
            subject: manifest.subject,
            by_id,
            by_canonical,
        }
    }

    /// The fixed id of a schema version.
    pub fn id_of(&self, version: SchemaVersion) -> u32 {
        self.by_canonical[&version.schema().canonical_form()]
    }
}

impl Default for EmbeddedRegistry {
    fn default() -> Self {
        Self::new()
    }
}

#[async_trait]
impl SchemaRegistry for EmbeddedRegistry {
    async fn register(&self, subject: &str, schema: &Schema) -> Result<u32, RegistryError> {
        if subject != self.subject {
            return Err(RegistryError::NotRegistered {
                subject: subject.to_owned(),
            });
        }
        self.by_canonical
            .get(&schema.canonical_form())
            .copied()
            .ok_or_else(|| RegistryError::NotRegistered {
                subject: subject.to_owned(),
            })
    }

    async fn schema_by_id(&self, id: u32) -> Result<Arc<Schema>, RegistryError> {
        self.by_id
            .get(&id)
            .cloned()
            .ok_or(RegistryError::UnknownId(id))
    }
}

/// A client of a Confluent-compatible schema registry (`POST /subjects/{s}/versions`,
/// `GET /schemas/ids/{id}`), caching every answer.
#[derive(Debug)]
pub struct HttpRegistry {
    base: String,
    http: reqwest::Client,
    by_id: RwLock<HashMap<u32, Arc<Schema>>>,
    registered: RwLock<HashMap<(String, String), u32>>,
}

const REGISTRY_CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

#[derive(Deserialize)]
struct IdAnswer {
    id: u32,
}

#[derive(Deserialize)]
struct SchemaAnswer {
    schema: String,
}

/// A final answer to a registration: the client's fault, except a timeout (408) and rate
/// limiting (429), which pass. 5xx answers and unreachable registries are transient.
fn refusal(status: reqwest::StatusCode) -> bool {
    status.is_client_error()
        && status != reqwest::StatusCode::REQUEST_TIMEOUT
        && status != reqwest::StatusCode::TOO_MANY_REQUESTS
}

impl HttpRegistry {
    pub fn new(base_url: &str) -> Result<Self, RegistryError> {
        if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
            return Err(RegistryError::InvalidUrl(base_url.to_owned()));
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| RegistryError::Http(e.to_string()))?;
        Ok(Self {
            base: base_url.trim_end_matches('/').to_owned(),
            http,
            by_id: RwLock::default(),
            registered: RwLock::default(),
        })
    }
}

#[async_trait]
impl SchemaRegistry for HttpRegistry {
    async fn register(&self, subject: &str, schema: &Schema) -> Result<u32, RegistryError> {
        let canonical = schema.canonical_form();
        let key = (subject.to_owned(), canonical.clone());
        if let Some(id) = self.registered.read().unwrap().get(&key) {
            return Ok(*id);
        }
        let url = format!("{}/subjects/{subject}/versions", self.base);
        // The full schema, not its Parsing Canonical Form: that form drops field defaults and
        // logical types, so the registry would judge v2's new fields as having no default
        // (incompatible under BACKWARD) and other readers would lose `uuid`/`timestamp-micros`.
        let full = serde_json::to_string(schema)
            .map_err(|e| RegistryError::Http(format!("serialise the schema: {e}")))?;
        let response = self
            .http
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, REGISTRY_CONTENT_TYPE)
            .json(&serde_json::json!({ "schema": full }))
            .send()
            .await
            .map_err(|e| RegistryError::Http(e.to_string()))?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            let message = format!("register {subject}: {status} {body}");
            return Err(if refusal(status) {
                RegistryError::Refused(message)
            } else {
                RegistryError::Http(message)
            });
        }
        let answer: IdAnswer = response
            .json()
            .await
            .map_err(|e| RegistryError::Http(e.to_string()))?;
        self.registered.write().unwrap().insert(key, answer.id);
        self.by_id
            .write()
            .unwrap()
            .insert(answer.id, Arc::new(schema.clone()));
        Ok(answer.id)
    }

    async fn schema_by_id(&self, id: u32) -> Result<Arc<Schema>, RegistryError> {
        if let Some(schema) = self.by_id.read().unwrap().get(&id) {
            return Ok(schema.clone());
        }
        let url = format!("{}/schemas/ids/{id}", self.base);
        let response = self
            .http
            .get(url)
            .header(reqwest::header::ACCEPT, REGISTRY_CONTENT_TYPE)
            .send()
            .await
            .map_err(|e| RegistryError::Http(e.to_string()))?;
        if response.status() == reqwest::StatusCode::NOT_FOUND {
            return Err(RegistryError::UnknownId(id));
        }
        // Anything but 404 holds the record (transient): a registry answering 401 or 403
        // after a misconfiguration must not dead-letter every record it cannot serve.
        if !response.status().is_success() {
            return Err(RegistryError::Http(format!(
                "schema {id}: {}",
                response.status()
            )));
        }
        let answer: SchemaAnswer = response
            .json()
            .await
            .map_err(|e| RegistryError::Http(e.to_string()))?;
        let schema = Schema::parse_str(&answer.schema).map_err(|e| RegistryError::BadSchema {
            id,
            reason: e.to_string(),
        })?;
        let schema = Arc::new(schema);
        self.by_id.write().unwrap().insert(id, schema.clone());
        Ok(schema)
    }
}
