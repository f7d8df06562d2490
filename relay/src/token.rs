//! Relay access tokens. Every member of a cluster derives the same token from the cluster
//! secret it already has; the relay holds only `SHA-256(token)` (the verifier), so a relay (or
//! its configuration leaking) never reveals the cluster secret, nor a usable token.

use hkdf::Hkdf;
use sha2::{Digest, Sha256};

/// The HKDF `info` prefix; the cluster id follows it, so tokens differ per cluster even when
/// two clusters share a secret.
pub const TOKEN_INFO: &[u8] = b"openspan relay token v1";

/// `HKDF-SHA256(ikm = cluster secret, salt = none, info = "openspan relay token v1" || cluster id)`,
/// 32 bytes.
pub fn access_token(cluster_secret: &[u8; 32], cluster_id: &str) -> [u8; 32] {
    let hkdf = Hkdf::<Sha256>::new(None, cluster_secret);
    let mut token = [0u8; 32];
    // 32 bytes is far below HKDF-SHA256's 255 × 32 output limit, so expand cannot fail.
    if hkdf
        .expand_multi_info(&[TOKEN_INFO, cluster_id.as_bytes()], &mut token)
        .is_err()
    {
        unreachable!("HKDF-SHA256 always yields 32 bytes");
    }
    token
}

/// `SHA-256(token)`: what the relay is configured with for a cluster.
pub fn verifier(token: &[u8; 32]) -> [u8; 32] {
    Sha256::digest(token).into()
}

/// Compares in constant time (no early exit), so response timing does not leak how many
/// leading bytes of a guess were right.
pub fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let mut difference = 0u8;
    for (x, y) in a.iter().zip(b) {
        difference |= x ^ y;
    }
    std::hint::black_box(difference) == 0
}

/// Whether `token` matches `verifier`.
pub fn token_matches(token: &[u8; 32], verifier_: &[u8; 32]) -> bool {
    constant_time_eq(&verifier(token), verifier_)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_per_cluster_and_verifiable() {
        let secret = [42u8; 32];
        let a = access_token(&secret, "a");
        let b = access_token(&secret, "b");
        assert_ne!(a, b);
        assert_eq!(a, access_token(&secret, "a"));
        assert_ne!(a, access_token(&[43; 32], "a"));
        assert!(token_matches(&a, &verifier(&a)));
        assert!(!token_matches(&b, &verifier(&a)));
    }

    #[test]
    fn known_answer() {
        // Pinned so agents, kubespanctl and relays built apart keep agreeing.
        let token = access_token(&[0u8; 32], "cluster");
        let again = {
            let hkdf = Hkdf::<Sha256>::new(None, &[0u8; 32]);
            let mut t = [0u8; 32];
            hkdf.expand(b"openspan relay token v1cluster", &mut t)
                .unwrap();
            t
        };
        assert_eq!(token, again);
        assert_eq!(verifier(&token), <[u8; 32]>::from(Sha256::digest(token)));
    }
}
