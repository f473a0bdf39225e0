//! Standard Webhooks signatures: `webhook-signature: v1,<base64 HMAC-SHA256>` over
//! `{webhook-id}.{webhook-timestamp}.{body}`, keyed by the bytes of a `whsec_<base64>` secret.
//!
//! [`sign`] is what the consumer sends; [`verify`] is for receivers (tests, the demo): constant-time
//! comparison, a 5-minute timestamp tolerance, and several signatures in one header so a receiver
//! keeps working while a secret is rotated.

use std::fmt;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The prefix of a Standard Webhooks secret.
pub const SECRET_PREFIX: &str = "whsec_";

/// How far a `webhook-timestamp` may be from the receiver's clock, either way.
pub const TOLERANCE: Duration = Duration::from_secs(5 * 60);

/// Why a secret or a signature was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignError {
    /// The hook's secret is not `whsec_` followed by non-empty base64 (never includes the secret).
    #[error("malformed signing secret: {0}")]
    MalformedSecret(&'static str),
    #[error("webhook-timestamp is not a unix time in seconds")]
    BadTimestamp,
    #[error("webhook-timestamp is more than 5 minutes away from now")]
    TimestampOutOfTolerance,
    #[error("no v1 signature in webhook-signature matches")]
    NoMatchingSignature,
}

/// The decoded key of a `whsec_` secret. `Debug` never shows it.
#[derive(Clone)]
pub struct SigningSecret(Vec<u8>);

impl fmt::Debug for SigningSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SigningSecret(<redacted>)")
    }
}

impl SigningSecret {
    /// Parses `whsec_<base64>`; the key is the base64-decoded part after the prefix.
    pub fn parse(secret: &str) -> Result<SigningSecret, SignError> {
        let encoded = secret
            .strip_prefix(SECRET_PREFIX)
            .ok_or(SignError::MalformedSecret("does not start with whsec_"))?;
        let key = BASE64
            .decode(encoded)
            .map_err(|_| SignError::MalformedSecret("the part after whsec_ is not base64"))?;
        if key.is_empty() {
            return Err(SignError::MalformedSecret("the key is empty"));
        }
        Ok(SigningSecret(key))
    }

    /// The key's length in bytes.
    pub fn key_len(&self) -> usize {
        self.0.len()
    }

    fn mac(&self, msg_id: &str, timestamp: i64, body: &[u8]) -> HmacSha256 {
        // HMAC takes keys of any length, so `new_from_slice` cannot fail here.
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC accepts any key length");
        mac.update(msg_id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        mac
    }
}

/// The `webhook-signature` value for one message: `v1,<base64>`.
pub fn sign(secret: &SigningSecret, msg_id: &str, timestamp: i64, body: &[u8]) -> String {
    let tag = secret.mac(msg_id, timestamp, body).finalize().into_bytes();
    format!("v1,{}", BASE64.encode(tag))
}

/// Checks a delivery as a receiver would: the timestamp within [`TOLERANCE`] of `now` (unix
/// seconds), and at least one `v1` signature of the space-separated list matching, compared in
/// constant time.
pub fn verify(
    secret: &SigningSecret,
    msg_id: &str,
    timestamp_header: &str,
    signature_header: &str,
    body: &[u8],
    now: i64,
) -> Result<(), SignError> {
    let timestamp: i64 = timestamp_header
        .trim()
        .parse()
        .map_err(|_| SignError::BadTimestamp)?;
    if timestamp.abs_diff(now) > TOLERANCE.as_secs() {
        return Err(SignError::TimestampOutOfTolerance);
    }
    let mac = secret.mac(msg_id, timestamp, body);
    let matches = signature_header
        .split_whitespace()
        .filter_map(|sig| sig.strip_prefix("v1,"))
        .filter_map(|b64| BASE64.decode(b64).ok())
        .any(|tag| mac.clone().verify_slice(&tag).is_ok());
    if matches {
        Ok(())
    } else {
        Err(SignError::NoMatchingSignature)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The Standard Webhooks reference vector.
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const MSG_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const TIMESTAMP: i64 = 1614265330;
    const BODY: &[u8] = br#"{"test": 2432232314}"#;
    const EXPECTED: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    fn secret() -> SigningSecret {
        SigningSecret::parse(SECRET).unwrap()
    }

    #[test]
    fn signs_the_reference_vector() {
        assert_eq!(sign(&secret(), MSG_ID, TIMESTAMP, BODY), EXPECTED);
    }

    #[test]
    fn verifies_the_reference_vector() {
        let ts = TIMESTAMP.to_string();
        assert_eq!(
            verify(&secret(), MSG_ID, &ts, EXPECTED, BODY, TIMESTAMP),
            Ok(())
        );
    }

    #[test]
    fn verify_accepts_any_of_several_signatures() {
        let ts = TIMESTAMP.to_string();
        let header =
            format!("v1,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA= v2,whatever {EXPECTED}");
        assert_eq!(
            verify(&secret(), MSG_ID, &ts, &header, BODY, TIMESTAMP),
            Ok(())
        );
    }

    #[test]
    fn verify_rejects_tampering() {
        let ts = TIMESTAMP.to_string();
        let no = Err(SignError::NoMatchingSignature);
        assert_eq!(
            verify(
                &secret(),
                MSG_ID,
                &ts,
                EXPECTED,
                b"{\"test\": 1}",
                TIMESTAMP
            ),
            no
        );
        assert_eq!(
            verify(&secret(), "msg_other", &ts, EXPECTED, BODY, TIMESTAMP),
            no
        );
        let other = SigningSecret::parse("whsec_c2VjcmV0").unwrap();
        assert_eq!(verify(&other, MSG_ID, &ts, EXPECTED, BODY, TIMESTAMP), no);
        assert_eq!(
            verify(&secret(), MSG_ID, &ts, "v1,not-base64!", BODY, TIMESTAMP),
            no
        );
        assert_eq!(verify(&secret(), MSG_ID, &ts, "", BODY, TIMESTAMP), no);
        // The signature covers the timestamp: moving it by one second breaks it.
        let moved = (TIMESTAMP + 1).to_string();
        assert_eq!(
            verify(&secret(), MSG_ID, &moved, EXPECTED, BODY, TIMESTAMP),
            no
        );
    }

    #[test]
    fn verify_enforces_five_minutes_of_tolerance() {
        let ts = TIMESTAMP.to_string();
        let ok = |now| verify(&secret(), MSG_ID, &ts, EXPECTED, BODY, now);
        assert_eq!(ok(TIMESTAMP + 300), Ok(()));
        assert_eq!(ok(TIMESTAMP - 300), Ok(()));
        assert_eq!(ok(TIMESTAMP + 301), Err(SignError::TimestampOutOfTolerance));
        assert_eq!(ok(TIMESTAMP - 301), Err(SignError::TimestampOutOfTolerance));
        assert_eq!(
            verify(&secret(), MSG_ID, "yesterday", EXPECTED, BODY, TIMESTAMP),
            Err(SignError::BadTimestamp)
        );
    }

    #[test]
    fn malformed_secrets_are_refused_without_echoing_them() {
        for bad in [
            "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "whsec_",
            "whsec_!!!notbase64",
            "sk_live_x",
        ] {
            let err = SigningSecret::parse(bad).unwrap_err();
            assert!(matches!(err, SignError::MalformedSecret(_)), "{bad}");
            let shown = err.to_string();
            assert!(
                !shown.contains(bad.trim_start_matches("whsec_")) || bad == "whsec_",
                "{shown}"
            );
        }
        assert_eq!(format!("{:?}", secret()), "SigningSecret(<redacted>)");
    }
}
