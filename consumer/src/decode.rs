//! Record bytes to `BuildEvent`. A record that can never be read is not an error of the
//! consumer: it becomes [`Undecodable`] and goes to the dead-letter topic with its bytes.

use hookline_schemas::{BuildEvent, Codec, CodecError};

/// Why a record cannot be read, for the dead-letter reason headers.
#[derive(Debug, Clone, PartialEq)]
pub struct Undecodable {
    /// Short stable name (`bad_magic`, `unknown_schema_id`, `corrupt_datum`, `empty`, ...).
    pub reason: &'static str,
    pub detail: String,
}

/// The result of decoding one record.
#[derive(Debug)]
pub enum Decoded {
    Event(Box<BuildEvent>),
    Undecodable(Undecodable),
    /// The schema registry could not be reached: try the same bytes again later.
    Transient(CodecError),
}

/// Decodes a record's value.
pub async fn record(codec: &Codec, value: Option<&[u8]>) -> Decoded {
    let Some(bytes) = value.filter(|b| !b.is_empty()) else {
        return Decoded::Undecodable(Undecodable {
            reason: "empty",
            detail: "record has no value".into(),
        });
    };
    match codec.decode(bytes).await {
        Ok(decoded) => Decoded::Event(Box::new(decoded.event)),
        Err(e) if e.is_transient() => Decoded::Transient(e),
        Err(e) => Decoded::Undecodable(Undecodable {
            reason: e.kind(),
            detail: e.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bad_bytes_are_named_not_raised() {
        let codec = Codec::embedded();
        for (bytes, reason) in [
            (&b""[..], "empty"),
            (&b"\x01\x00\x00\x00\x01xyz"[..], "bad_magic"),
            (&b"\x00\xff\xff\xff\xfexyz"[..], "unknown_schema_id"),
            (&b"\x00\x00"[..], "too_short"),
        ] {
            match record(&codec, Some(bytes)).await {
                Decoded::Undecodable(u) => assert_eq!(u.reason, reason, "{bytes:?}"),
                other => panic!("{bytes:?}: {other:?}"),
            }
        }
    }

    /// Each reason by its name, from bytes a v1 producer wrote (committed fixture): a datum that
    /// does not read is `corrupt_datum`, one that reads but is no `BuildEvent` is `bad_shape`.
    #[tokio::test]
    async fn datums_that_do_not_read_or_do_not_fit_are_named_apart() {
        let good = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../schemas/tests/fixtures/build_event.v1.failed.bin"
        ))
        .unwrap();
        let codec = Codec::embedded();
        let reason = |bytes: Vec<u8>| {
            let codec = codec.clone();
            async move {
                match record(&codec, Some(&bytes)).await {
                    Decoded::Undecodable(u) => u.reason,
                    other => panic!("{other:?}"),
                }
            }
        };
        let mut trailing = good.clone();
        trailing.push(0);
        assert_eq!(reason(trailing).await, "corrupt_datum");
        let mut cut = good.clone();
        cut.truncate(good.len() - 1);
        assert_eq!(reason(cut).await, "corrupt_datum");
        // Well-formed Avro that is no BuildEvent: an `occurred_at` no calendar holds. After the
        // framing (5 bytes) and the event id (a length byte and 36 characters) come three ids
        // (varints) and the status (one byte), then `occurred_at`, a varint long: replaced by
        // i64::MAX microseconds (zigzag varint: 0xfe, eight 0xff, 0x01).
        let varint_end =
            |from: usize| from + good[from..].iter().position(|b| b & 0x80 == 0).unwrap() + 1;
        let mut at = 5 + 1 + 36;
        for _ in 0..3 {
            at = varint_end(at);
        }
        at += 1;
        let end = varint_end(at);
        let mut out_of_range = good[..at].to_vec();
        out_of_range.push(0xfe);
        out_of_range.extend([0xff; 8]);
        out_of_range.push(0x01);
        out_of_range.extend(&good[end..]);
        assert_eq!(reason(out_of_range).await, "bad_shape");
    }
}
