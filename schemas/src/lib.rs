//! Wire contracts of hookline: what travels between the producer, Kafka and the consumer, and the
//! JSON body that receivers get.
//!
//! # Layout
//!
//! ```text
//! BuildEvent (event.rs) --avro.rs, encode--> Confluent frame 0x00|id|avro (codec.rs) --decode--> BuildEvent
//!                                        ^ schema ids from a registry (registry.rs)
//! JobHook (job_hook.rs): the GitLab-compatible Job Hook body, field for field
//! ```
//!
//! - [`event`]: `BuildEvent`, its status and payload timing: plain data, and the schema versions
//!   (`avro/*.avsc`; every version is kept, none is edited once published).
//! - `avro`: the Avro form of a `BuildEvent` under every schema version.
//! - [`registry`]: where schema ids come from: an embedded registry with ids fixed in
//!   `avro/manifest.json` (the default) or a Confluent-compatible HTTP registry.
//! - [`codec`]: Confluent wire framing; decoding reads with the writer's schema and resolves to
//!   the reader's version, so old and new producers and consumers mix.
//! - [`job_hook`]: the Job Hook JSON types.

mod avro;
pub mod codec;
pub mod event;
pub mod job_hook;
pub mod registry;

pub use codec::{Codec, CodecError, DecodedEvent};
pub use event::{BuildEvent, BuildStatus, PayloadTiming, SchemaVersion, TransitionFacts};
pub use job_hook::JobHook;
pub use registry::{EmbeddedRegistry, HttpRegistry, RegistryError, SchemaRegistry};
