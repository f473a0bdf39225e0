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
}
