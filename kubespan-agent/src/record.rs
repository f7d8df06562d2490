//! Converting this agent's [`AffiliateRecord`] to and from the discovery wire format: the
//! plaintext `sidero.discovery.client.Affiliate` protobuf sealed into `data`, and each endpoint
//! sealed on its own (so the server can merge endpoints pushed by different nodes).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::Bytes;
use ipnet::IpNet;
use openspan_proto::discovery::client as pb;
use prost::Message;
use thiserror::Error;

use crate::crypto::{ClusterKeys, CryptoError};
use crate::model::{AffiliateRecord, KubeSpanInfo, LearnedKind};

#[derive(Debug, Error, PartialEq, Eq)]
pub enum RecordError {
    #[error(
        "cannot decrypt the record ({0}): is this node using the same clusterSecret and cipher?"
    )]
    Decrypt(CryptoError),
    #[error("the decrypted record is not a valid affiliate: {0}")]
    Decode(String),
    #[error(
        "the record names node {record:?} but is stored as affiliate {affiliate:?}: refusing a moved record"
    )]
    WrongNode { record: String, affiliate: String },
}

/// A record ready for `AffiliateUpdate`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SealedAffiliate {
    pub data: Bytes,
    pub endpoints: Vec<Bytes>,
}

pub fn ip_to_bytes(ip: IpAddr) -> Bytes {
    match ip {
        IpAddr::V4(v4) => Bytes::copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => Bytes::copy_from_slice(&v4.octets()),
            None => Bytes::copy_from_slice(&v6.octets()),
        },
    }
}

pub fn ip_from_bytes(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => Some(IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(bytes).ok()?))),
        16 => Some(IpAddr::V6(Ipv6Addr::from(
            <[u8; 16]>::try_from(bytes).ok()?,
        ))),
        _ => None,
    }
}

fn prefix_to_pb(net: &IpNet) -> pb::IpPrefix {
    pb::IpPrefix {
        ip: ip_to_bytes(net.addr()),
        bits: u32::from(net.prefix_len()),
    }
}

fn prefix_from_pb(prefix: &pb::IpPrefix) -> Option<IpNet> {
    IpNet::new(ip_from_bytes(&prefix.ip)?, u8::try_from(prefix.bits).ok()?).ok()
}

/// The plaintext protobuf of a record (endpoints travel separately).
pub fn encode(record: &AffiliateRecord) -> Vec<u8> {
    pb::Affiliate {
        node_id: record.node_id.clone(),
        addresses: record.addresses.iter().map(|ip| ip_to_bytes(*ip)).collect(),
        hostname: record.hostname.clone(),
        nodename: record.nodename.clone(),
        machine_type: record.machine_type.clone(),
        operating_system: record.operating_system.clone(),
        kubespan: record.kubespan.as_ref().map(|k| pb::KubeSpan {
            public_key: k.public_key.clone(),
            address: Bytes::copy_from_slice(&k.address.octets()),
            additional_addresses: k.additional_addresses.iter().map(prefix_to_pb).collect(),
            exclude_advertised_networks: k
                .exclude_advertised_networks
                .iter()
                .map(prefix_to_pb)
                .collect(),
            learned_endpoints: k
                .learned_endpoints
                .iter()
                .map(|(endpoint, kind)| pb::LearnedEndpoint {
                    ip: ip_to_bytes(endpoint.ip()),
                    port: u32::from(endpoint.port()),
                    kind: kind.as_str().to_owned(),
                })
                .collect(),
            relays: k.relays.clone(),
        }),
        control_plane: record.control_plane_port.map(|port| pb::ControlPlane {
            api_server_port: u32::from(port),
        }),
    }
    .encode_to_vec()
}

/// Parses a plaintext record. Malformed addresses and prefixes inside an otherwise valid record
/// are skipped rather than failing the whole record.
pub fn decode(bytes: &[u8]) -> Result<AffiliateRecord, RecordError> {
    let affiliate = pb::Affiliate::decode(bytes).map_err(|e| RecordError::Decode(e.to_string()))?;
    let kubespan = match affiliate.kubespan {
        None => None,
        Some(k) => {
            let address = match ip_from_bytes(&k.address) {
                Some(IpAddr::V6(v6)) => v6,
                _ => {
                    return Err(RecordError::Decode(
                        "the KubeSpan address is not an IPv6 address".into(),
                    ));
                }
            };
            Some(KubeSpanInfo {
                public_key: k.public_key,
                address,
                additional_addresses: k
                    .additional_addresses
                    .iter()
                    .filter_map(prefix_from_pb)
                    .collect(),
                exclude_advertised_networks: k
                    .exclude_advertised_networks
                    .iter()
                    .filter_map(prefix_from_pb)
                    .collect(),
                // Malformed or unknown entries are skipped (display only).
                learned_endpoints: k
                    .learned_endpoints
                    .iter()
                    .filter_map(|learned| {
                        let ip = ip_from_bytes(&learned.ip)?;
                        let port = u16::try_from(learned.port).ok().filter(|p| *p != 0)?;
                        let kind = LearnedKind::parse(&learned.kind)?;
                        Some((SocketAddr::new(ip, port), kind))
                    })
                    .take(64)
                    .collect(),
                relays: k
                    .relays
                    .into_iter()
                    .filter(|r| !r.is_empty() && r.len() <= 255)
                    .take(16)
                    .collect(),
                sealed_psk: None,
            })
        }
    };
    Ok(AffiliateRecord {
        node_id: affiliate.node_id,
        addresses: affiliate
            .addresses
            .iter()
            .filter_map(|b| ip_from_bytes(b))
            .collect(),
        hostname: affiliate.hostname,
        nodename: affiliate.nodename,
        machine_type: affiliate.machine_type,
        operating_system: affiliate.operating_system,
        kubespan,
        control_plane_port: affiliate
            .control_plane
            .and_then(|c| u16::try_from(c.api_server_port).ok())
            .filter(|p| *p != 0),
        endpoints: Vec::new(),
    })
}

