//! Property tests of the decoder on hostile input: arbitrary bytes, and valid records with
//! bytes flipped, inserted, removed or cut off, never panic and always give an event or a
//! decode reason. A bounded number of cases, so they run in the normal test command.

use hookline_schemas::{Codec, CodecError};
use proptest::prelude::*;

/// Cases per property (each decode takes microseconds).
const CASES: u32 = 1000;

const FIXTURES: [&[u8]; 3] = [
    include_bytes!("fixtures/build_event.v1.failed.bin"),
    include_bytes!("fixtures/build_event.v2.deferred.bin"),
    include_bytes!("fixtures/build_event.v2.inline.bin"),
];

fn decode(bytes: &[u8]) -> Result<(), CodecError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime
        .block_on(Codec::embedded().decode(bytes))
        .map(|decoded| assert!(decoded.writer_schema_id > 0))
}

/// An event, or a reason a person can read.
fn event_or_reason(bytes: &[u8]) -> Result<(), TestCaseError> {
    if let Err(reason) = decode(bytes) {
        prop_assert!(!reason.to_string().is_empty(), "a reason without words");
    }
    Ok(())
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Insert(usize, u8),
    Remove(usize),
    Truncate(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1..=255u8).prop_map(|(at, bits)| Mutation::Flip(at, bits)),
        (any::<usize>(), any::<u8>()).prop_map(|(at, b)| Mutation::Insert(at, b)),
        any::<usize>().prop_map(Mutation::Remove),
        any::<usize>().prop_map(Mutation::Truncate),
    ]
}

fn apply(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        let len = bytes.len().max(1);
        match *m {
            Mutation::Flip(at, bits) if !bytes.is_empty() => bytes[at % len] ^= bits,
            Mutation::Insert(at, b) => bytes.insert(at % (bytes.len() + 1), b),
            Mutation::Remove(at) if !bytes.is_empty() => {
                bytes.remove(at % len);
            }
            Mutation::Truncate(at) => bytes.truncate(at % len),
            _ => {}
        }
    }
    bytes
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: CASES,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn arbitrary_bytes_give_an_event_or_a_reason(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        event_or_reason(&bytes)?;
    }

    /// Past the frame check: a known schema id followed by garbage reaches the Avro decoder.
    #[test]
    fn garbage_behind_a_valid_frame_gives_an_event_or_a_reason(
        id in 1u32..=2,
        body in proptest::collection::vec(any::<u8>(), 0..600),
    ) {
        let mut bytes = vec![0u8];
        bytes.extend_from_slice(&id.to_be_bytes());
        bytes.extend_from_slice(&body);
        event_or_reason(&bytes)?;
    }

    #[test]
    fn mutated_records_give_an_event_or_a_reason(
        fixture in 0..FIXTURES.len(),
        mutations in proptest::collection::vec(mutation(), 1..6),
    ) {
        let bytes = apply(FIXTURES[fixture].to_vec(), &mutations);
        event_or_reason(&bytes)?;
    }
}

/// The fixtures themselves decode: the mutations start from valid records.
#[test]
fn the_fixtures_decode() {
    for bytes in FIXTURES {
        decode(bytes).unwrap();
    }
}
