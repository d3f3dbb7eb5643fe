//! Frames of the framed peer protocol (`kvs_node::peers::wire`), both directions: decoding
//! untrusted bytes never panics.
#![no_main]
use kvs_node::peers::wire;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = wire::decode_caller(data);
    let _ = wire::decode_answer(data);
});
