//! The Avro allocation cap (`codec::cap_allocation`), in a test binary of its own: apache-avro
//! keeps one process-wide cap, fixed by the first decode, so nothing may decode before it is set.

use hookline_schemas::codec::cap_allocation;
use hookline_schemas::{Codec, CodecError};

/// The committed v1 fixture with its first field's length (the event id, a string of 36 bytes)
/// replaced by `claimed`, as a zigzag varint.
fn claiming(claimed: u64) -> Vec<u8> {
    let good = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/build_event.v1.failed.bin"
    ))
    .unwrap();
    // Framing (5 bytes), then the length of the event id: 36, zigzag 72, one byte.
    assert_eq!(good[5], 72, "the fixture's event id length");
    let mut bytes = good[..5].to_vec();
    let mut zigzag = claimed << 1;
    loop {
        let byte = (zigzag & 0x7f) as u8;
        zigzag >>= 7;
        if zigzag == 0 {
            bytes.push(byte);
            break;
        }
        bytes.push(byte | 0x80);
    }
    bytes.extend(&good[6..]);
    bytes
}

#[tokio::test]
async fn a_field_claiming_more_than_the_event_limit_is_refused_before_it_is_allocated() {
    assert_eq!(
        cap_allocation(1_000_000),
        1_000_000,
        "set before any decode"
    );
    assert_eq!(cap_allocation(5), 1_000_000, "the first cap stays");
    let codec = Codec::embedded();

    let error = codec.decode(&claiming(400_000_000)).await.unwrap_err();
    assert!(
        matches!(
            error,
            CodecError::FieldTooLarge {
                claimed: 400_000_000,
                limit: 1_000_000
            }
        ),
        "{error:?}"
    );
    assert_eq!(error.kind(), "field_too_large");
    assert!(
        error.to_string().contains("over the 1000000-byte cap"),
        "{error}"
    );

    // Under the cap but past the datum's end: corrupt, as before.
    let error = codec.decode(&claiming(900_000)).await.unwrap_err();
    assert_eq!(error.kind(), "corrupt_datum", "{error}");
}
