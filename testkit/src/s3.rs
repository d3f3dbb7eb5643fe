//! A real S3 API server for tests: moto in server mode (from PyPI; `scripts/test` installs it in a
//! virtualenv of its own and exports `KVS_MOTO_SERVER`), on a loopback address the test owns. No
//! mock of any client library: what talks to it is the S3 client the product ships.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A running moto server; killed (and waited for) when dropped.
pub struct MotoServer {
    process: Child,
    endpoint: String,
}

impl MotoServer {
    /// Starts moto on `addr` (`host:port`) and waits until it answers (up to 30 s).
    pub async fn start(addr: &str) -> MotoServer {
        let program = std::env::var("KVS_MOTO_SERVER").unwrap_or_else(|_| {
            let cached = std::path::Path::new(&std::env::var("HOME").unwrap_or_default())
                .join(".cache/kvs-moto/bin/moto_server");
            if cached.exists() { cached.display().to_string() } else { "moto_server".into() }
        });
        let (host, port) = addr.rsplit_once(':').expect("host:port");
        let process = Command::new(&program)
            .args(["-H", host, "-p", port])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {program} ({e}): run ./scripts/test (it installs moto), or set KVS_MOTO_SERVER")
            });
        // Owned from here on: dropped (killed and waited for) whatever happens below.
        let server = MotoServer { process, endpoint: format!("http://{addr}") };
        let http = kvs_api::http_client().build().expect("an HTTP client builds");
        for _ in 0..300 {
            if http.get(&server.endpoint).send().await.is_ok() {
                return server;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("moto did not answer on {} within 30 s", server.endpoint);
    }

    /// Creates bucket `name`.
    pub async fn bucket(&self, name: &str) {
        let created = kvs_api::http_client()
            .build()
            .expect("an HTTP client builds")
            .put(format!("{}/{name}", self.endpoint))
            .send()
            .await
            .expect("moto");
        assert!(created.status().is_success(), "creating bucket {name}: {}", created.status());
    }

    /// The S3 settings a client needs, named as the environment variables (and the keys of a
    /// credentials Secret) the backup destinations read.
    pub fn settings(&self) -> [(&'static str, String); 5] {
        [
            ("AWS_ACCESS_KEY_ID", "test".into()),
            ("AWS_SECRET_ACCESS_KEY", "test".into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_ALLOW_HTTP", "true".into()),
        ]
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}
