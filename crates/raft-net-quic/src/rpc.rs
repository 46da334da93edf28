//! Application requests to peers ([`raft_core::PeerRpc`]) on the cluster's
//! authenticated connections: one bidirectional stream per request.

use crate::wire;
use async_trait::async_trait;
use raft_core::{NodeId, PeerRpc, RpcError};

/// Sends application requests to peers over the cluster's authenticated
/// connections. Cheap to clone; usable after the transport moved into a node.
#[derive(Clone)]
pub(crate) struct RpcClient {
    pub(crate) links: crate::Links,
    pub(crate) max_frame: usize,
}

impl std::fmt::Debug for RpcClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcClient").finish_non_exhaustive()
    }
}

#[async_trait]
impl PeerRpc for RpcClient {
    async fn call(&self, to: NodeId, request: Vec<u8>) -> Result<Vec<u8>, RpcError> {
        let link = self
            .links
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&to)
            .cloned()
            .ok_or(RpcError::UnknownPeer(to))?;
        let conn = link.connection().await.ok_or(RpcError::Unreachable(to))?;
        let broken = |e: &dyn std::fmt::Display| RpcError::Broken(to, e.to_string());
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| broken(&e))?;
        send.write_all(&link.header).await.map_err(|e| broken(&e))?;
        let len = u32::try_from(request.len()).map_err(|e| broken(&e))?;
        send.write_all(&len.to_le_bytes())
            .await
            .map_err(|e| broken(&e))?;
        send.write_all(&request).await.map_err(|e| broken(&e))?;
        let _ = send.finish();
        wire::read_raw_frame(&mut recv, self.max_frame)
            .await
            .map_err(|e| broken(&e))?
            .ok_or_else(|| RpcError::Broken(to, "no reply".into()))
    }

    fn max_request_bytes(&self) -> Option<usize> {
        Some(self.max_frame)
    }
}
