//! The wire contract, pinned by bytes committed in `tests/fixtures/` (written once by
//! `write_fixtures`, which refuses to overwrite) and by a compatibility check of every schema pair.

use std::path::Path;

use apache_avro::schema_compatibility::SchemaCompatibility;
use chrono::{TimeZone, Utc};
use hookline_schemas::{
    BuildEvent, BuildStatus, Codec, CodecError, PayloadTiming, SchemaVersion, TransitionFacts,
};
use uuid::Uuid;

fn fixture_path(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn failed_event() -> BuildEvent {
    BuildEvent {
        event_id: Uuid::parse_str("0b6f1c1e-6a59-4c2a-9f0e-3a1d2c4b5e6f").unwrap(),
        build_id: 70_001,
        project_id: 10,
        pipeline_id: 5000,
        status: BuildStatus::Failed,
        occurred_at: Utc.with_ymd_and_hms(2026, 11, 27, 20, 19, 5).unwrap()
            + chrono::Duration::microseconds(123_456),
        facts: TransitionFacts {
            started_at: Some(Utc.with_ymd_and_hms(2026, 11, 27, 20, 19, 3).unwrap()),
            finished_at: Some(Utc.with_ymd_and_hms(2026, 11, 27, 20, 19, 5).unwrap()),
            duration: Some(2.123456),
            queued_duration: Some(0.3),
            failure_reason: Some("script_failure".into()),
        },
        payload: None,
        payload_timing: PayloadTiming::Deferred,
    }
}

fn inline_event() -> BuildEvent {
    BuildEvent {
        status: BuildStatus::Running,
        facts: TransitionFacts {
            started_at: Some(Utc.with_ymd_and_hms(2026, 11, 27, 20, 19, 3).unwrap()),
            queued_duration: Some(0.3),
            ..TransitionFacts::default()
        },
        payload: Some(
            br#"{"object_kind":"build","build_id":70001,"build_status":"running"}"#.to_vec(),
        ),
        payload_timing: PayloadTiming::Inline,
        ..failed_event()
    }
}

/// A committed fixture file, the version that wrote it, and the event it holds.
type Fixture = (&'static str, SchemaVersion, fn() -> BuildEvent);

const FIXTURES: [Fixture; 3] = [
    ("build_event.v1.failed.bin", SchemaVersion::V1, failed_event),
    ("build_event.v2.inline.bin", SchemaVersion::V2, inline_event),
    (
        "build_event.v2.deferred.bin",
        SchemaVersion::V2,
        failed_event,
    ),
];

/// Writes fixture files that do not exist yet. Run once when a schema version is added:
/// `cargo test -p hookline-schemas --test wire -- --ignored write_fixtures`.
#[test]
#[ignore]
fn write_fixtures() {
    for (name, version, event) in FIXTURES {
        let path = fixture_path(name);
        if path.exists() {
            continue;
        }
        let bytes = Codec::embedded_writing(version).encode(&event()).unwrap();
        std::fs::write(&path, bytes).unwrap();
    }
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(fixture_path(name)).unwrap_or_else(|e| panic!("fixture {name}: {e}"))
}

#[tokio::test]
async fn v1_bytes_decode_under_the_v2_reader_with_no_payload() {
    let decoded = Codec::embedded()
        .decode(&fixture("build_event.v1.failed.bin"))
        .await
        .unwrap();
    assert_eq!(decoded.writer_schema_id, 1);
    assert_eq!(decoded.event, failed_event());
    assert_eq!(decoded.event.payload, None);
    assert_eq!(decoded.event.payload_timing, PayloadTiming::Deferred);
}

#[tokio::test]
async fn v2_bytes_decode_under_the_v2_reader() {
    let codec = Codec::embedded();
    let inline = codec
        .decode(&fixture("build_event.v2.inline.bin"))
        .await
        .unwrap();
    assert_eq!(inline.writer_schema_id, 2);
    assert_eq!(inline.event, inline_event());
    let deferred = codec
        .decode(&fixture("build_event.v2.deferred.bin"))
        .await
        .unwrap();
    assert_eq!(deferred.event, failed_event());
}

#[tokio::test]
async fn v2_bytes_decode_under_the_v1_reader_ignoring_the_payload() {
    let codec = Codec::embedded();
    let old = codec
        .decode_as(&fixture("build_event.v2.inline.bin"), SchemaVersion::V1)
        .await
        .unwrap();
    let expected = BuildEvent {
        payload: None,
        payload_timing: PayloadTiming::Deferred,
        ..inline_event()
    };
    assert_eq!(old.event, expected);
}

#[tokio::test]
async fn current_encoder_still_writes_the_committed_bytes() {
    for (name, version, event) in FIXTURES {
        let bytes = Codec::embedded_writing(version).encode(&event()).unwrap();
        assert_eq!(
            bytes,
            fixture(name),
            "{name}: the encoding of a published version changed"
        );
    }
}

#[test]
fn every_schema_pair_is_compatible_both_ways() {
    for writer in SchemaVersion::ALL {
        for reader in SchemaVersion::ALL {
            SchemaCompatibility::can_read(&writer.schema(), &reader.schema()).unwrap_or_else(|e| {
                panic!(
                    "v{} data cannot be read with v{}: {e}",
                    writer.number(),
                    reader.number()
                )
            });
        }
    }
}

#[test]
fn every_committed_avsc_file_is_a_known_version() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("avro");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".avsc"))
        .collect();
    files.sort();
    let known: Vec<_> = SchemaVersion::ALL
        .iter()
        .map(|v| format!("build_event.v{}.avsc", v.number()))
        .collect();
    assert_eq!(
        files, known,
        "every .avsc must be a SchemaVersion so the pair check covers it"
    );
}