pub fn seal(keys: &ClusterKeys, record: &AffiliateRecord) -> SealedAffiliate {
    SealedAffiliate {
        data: Bytes::from(keys.seal_record(&record.node_id, &encode(record))),
        endpoints: seal_endpoints(keys, &record.node_id, &record.endpoints),
    }
}

pub fn seal_endpoints(
    keys: &ClusterKeys,
    affiliate_id: &str,
    endpoints: &[SocketAddr],
) -> Vec<Bytes> {
    endpoints
        .iter()
        .map(|e| Bytes::from(keys.seal_endpoint(affiliate_id, *e)))
        .collect()
}

/// Opens a record from the discovery server. Endpoints that cannot be opened are dropped and
/// counted in the second value.
pub fn open(
    keys: &ClusterKeys,
    affiliate_id: &str,
    data: &[u8],
    endpoints: &[Bytes],
) -> Result<(AffiliateRecord, usize), RecordError> {
    let (plaintext, sealed_psk) = keys
        .open_record_with_psk(affiliate_id, data)
        .map_err(RecordError::Decrypt)?;
    let mut record = decode(&plaintext)?;
    if let Some(kubespan) = &mut record.kubespan {
        kubespan.sealed_psk = Some(sealed_psk);
    }
    if record.node_id != affiliate_id {
        return Err(RecordError::WrongNode {
            record: record.node_id,
            affiliate: affiliate_id.to_owned(),
        });
    }
    let mut rejected = 0;
    for blob in endpoints {
        match keys.open_endpoint(affiliate_id, blob) {
            Ok(endpoint) if !record.endpoints.contains(&endpoint) => {
                record.endpoints.push(endpoint)
            }
            Ok(_) => {}
            Err(_) => rejected += 1,
        }
    }
    Ok((record, rejected))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::Cipher;

    fn sample() -> AffiliateRecord {
        AffiliateRecord {
            node_id: "node-a".into(),
            addresses: vec!["10.0.0.1".parse().unwrap(), "2001:db8::1".parse().unwrap()],
            hostname: "a.example".into(),
            nodename: "a".into(),
            machine_type: "worker".into(),
            operating_system: "Debian (openspan v0.1.0)".into(),
            kubespan: Some(KubeSpanInfo {
                public_key: "Oak2fBEWngBhwslBxDVgnRNHXs88OAp4kjroSX0uqUE=".into(),
                address: "fd7f:175a:b97c:5602:2c1a:b6ff:fe53:8169".parse().unwrap(),
                additional_addresses: vec!["10.244.1.0/24".parse().unwrap()],
                exclude_advertised_networks: vec!["192.168.0.0/16".parse().unwrap()],
                learned_endpoints: Vec::new(),
                relays: Vec::new(),
                sealed_psk: None,
            }),
            control_plane_port: Some(6443),
            endpoints: vec![
                "10.0.0.1:51820".parse().unwrap(),
                "[2001:db8::1]:51820".parse().unwrap(),
            ],
        }
    }

    #[test]
    fn round_trips_through_both_suites() {
        for cipher in [Cipher::Native, Cipher::Talos] {
            let keys = ClusterKeys::new(cipher, "cluster", &[7; 32]);
            let sealed = seal(&keys, &sample());
            let (opened, rejected) =
                open(&keys, "node-a", &sealed.data, &sealed.endpoints).unwrap();
            let mut expected = sample();
            // Opening notes which secret the record was sealed with (its pre-shared key).
            expected.kubespan.as_mut().unwrap().sealed_psk = Some(keys.wireguard_psk());
            assert_eq!(opened, expected, "{cipher:?}");
            assert_eq!(rejected, 0);
        }
    }

    #[test]
    fn a_record_under_another_id_or_secret_is_refused() {
        let keys = ClusterKeys::new(Cipher::Talos, "cluster", &[7; 32]);
        let sealed = seal(&keys, &sample());
        // Talos records carry no binding to the id, so the node id inside is checked.
        let err = open(&keys, "node-b", &sealed.data, &[]).unwrap_err();
        assert!(matches!(err, RecordError::WrongNode { .. }), "{err}");
        let other = ClusterKeys::new(Cipher::Talos, "cluster", &[8; 32]);
        assert!(matches!(
            open(&other, "node-a", &sealed.data, &[]),
            Err(RecordError::Decrypt(_))
        ));
    }

    #[test]
    fn ipv4_mapped_addresses_travel_as_ipv4() {
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert_eq!(ip_to_bytes(mapped).len(), 4);
        assert_eq!(
            ip_from_bytes(&ip_to_bytes(mapped)),
            Some("10.1.2.3".parse().unwrap())
        );
        assert_eq!(ip_from_bytes(&[1, 2, 3]), None);
    }
}
