//! Node-to-node messages (view changes, transfer batches, replication, anti-entropy): decoding
//! untrusted bytes never panics, and anything accepted re-encodes to something that decodes equal.
#![no_main]
use kvs_node::protocol::{PeerRequest, PeerResponse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = postcard::from_bytes::<PeerRequest>(data) {
        let again = postcard::to_stdvec(&req).expect("encodes");
        assert_eq!(postcard::from_bytes::<PeerRequest>(&again).expect("decodes"), req);
    }
    let _ = postcard::from_bytes::<PeerResponse>(data);
});