#[tokio::test]
async fn v1_writer_drops_the_payload() {
    let bytes = Codec::embedded_writing(SchemaVersion::V1)
        .encode(&inline_event())
        .unwrap();
    let decoded = Codec::embedded().decode(&bytes).await.unwrap();
    assert_eq!(decoded.event.payload, None);
    assert_eq!(decoded.event.payload_timing, PayloadTiming::Deferred);
}

#[tokio::test]
async fn bad_input_is_a_typed_error() {
    let codec = Codec::embedded();
    let good = fixture("build_event.v2.inline.bin");

    assert!(matches!(
        codec.decode(&[]).await,
        Err(CodecError::TooShort(0))
    ));
    assert!(matches!(
        codec.decode(&[0, 0, 0]).await,
        Err(CodecError::TooShort(3))
    ));

    let mut bad_magic = good.clone();
    bad_magic[0] = 7;
    assert!(matches!(
        codec.decode(&bad_magic).await,
        Err(CodecError::BadMagic(7))
    ));

    let mut unknown_id = good.clone();
    unknown_id[1..5].copy_from_slice(&999u32.to_be_bytes());
    let err = codec.decode(&unknown_id).await.unwrap_err();
    assert!(matches!(err, CodecError::UnknownSchemaId(999)), "{err}");
    assert!(!err.is_transient());

    // Every truncation of a valid record is refused, none panics.
    for len in 5..good.len() {
        let err = codec.decode(&good[..len]).await.unwrap_err();
        assert!(
            matches!(err, CodecError::Corrupt(_) | CodecError::Shape(_)),
            "len {len}: {err}"
        );
    }

    let mut trailing = good.clone();
    trailing.push(0);
    assert!(matches!(
        codec.decode(&trailing).await,
        Err(CodecError::Corrupt(_))
    ));

    // A corrupt enum index.
    let mut corrupt = fixture("build_event.v1.failed.bin");
    let status_at = 5 + 1 + 36 + 3 + 2 + 2; // uuid string (len byte + 36) then three varint longs
    corrupt[status_at] = 0x7e;
    assert!(
        matches!(codec.decode(&corrupt).await, Err(CodecError::Corrupt(_))),
        "an enum index past the symbols is a corrupt datum"
    );
}
