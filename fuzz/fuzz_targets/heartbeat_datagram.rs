//! Heartbeat datagrams (UDP, from anyone who can reach the node's port): decoding never panics,
//! and an accepted beat re-encodes to a datagram that decodes equal, with and without a token.
#![no_main]
use kvs_node::heartbeat::{decode, encode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for token in [None, Some("cluster-secret")] {
        if let Some(beat) = decode(token, data) {
            assert_eq!(decode(token, &encode(token, beat.clone())), Some(beat));
        }
    }
});
