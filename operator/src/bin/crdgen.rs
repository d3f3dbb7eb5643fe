//! `crdgen`: generates the KVStoreCluster CustomResourceDefinition as YAML and writes it to both
//! places it is checked in: `crds/kvstorecluster.yaml` (for `kubectl apply`) and the Helm chart's
//! copy, `charts/kvstore-operator/files/kvstorecluster.yaml` (rendered by `templates/crd.yaml`).
//! `operator/tests/crd.rs` fails if either differs from what this generates.
//!
//! ```sh
//! cargo run -p kvs-operator --bin crdgen              # writes both files
//! cargo run -p kvs-operator --bin crdgen -- --stdout  # prints the CRD instead
//! ```

use kube::CustomResourceExt;
use std::path::Path;

/// Where the CRD is checked in, relative to the workspace root.
const OUTPUTS: [&str; 2] = ["crds/kvstorecluster.yaml", "charts/kvstore-operator/files/kvstorecluster.yaml"];

fn main() -> anyhow::Result<()> {
    let crd = kvs_operator::crd::KVStoreCluster::crd();
    let yaml = serde_yaml::to_string(&crd)?;
    if std::env::args().skip(1).any(|a| a == "--stdout") {
        print!("{yaml}");
        return Ok(());
    }
    // The workspace root this binary was built from: crdgen is a tool run with `cargo run`.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for out in OUTPUTS {
        let path = root.join(out);
        std::fs::write(&path, &yaml).map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
        eprintln!("crdgen: wrote {out}");
    }
    Ok(())
}
