//! The framed peer protocol on the wire, shared by the client ([`super::framed`]) and the server
//! (`crate::peer_server`).
//!
//! A connection starts with [`PREFACE`] from the caller. Its first byte is `0x00`, which never
//! starts an HTTP request, so a node tells a peer connection from an HTTP one on the same port by
//! one byte. Then both sides exchange frames: a 4-byte big-endian length, then a postcard-encoded
//! [`CallerFrame`] (caller → node) or [`AnswerFrame`] (node → caller).
//!
//! - The caller's first frame is [`CallerFrame::Auth`] with the cluster token (empty without one).
//!   A node with a token answers a wrong one with [`AnswerFrame::Reject`] and closes.
//! - Every [`CallerFrame::Call`] carries an id the caller chose; its [`AnswerFrame::Answer`]
//!   carries the same id. Answers come in any order: many calls share the connection.
//!
//! Encoding borrows (no copy of a request to send it); decoding owns. The borrowed and owned frame
//! types are declared in the same variant order, which is what makes their encodings agree
//! (checked by the tests).

use crate::protocol::{PeerRequest, PeerResponse};
use bytes::Bytes;
use futures::SinkExt;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWrite;
use tokio::sync::mpsc;
use tokio_util::codec::{FramedWrite, LengthDelimitedCodec};

/// What a caller sends first on a new connection.
pub const PREFACE: &[u8; 8] = b"\0KVSRPC1";

/// Largest frame either side accepts (transfer batches of many records, values up to the limit).
pub const MAX_FRAME: usize = 256 << 20;

/// Most bytes of frames one write gathers before it goes out (bounds the delay of the first).
const MAX_WRITE_BATCH: usize = 1 << 20;

/// The frame codec of both directions.
pub fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder().max_frame_length(MAX_FRAME).new_codec()
}

/// Caller → node.
#[derive(Debug, PartialEq, Eq, Deserialize)]
pub enum CallerFrame {
    Auth { token: Vec<u8> },
    Call { id: u64, request: PeerRequest },
}

#[derive(Serialize)]
enum CallerFrameRef<'a> {
    Auth { token: &'a [u8] },
    Call { id: u64, request: &'a PeerRequest },
}

/// Node → caller.
#[derive(Debug, PartialEq, Eq, Deserialize)]
pub enum AnswerFrame {
    Answer {
        id: u64,
        response: PeerResponse,
    },
    /// The node will not serve this connection (the message says why); it closes after this.
    Reject {
        message: String,
    },
}

#[derive(Serialize)]
enum AnswerFrameRef<'a> {
    Answer { id: u64, response: &'a PeerResponse },
    Reject { message: &'a str },
}

fn encode(value: &impl Serialize) -> Bytes {
    Bytes::from(postcard::to_stdvec(value).expect("serializing plain data into a Vec cannot fail"))
}

pub fn auth(token: &[u8]) -> Bytes {
    encode(&CallerFrameRef::Auth { token })
}

pub fn call(id: u64, request: &PeerRequest) -> Bytes {
    encode(&CallerFrameRef::Call { id, request })
}

pub fn answer(id: u64, response: &PeerResponse) -> Bytes {
    encode(&AnswerFrameRef::Answer { id, response })
}

pub fn reject(message: &str) -> Bytes {
    encode(&AnswerFrameRef::Reject { message })
}

pub fn decode_caller(frame: &[u8]) -> Result<CallerFrame, postcard::Error> {
    postcard::from_bytes(frame)
}

pub fn decode_answer(frame: &[u8]) -> Result<AnswerFrame, postcard::Error> {
    postcard::from_bytes(frame)
}

/// Writes the frames `queue` delivers until it closes (every sender dropped) or a write fails,
/// gathering whatever is queued at the moment into one write: under load many calls or answers
/// share a syscall. Returns the write error, if one ended it.
pub async fn write_frames<W: AsyncWrite + Unpin>(
    out: W,
    mut queue: mpsc::UnboundedReceiver<Bytes>,
) -> Result<(), std::io::Error> {
    let mut sink = FramedWrite::new(out, codec());
    while let Some(frame) = queue.recv().await {
        let mut gathered = frame.len();
        sink.feed(frame).await?;
        while gathered < MAX_WRITE_BATCH
            && let Ok(frame) = queue.try_recv()
        {
            gathered += frame.len();
            sink.feed(frame).await?;
        }
        SinkExt::<Bytes>::flush(&mut sink).await?;
    }
    SinkExt::<Bytes>::close(&mut sink).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Refusal;

    #[test]
    fn borrowed_and_owned_frames_agree() {
        assert_eq!(decode_caller(&auth(b"tok")).unwrap(), CallerFrame::Auth { token: b"tok".to_vec() });
        let request = PeerRequest::Fetch { key: "k".into(), view_epoch: 1 };
        assert_eq!(decode_caller(&call(7, &request)).unwrap(), CallerFrame::Call { id: 7, request });
        let response = PeerResponse::Refused(Refusal::NoView);
        assert_eq!(
            decode_answer(&answer(u64::MAX, &response)).unwrap(),
            AnswerFrame::Answer { id: u64::MAX, response }
        );
        assert_eq!(decode_answer(&reject("no")).unwrap(), AnswerFrame::Reject { message: "no".into() });
    }

    #[test]
    fn the_preface_never_starts_an_http_request() {
        assert_eq!(PREFACE[0], 0, "HTTP methods are tokens of visible characters");
    }

    #[tokio::test]
    async fn queued_frames_go_out_in_order_and_the_writer_ends_with_its_queue() {
        use futures::StreamExt;
        use tokio_util::codec::FramedRead;
        let (client, server) = tokio::io::duplex(1 << 16);
        let (tx, rx) = mpsc::unbounded_channel();
        for i in 0..100u64 {
            tx.send(call(i, &PeerRequest::Ping)).unwrap();
        }
        drop(tx);
        write_frames(client, rx).await.unwrap();
        let ids: Vec<u64> = FramedRead::new(server, codec())
            .map(|f| match decode_caller(&f.unwrap()).unwrap() {
                CallerFrame::Call { id, .. } => id,
                other => panic!("{other:?}"),
            })
            .collect()
            .await;
        assert_eq!(ids, (0..100).collect::<Vec<_>>());
    }
}
