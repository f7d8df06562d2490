//! A `WatchResponse` that is already encoded.
//!
//! The discovery server sends every change to every watcher of a cluster. Encoding the message
//! once and handing each stream a reference-counted copy of the bytes keeps fan-out cost flat in
//! the number of watchers. This type writes those bytes verbatim when tonic encodes it.

use bytes::{BufMut, Bytes};
use prost::{
    DecodeError, Message,
    encoding::{DecodeContext, WireType, skip_field},
};

use crate::discovery::server::WatchResponse;

/// The protobuf encoding of one `sidero.discovery.server.WatchResponse`.
#[derive(Clone, Default, PartialEq)]
pub struct EncodedWatchResponse(Bytes);

impl EncodedWatchResponse {
    /// Encodes `response` once; clones of the result share its bytes.
    pub fn encode_from(response: &WatchResponse) -> Self {
        Self(Bytes::from(response.encode_to_vec()))
    }

    /// The encoded message.
    pub fn as_bytes(&self) -> &Bytes {
        &self.0
    }
}

impl std::fmt::Debug for EncodedWatchResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EncodedWatchResponse({} bytes)", self.0.len())
    }
}

impl Message for EncodedWatchResponse {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        buf.put_slice(&self.0);
    }

    // The server never decodes its own responses; a decoder reading this type skips every field.
    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl bytes::Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        self.0.len()
    }

    fn clear(&mut self) {
        self.0 = Bytes::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::server::Affiliate;

    #[test]
    fn encoded_bytes_decode_as_the_original_message() {
        let original = WatchResponse {
            affiliates: vec![Affiliate {
                id: "node-a".into(),
                data: Bytes::from_static(b"sealed"),
                endpoints: vec![Bytes::from_static(&[1; 16])],
            }],
            deleted: false,
        };
        let shared = EncodedWatchResponse::encode_from(&original);
        let wire = shared.encode_to_vec();
        assert_eq!(wire.len(), shared.encoded_len());
        assert_eq!(WatchResponse::decode(wire.as_slice()).unwrap(), original);
    }
}
