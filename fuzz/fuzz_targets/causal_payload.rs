//! Causal payloads: decoding never panics, and anything accepted round-trips exactly.
#![no_main]
use kvs_node::causal::VectorClock;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(clock) = VectorClock::from_payload(text)
    {
        assert_eq!(VectorClock::from_payload(&clock.to_payload()).expect("our own encoding decodes"), clock);
    }
});
