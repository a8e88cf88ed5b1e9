//! Standard Webhooks 1.0 signatures: `webhook-signature: v1,<base64(HMAC-SHA256(key,
//! "{id}.{timestamp}.{body}"))>`, one per secret in force, space-separated, so a receiver that
//! knows either the old or the new secret accepts the message while a secret is rotated.

pub use crate::config::events::Secret;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

fn sign(secret: &Secret, content: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(&secret.0).expect("HMAC takes keys of any length");
    mac.update(content);
    format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes()))
}

/// The `webhook-signature` header value for `body` sent as message `id` at `timestamp` (unix
/// seconds), signed with every secret in `secrets`.
pub fn signature(secrets: &[Secret], id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut content = Vec::with_capacity(id.len() + body.len() + 24);
    content.extend_from_slice(id.as_bytes());
    content.push(b'.');
    content.extend_from_slice(timestamp.to_string().as_bytes());
    content.push(b'.');
    content.extend_from_slice(body);
    secrets.iter().map(|s| sign(s, &content)).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test vector of the Standard Webhooks reference libraries.
    #[test]
    fn signs_the_reference_vector() {
        let secret = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let sig =
            signature(&[secret], "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, br#"{"test": 2432232314}"#);
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn two_secrets_sign_twice_for_rotation() {
        let old = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let new =
            Secret::parse(&format!("whsec_{}", base64::engine::general_purpose::STANDARD.encode([7u8; 32])))
                .unwrap();
        let both = signature(&[old.clone(), new.clone()], "msg_1", 1, b"{}");
        let parts: Vec<&str> = both.split(' ').collect();
        assert_eq!(parts, [signature(&[old], "msg_1", 1, b"{}"), signature(&[new], "msg_1", 1, b"{}")]);
    }

    #[test]
    fn malformed_secrets_are_refused_with_what_is_wrong() {
        assert!(Secret::parse("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap_err().contains("whsec_"));
        assert!(Secret::parse("whsec_not base64!").unwrap_err().contains("base64"));
        assert!(Secret::parse("whsec_c2hvcnQ=").unwrap_err().contains("24 to 64"));
        assert!(Secret::parse("whsec_🦀").is_err());
    }
}
