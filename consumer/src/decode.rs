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
        // Framing (5 bytes), then the event id: a length byte and 36 characters. A letter that
        // is not hex keeps the string well-formed Avro but makes it no UUID.
        let mut not_a_uuid = good.clone();
        not_a_uuid[6] = b'z';
        assert_eq!(reason(not_a_uuid).await, "bad_shape");
    }
}
