//! The network boundary between nodes: one request/response RPC ([`PeerRequest`] →
//! [`PeerResponse`], see [`crate::protocol`]) behind the [`Peers`] trait, with two
//! implementations:
//!
//! - [`FramedPeers`] (the default): one long-lived TCP connection per peer carrying
//!   length-prefixed postcard frames, many calls in flight on it at once, answered in any order;
//!   a writer task puts every frame queued meanwhile into one write (see [`wire`] and [`framed`]).
//! - [`HttpPeers`]: one `POST /internal/v1/rpc` per call over pooled HTTP/1.1 connections (the
//!   first transport; kept for peers that do not speak frames, e.g. older nodes during an upgrade).
//!
//! Every call carries its own deadline; nothing here retries — failover is the caller's decision,
//! and whether a peer is alive is [`crate::liveness`]'s. [`PeerError`] keeps apart what tells them
//! apart: a connection that failed ([`PeerError::Unreachable`], [`PeerError::ConnectTimeout`]:
//! evidence of death) and an answer that did not come in time ([`PeerError::Timeout`], which is
//! not).
//!
//! Backpressure: at most [`MAX_IN_FLIGHT_PER_PEER`] data calls are in flight to one peer; more
//! wait for a slot (inside the caller's deadline). Heartbeats do not queue behind data.

pub mod framed;
mod http;
pub mod wire;

pub use framed::FramedPeers;
pub use http::HttpPeers;

use crate::protocol::{PeerRequest, PeerResponse, Refusal};
use async_trait::async_trait;
use std::time::Duration;

/// Path of the single internal RPC route.
pub const RPC_PATH: &str = "/internal/v1/rpc";

/// Data calls (everything but heartbeats) in flight to one peer at once; more wait their turn.
/// Bounds the connections and the work one node can push onto another.
pub const MAX_IN_FLIGHT_PER_PEER: usize = 256;

/// Why a call to a peer failed.
#[derive(Clone, Debug, thiserror::Error)]
pub enum PeerError {
    /// The connection failed: refused, reset or closed without an answer.
    #[error("{peer} is unreachable: {detail}")]
    Unreachable { peer: String, detail: String },
    /// Connecting timed out: nothing answers at the peer's address.
    #[error("connecting to {peer} timed out")]
    ConnectTimeout { peer: String },
    /// No answer within the deadline; the peer may well be alive and busy.
    #[error("{peer} did not answer within {timeout:?}")]
    Timeout { peer: String, timeout: Duration },
    /// Not sent: the failure detector holds the peer dead.
    #[error("{peer} is considered dead ({evidence:?}); not sent")]
    Skipped { peer: String, evidence: crate::liveness::Death },
    /// The failure detector declared the peer dead while the call was under way.
    #[error("{peer} was declared dead ({evidence:?}) while the call was under way")]
    Dead { peer: String, evidence: crate::liveness::Death },
    /// The peer answered and did not do it.
    #[error("{peer} refused: {refusal}")]
    Refused { peer: String, refusal: Refusal },
    /// The peer's HTTP layer turned the call away (a wrong cluster token, say): no RPC answer.
    #[error("{peer} rejected the call: {status} {body}")]
    Rejected { peer: String, status: u16, body: String },
    #[error("{peer} sent an undecodable answer: {detail}")]
    Protocol { peer: String, detail: String },
}

/// How a node reaches its peers.
#[async_trait]
pub trait Peers: Send + Sync + 'static {
    /// Sends `request` to `peer` and waits at most `timeout` for its answer.
    async fn call(&self, peer: &str, request: &PeerRequest, timeout: Duration) -> Result<PeerResponse, PeerError>;
}

/// Which transport a node uses to call its peers (it answers both).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    /// Multiplexed length-prefixed frames over one TCP connection per peer.
    #[default]
    Framed,
    /// One HTTP/1.1 request per call.
    Http,
}

/// An error with its causes ("error sending request" alone does not say refused or reset).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
