//! `crdgen`: generates every CustomResourceDefinition of the project as YAML (one file each, named
//! by `kvs_operator::crd::definitions`) and writes each to both places it is checked in: `crds/`
//! (for `kubectl apply -f crds/`) and the Helm chart's `files/` (rendered by `templates/crd.yaml`).
//! `operator/tests/crd.rs` fails if any differs from what this generates.
//!
//! ```sh
//! cargo run -p kvs-operator --bin crdgen              # writes every file
//! cargo run -p kvs-operator --bin crdgen -- --stdout  # prints the CRDs instead, as one stream
//! ```

use std::path::Path;

/// The directories the CRDs are checked in to, relative to the workspace root.
const DIRECTORIES: [&str; 2] = ["crds", "charts/kvstore-operator/files"];

fn main() -> anyhow::Result<()> {
    let to_stdout = std::env::args().skip(1).any(|a| a == "--stdout");
    // The workspace root this binary was built from: crdgen is a tool run with `cargo run`.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for (file, crd) in kvs_operator::crd::definitions() {
        let yaml = serde_yaml::to_string(&crd)?;
        if to_stdout {
            print!("---\n{yaml}");
            continue;
        }
        for dir in DIRECTORIES {
            let path = root.join(dir).join(file);
            std::fs::write(&path, &yaml).map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
            eprintln!("crdgen: wrote {dir}/{file}");
        }
    }
    Ok(())
}
