//! A bundle's OCI runtime spec (`config.json`), read once as `oci-spec`
//! types, and what the shim takes from it.

use std::path::{Path, PathBuf};

use oci_spec::runtime::Spec;

/// Annotations grouping containers into one shim (one sandbox).
pub const GROUP_ANNOTATIONS: [&str; 2] = [
    "io.kubernetes.cri.sandbox-id",
    "io.containerd.runc.v2.group",
];

/// Errors reading a bundle's spec.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// `config.json` could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// `config.json` is not an OCI runtime spec.
    #[error("{path} is not a valid OCI runtime spec")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's error (names the field and position).
        #[source]
        source: serde_json::Error,
    },
    /// The spec could not be encoded for the agent.
    #[error("cannot encode the container's spec")]
    Encode(#[source] serde_json::Error),
}

/// Reads `<bundle>/config.json`.
pub fn read_spec(bundle: &Path) -> Result<Spec, SpecError> {
    let path = bundle.join("config.json");
    let bytes = std::fs::read(&path).map_err(|source| SpecError::Read {
        path: path.clone(),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|source| SpecError::Parse { path, source })
}

/// The spec as the agent takes it (JSON).
pub fn encode_spec(spec: &Spec) -> Result<Vec<u8>, SpecError> {
    serde_json::to_vec(spec).map_err(SpecError::Encode)
}

/// The sandbox a container belongs to: its group annotation, else itself.
pub fn sandbox_id(spec: &Spec, id: &str) -> String {
    let annotations = spec.annotations().as_ref();
    GROUP_ANNOTATIONS
        .iter()
        .find_map(|key| annotations.and_then(|a| a.get(*key)))
        .filter(|g| !g.is_empty())
        .map_or(id, String::as_str)
        .to_owned()
}

/// The container's root on the host: `<bundle>/rootfs` when containerd
/// mounts a snapshot there (`snapshot`), else the spec's `root.path`
/// (relative to the bundle, `rootfs` if unset).
pub fn rootfs_path(bundle: &Path, spec: &Spec, snapshot: bool) -> PathBuf {
    if snapshot {
        return bundle.join("rootfs");
    }
    let root = spec
        .root()
        .as_ref()
        .map_or_else(|| PathBuf::from("rootfs"), |r| r.path().clone());
    if root.is_absolute() {
        root
    } else {
        bundle.join(root)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: serde_json::Value) -> Spec {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn grouping() {
        let s = spec(serde_json::json!({"ociVersion": "1.0.2",
            "annotations": {"io.kubernetes.cri.sandbox-id": "pod1"}}));
        assert_eq!(sandbox_id(&s, "c1"), "pod1");
        let s = spec(serde_json::json!({"ociVersion": "1.0.2",
            "annotations": {"io.containerd.runc.v2.group": "g"}}));
        assert_eq!(sandbox_id(&s, "c1"), "g");
        let s = spec(serde_json::json!({"ociVersion": "1.0.2",
            "annotations": {"io.containerd.runc.v2.group": ""}}));
        assert_eq!(sandbox_id(&s, "c1"), "c1");
        assert_eq!(sandbox_id(&spec(serde_json::json!({})), "c1"), "c1");
    }

    #[test]
    fn rootfs_from_snapshot_or_spec() {
        let b = Path::new("/b");
        let rel = spec(serde_json::json!({"root": {"path": "r"}}));
        let abs = spec(serde_json::json!({"root": {"path": "/abs"}}));
        assert_eq!(rootfs_path(b, &rel, true), Path::new("/b/rootfs"));
        assert_eq!(rootfs_path(b, &rel, false), Path::new("/b/r"));
        assert_eq!(rootfs_path(b, &abs, false), Path::new("/abs"));
        assert_eq!(
            rootfs_path(b, &spec(serde_json::json!({})), false),
            Path::new("/b/rootfs")
        );
    }

    #[test]
    fn bad_specs_are_typed_errors() {
        let dir = tempfile::tempdir().unwrap();
        let err = read_spec(dir.path()).unwrap_err();
        assert!(matches!(err, SpecError::Read { .. }), "{err}");
        std::fs::write(dir.path().join("config.json"), b"{not json").unwrap();
        let err = read_spec(dir.path()).unwrap_err();
        assert!(
            err.to_string().ends_with("is not a valid OCI runtime spec"),
            "{err}"
        );
        std::fs::write(
            dir.path().join("config.json"),
            br#"{"ociVersion":"1.0.2","hostname":"h"}"#,
        )
        .unwrap();
        let spec = read_spec(dir.path()).unwrap();
        assert_eq!(spec.hostname().as_deref(), Some("h"));
        let again: Spec = serde_json::from_slice(&encode_spec(&spec).unwrap()).unwrap();
        assert_eq!(again, spec);
    }
}
