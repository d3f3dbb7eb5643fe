//! Client authentication: parsing an auth file, an `Authorization` header and a request's path
//! never panics, and a decision over any of them is an answer (allowed, 401 or 403), never a
//! panic. Tokens longer than the file's are never taken for a listed one.
#![no_main]
use kvs_node::auth::{ClusterToken, Policy, bearer, decide, need_for};
use libfuzzer_sys::fuzz_target;

const FILE: &str = "tokens:\n  - name: a\n    token: aaaaaaaaaaaaaaaa\n    role: write\n    prefixes: [\"p/\"]\n";

fuzz_target!(|data: &[u8]| {
    // Three inputs from one: an auth file, a header and a path, split at the first two NULs.
    let mut parts = data.splitn(3, |b| *b == 0);
    let (file, header, path) = (parts.next().unwrap_or_default(), parts.next(), parts.next());
    if let Ok(text) = std::str::from_utf8(file) {
        let _ = Policy::parse(text);
    }
    let policy = Policy::parse(FILE).expect("the fixed file parses");
    let path = path.and_then(|p| std::str::from_utf8(p).ok()).unwrap_or("/v1/kv/p%2Fx");
    for method in [axum::http::Method::GET, axum::http::Method::PUT] {
        let need = need_for(&method, path);
        let decided = decide(Some(&policy), header, None, ClusterToken::NotSet, &need);
        if let (Ok(Some(_)), Some(h)) = (&decided, header) {
            assert_eq!(bearer(h), Some(&b"aaaaaaaaaaaaaaaa"[..]), "only the listed token authenticates");
        }
    }
});
