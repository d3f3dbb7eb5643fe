//! The committed CRDs, and the Helm chart's copies of them, are exactly what `crdgen` generates.

const REGENERATE: &str = "run `cargo run -p kvs-operator --bin crdgen` (it writes every copy)";

fn committed(path: &str) -> String {
    let full = format!("{}/../{path}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{path}: {e}; {REGENERATE}"))
}

#[test]
fn committed_crds_match_crdgen() {
    for (file, crd) in kvs_operator::crd::definitions() {
        let generated = serde_yaml::to_string(&crd).expect("serializes");
        assert!(generated == committed(&format!("crds/{file}")), "crds/{file} is stale: {REGENERATE}");
        // The chart renders these (templates/crd.yaml), so a stale copy would install an old schema.
        let chart = format!("charts/kvstore-operator/files/{file}");
        assert!(generated == committed(&chart), "{chart} is stale: {REGENERATE}");
    }
}

#[test]
fn no_stray_crd_files() {
    // A CRD dropped from the code must not stay installable from an old file.
    let known: Vec<&str> = kvs_operator::crd::definitions().into_iter().map(|(f, _)| f).collect();
    for dir in ["crds", "charts/kvstore-operator/files"] {
        let full = format!("{}/../{dir}", env!("CARGO_MANIFEST_DIR"));
        for entry in std::fs::read_dir(&full).unwrap_or_else(|e| panic!("{dir}: {e}")) {
            let name = entry.expect("a directory entry").file_name().to_string_lossy().into_owned();
            assert!(known.contains(&name.as_str()), "{dir}/{name} is no CRD crdgen makes: delete it");
        }
    }
}
