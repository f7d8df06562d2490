//! Which clusters may use the relay, with each cluster's token verifier: from `--cluster`
//! flags and an optional `--clusters-file` that is re-read when it changes or on SIGHUP.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::token::token_matches;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ClustersError {
    #[error("{origin}: expected `<cluster-id> <verifier-hex>`, got {got:?}")]
    Syntax { origin: String, got: String },
    #[error(
        "{origin}: the verifier of cluster {cluster:?} is not 64 hex digits (SHA-256 of the token)"
    )]
    Verifier { origin: String, cluster: String },
    #[error("{origin}: cluster id {cluster:?} is empty or longer than 255 bytes")]
    ClusterId { origin: String, cluster: String },
    #[error("{origin}: cluster {cluster:?} is listed twice with different verifiers")]
    Conflict { origin: String, cluster: String },
    #[error("cannot read the clusters file {path}: {message}")]
    Read { path: PathBuf, message: String },
}

/// Cluster id → verifier (`SHA-256(access token)`).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Clusters {
    verifiers: HashMap<String, [u8; 32]>,
}

impl Clusters {
    /// Parses one `--cluster` value: `<cluster-id>=<verifier-hex>`.
    pub fn parse_flag(value: &str) -> Result<(String, [u8; 32]), ClustersError> {
        let origin = "--cluster".to_owned();
        let (id, hex_) = value
            .rsplit_once('=')
            .ok_or_else(|| ClustersError::Syntax {
                origin: origin.clone(),
                got: value.to_owned(),
            })?;
        entry(&origin, id.trim(), hex_.trim())
    }

    /// Parses a clusters file: one `<cluster-id> <verifier-hex>` per line; blank lines and
    /// lines starting with `#` are ignored.
    pub fn parse_file(text: &str, origin: &str) -> Result<Self, ClustersError> {
        let mut clusters = Self::default();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let origin = format!("{origin}:{}", n + 1);
            let mut fields = line.split_whitespace();
            let (Some(id), Some(hex_), None) = (fields.next(), fields.next(), fields.next()) else {
                return Err(ClustersError::Syntax {
                    origin,
                    got: line.chars().take(120).collect(),
                });
            };
            let (id, verifier) = entry(&origin, id, hex_)?;
            clusters.insert(&origin, id, verifier)?;
        }
        Ok(clusters)
    }

    pub fn load_file(path: &Path) -> Result<Self, ClustersError> {
        let text = std::fs::read_to_string(path).map_err(|e| ClustersError::Read {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        Self::parse_file(&text, &path.display().to_string())
    }

    /// Adds a cluster; the same cluster twice must name the same verifier.
    pub fn insert(
        &mut self,
        origin: &str,
        id: String,
        verifier: [u8; 32],
    ) -> Result<(), ClustersError> {
        match self.verifiers.get(&id) {
            Some(existing) if *existing != verifier => Err(ClustersError::Conflict {
                origin: origin.to_owned(),
                cluster: id,
            }),
            _ => {
                self.verifiers.insert(id, verifier);
                Ok(())
            }
        }
    }

    /// Both sets together (flags and file).
    pub fn merged(&self, other: &Self) -> Result<Self, ClustersError> {
        let mut merged = self.clone();
        for (id, verifier) in &other.verifiers {
            merged.insert("--clusters-file", id.clone(), *verifier)?;
        }
        Ok(merged)
    }

    /// The verifier `token` authenticated against, if `token` is right for `cluster`. An unknown
    /// cluster costs the same hash and comparison as a known one.
    pub fn authenticate(&self, cluster: &str, token: &[u8; 32]) -> Option<[u8; 32]> {
        const NOBODY: [u8; 32] = [0; 32];
        let verifier = self.verifiers.get(cluster);
        let matches = token_matches(token, verifier.unwrap_or(&NOBODY));
        verifier.filter(|_| matches).copied()
    }

    /// Whether `cluster` still accepts tokens checked against `verifier`.
    pub fn accepts(&self, cluster: &str, verifier: &[u8; 32]) -> bool {
        self.verifiers.get(cluster) == Some(verifier)
    }

    pub fn len(&self) -> usize {
        self.verifiers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.verifiers.is_empty()
    }
}

fn entry(origin: &str, id: &str, hex_: &str) -> Result<(String, [u8; 32]), ClustersError> {
    if id.is_empty() || id.len() > crate::protocol::MAX_CLUSTER_ID_LEN {
        return Err(ClustersError::ClusterId {
            origin: origin.to_owned(),
            cluster: id.chars().take(64).collect(),
        });
    }
    let mut verifier = [0u8; 32];
    hex::decode_to_slice(hex_, &mut verifier).map_err(|_| ClustersError::Verifier {
        origin: origin.to_owned(),
        cluster: id.to_owned(),
    })?;
    Ok((id.to_owned(), verifier))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::{access_token, verifier};

    #[test]
    fn file_and_flags_parse_and_authenticate() {
        let token = access_token(&[1; 32], "prod");
        let text = format!(
            "# relay clusters\n\nprod {}\nstaging {}\n",
            hex::encode(verifier(&token)),
            "00".repeat(32)
        );
        let clusters = Clusters::parse_file(&text, "clusters.txt").unwrap();
        assert_eq!(clusters.len(), 2);
        assert_eq!(
            clusters.authenticate("prod", &token),
            Some(verifier(&token))
        );
        assert_eq!(clusters.authenticate("staging", &token), None);
        assert_eq!(clusters.authenticate("nope", &token), None);
        assert!(clusters.accepts("prod", &verifier(&token)));

        let (id, v) =
            Clusters::parse_flag(&format!("a=b={}", hex::encode(verifier(&token)))).unwrap();
        assert_eq!((id.as_str(), v), ("a=b", verifier(&token)));
    }

    #[test]
    fn bad_lines_are_reported_with_their_place() {
        let err = Clusters::parse_file("ok 00\n", "f").unwrap_err();
        assert!(matches!(err, ClustersError::Verifier { ref origin, .. } if origin == "f:1"));
        let err = Clusters::parse_file("\none two three\n", "f").unwrap_err();
        assert!(err.to_string().starts_with("f:2:"), "{err}");
        let conflict = format!("a {}\na {}\n", "00".repeat(32), "11".repeat(32));
        assert!(matches!(
            Clusters::parse_file(&conflict, "f"),
            Err(ClustersError::Conflict { .. })
        ));
        assert!(Clusters::parse_flag("no-equals").is_err());
        assert!(Clusters::parse_flag(&format!("={}", "00".repeat(32))).is_err());
    }
}
