//! Answering peers over the framed protocol (see [`crate::peers::wire`]): the server side of one
//! peer connection, on the same port as HTTP ([`crate::run`] tells them apart by the first byte).
//!
//! Invariants:
//! - Nothing is done for a connection before its token checked out (when the node has one): a
//!   wrong or missing token gets [`wire::reject`] and the connection closes.
//! - Every call is answered on its own task, so a slow call (a write waiting for its replicas)
//!   never holds up the answers behind it; answers go out in the order they are ready, gathered
//!   into few writes by one writer task.
//! - On shutdown the connection stops taking calls, finishes every call it took, writes their
//!   answers, then closes: a call a peer sees answered was performed, and one it sees cut off (the
//!   connection closed without its answer) was never started.

use crate::node::Node;
use crate::peers::wire::{self, CallerFrame};
use crate::tls::Channel;
use futures::StreamExt;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio_util::codec::FramedRead;
use tokio_util::task::TaskTracker;

/// Serves one peer connection whose first byte was the preface's, until the peer closes it or
/// `stop` turns true. `handshake_within` bounds the preface and the token frame (as the HTTP
/// header timeout bounds a request's headers).
pub async fn serve_plain(node: Arc<Node>, stream: TcpStream, handshake_within: Duration, stop: watch::Receiver<bool>) {
    let _ = stream.set_nodelay(true);
    let (read, write) = stream.into_split();
    serve(node, read, write, Channel::Plain, handshake_within, stop).await
}

/// [`serve_plain`] over any stream, split in halves; `channel` says whether it may carry peer
/// traffic at all (over TLS only with a client certificate from the cluster CA).
pub async fn serve<R, W>(
    node: Arc<Node>,
    mut read: R,
    write: W,
    channel: Channel,
    handshake_within: Duration,
    mut stop: watch::Receiver<bool>,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (answers, queue) = mpsc::unbounded_channel();
    let writer = tokio::spawn(wire::write_frames(write, queue));
    let mut frames = match tokio::time::timeout(handshake_within, handshake(&node, &mut read, channel)).await {
        Ok(Ok(())) => FramedRead::new(read, wire::codec()),
        Ok(Err(why)) => {
            tracing::warn!(reason = %why, "refusing a peer connection");
            let _ = answers.send(wire::reject(&why));
            drop(answers);
            let _ = writer.await;
            return;
        }
        Err(_) => return,
    };
    let calls = TaskTracker::new();
    loop {
        let frame = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            frame = frames.next() => frame,
        };
        match frame.map(|f| f.map(|bytes| wire::decode_caller(&bytes))) {
            Some(Ok(Ok(CallerFrame::Call { id, request }))) => {
                let (node, answers) = (node.clone(), answers.clone());
                calls.spawn(async move {
                    let response = node.handle_rpc(request).await;
                    // The connection may be gone: nobody to answer.
                    let _ = answers.send(wire::answer(id, &response));
                });
            }
            Some(Ok(Ok(CallerFrame::Auth { .. }))) => {
                tracing::warn!("a peer sent a second token on one connection; closing it");
                break;
            }
            Some(Ok(Err(e))) => {
                tracing::warn!(error = %e, "undecodable frame from a peer; closing the connection");
                break;
            }
            Some(Err(e)) => {
                tracing::debug!(error = %e, "peer connection failed");
                break;
            }
            None => break,
        }
    }
    calls.close();
    calls.wait().await;
    drop(answers);
    let _ = writer.await;
}

/// Reads the rest of the preface (its first byte told the connection apart) and the token frame.
async fn handshake<R: AsyncRead + Unpin>(node: &Node, read: &mut R, channel: Channel) -> Result<(), String> {
    let mut preface = [0u8; wire::PREFACE.len()];
    read.read_exact(&mut preface).await.map_err(|e| format!("reading the preface: {e}"))?;
    if &preface != wire::PREFACE {
        return Err("not the kvstore peer protocol".into());
    }
    let mut head = [0u8; 4];
    read.read_exact(&mut head).await.map_err(|e| format!("reading the token frame: {e}"))?;
    let len = u32::from_be_bytes(head) as usize;
    if len > 64 * 1024 {
        return Err(format!("a token frame of {len} bytes"));
    }
    let mut body = vec![0u8; len];
    read.read_exact(&mut body).await.map_err(|e| format!("reading the token frame: {e}"))?;
    let token = match wire::decode_caller(&body) {
        Ok(CallerFrame::Auth { token }) => token,
        Ok(CallerFrame::Call { .. }) => return Err("a call before the token".into()),
        Err(e) => return Err(format!("undecodable token frame: {e}")),
    };
    // Read first, refused after: the caller then reads why instead of a reset connection.
    if !channel.admits_peers() {
        return Err(crate::tls::PEER_NEEDS_CERTIFICATE.into());
    }
    match node.settings().cluster_token.as_deref() {
        None => Ok(()),
        Some(expected) if crate::http::constant_time_eq(&token, expected.as_bytes()) => Ok(()),
        Some(_) if token.is_empty() => Err("this node needs the cluster token".into()),
        Some(_) => Err("the cluster token does not match this node's".into()),
    }
}
