//! TEMPORARY stub (replaced by the port mapper branch).
use std::net::SocketAddr;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
pub struct PortMapping {
    pub external: SocketAddr,
}
pub struct PortMapperConfig {
    pub listen_port: u16,
}
impl PortMapperConfig {
    pub fn new(listen_port: u16) -> Self {
        Self { listen_port }
    }
}
pub async fn run(
    _c: PortMapperConfig,
    _u: watch::Sender<Option<PortMapping>>,
    s: CancellationToken,
) {
    s.cancelled().await
}
