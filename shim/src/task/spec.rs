//! A bundle's OCI runtime spec (`config.json`), read once, and what the
//! shim takes from it.
//!
//! The shim reads and rewrites only a few of the spec's fields; those are
//! typed (`oci-spec`'s [`Mount`] and [`Root`]), and everything else is kept
//! as it came and handed on to the agent, which reads the whole spec. Not
//! decoding the rest into `oci-spec`'s types keeps their deserializers (a
//! few MiB of code) out of the shim's binary, which never looks at them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use oci_spec::runtime::{Mount, Root};
use serde::{Deserialize, Serialize};

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

/// The fields of a container's OCI spec the shim reads or rewrites, and
/// the rest as it came.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
pub struct BundleSpec {
    /// `hostname`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// `root`: where the rootfs is, if containerd did not mount one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root: Option<Root>,
    /// `mounts`: the sandbox validates and rewrites the binds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mounts: Option<Vec<Mount>>,
    /// `annotations`: the pod grouping.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<HashMap<String, String>>,
    /// Every other field, for the agent.
    #[serde(flatten)]
    pub rest: serde_json::Map<String, serde_json::Value>,
}

impl BundleSpec {
    /// The spec's mounts (none if it has no `mounts`).
    pub fn mounts(&self) -> &[Mount] {
        self.mounts.as_deref().unwrap_or_default()
    }

    /// `linux.cgroupsPath`, if the spec has one (a string).
    pub fn cgroups_path(&self) -> Option<&str> {
        self.rest.get("linux")?.get("cgroupsPath")?.as_str()
    }

    /// The spec's mounts, to rewrite in place.
    pub fn mounts_mut(&mut self) -> &mut [Mount] {
        self.mounts.as_deref_mut().unwrap_or_default()
    }

    /// The path of the network namespace the container joins
    /// (`linux.namespaces`, the `network` entry's `path`): the pod's, as
    /// containerd's CRI plugin and `ctr run --with-ns` pass it. `None` for
    /// a container with a network namespace of its own, or the host's.
    pub fn network_namespace_path(&self) -> Option<&str> {
        self.network_namespace()?
            .get("path")?
            .as_str()
            .filter(|p| !p.is_empty())
    }

    /// Removes the `network` entry of `linux.namespaces` when it names a
    /// path: in a VM the container then stays in the guest's network
    /// namespace, which the sandbox wired to that host namespace, and so
    /// shares it with the pod's other containers. An entry without a path
    /// (a namespace of the container's own) stays. Says whether it removed
    /// one.
    pub fn join_sandbox_network(&mut self) -> bool {
        if self.network_namespace_path().is_none() {
            return false;
        }
        let Some(list) = self
            .rest
            .get_mut("linux")
            .and_then(|l| l.get_mut("namespaces"))
            .and_then(|n| n.as_array_mut())
        else {
            return false;
        };
        let before = list.len();
        list.retain(|ns| ns.get("type").and_then(|t| t.as_str()) != Some("network"));
        list.len() != before
    }

    fn network_namespace(&self) -> Option<&serde_json::Value> {
        self.rest
            .get("linux")?
            .get("namespaces")?
            .as_array()?
            .iter()
            .find(|ns| ns.get("type").and_then(|t| t.as_str()) == Some("network"))
    }
}

/// Reads `<bundle>/config.json`.
pub fn read_spec(bundle: &Path) -> Result<BundleSpec, SpecError> {
    let path = bundle.join("config.json");
    let bytes = std::fs::read(&path).map_err(|source| SpecError::Read {
        path: path.clone(),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|source| SpecError::Parse { path, source })
}

/// The spec as the agent takes it (JSON).
pub fn encode_spec(spec: &BundleSpec) -> Result<Vec<u8>, SpecError> {
    serde_json::to_vec(spec).map_err(SpecError::Encode)
}

/// The sandbox a container belongs to: its group annotation, else itself.
pub fn sandbox_id(spec: &BundleSpec, id: &str) -> String {
    let annotations = spec.annotations.as_ref();
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
pub fn rootfs_path(bundle: &Path, spec: &BundleSpec, snapshot: bool) -> PathBuf {
    if snapshot {
        return bundle.join("rootfs");
    }
    let root = spec
        .root
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

    fn spec(json: serde_json::Value) -> BundleSpec {
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
    fn a_pod_network_namespace_is_read_and_left_for_the_sandbox() {
        let mut pod = spec(serde_json::json!({"linux": {"namespaces": [
            {"type": "pid"},
            {"type": "network", "path": "/var/run/netns/cni-1"},
            {"type": "mount"},
        ]}}));
        assert_eq!(pod.network_namespace_path(), Some("/var/run/netns/cni-1"));
        assert!(pod.join_sandbox_network());
        assert_eq!(pod.network_namespace_path(), None);
        let back: serde_json::Value = serde_json::from_slice(&encode_spec(&pod).unwrap()).unwrap();
        assert_eq!(
            back["linux"]["namespaces"],
            serde_json::json!([{"type": "pid"}, {"type": "mount"}])
        );
        // A network namespace of the container's own, none, or an empty
        // path: nothing to join, nothing removed.
        for json in [
            serde_json::json!({"linux": {"namespaces": [{"type": "network"}]}}),
            serde_json::json!({"linux": {"namespaces": [{"type": "network", "path": ""}]}}),
            serde_json::json!({"linux": {"namespaces": [{"type": "pid"}]}}),
            serde_json::json!({"linux": {"namespaces": "garbage"}}),
            serde_json::json!({}),
        ] {
            let mut s = spec(json.clone());
            assert_eq!(s.network_namespace_path(), None, "{json}");
            assert!(!s.join_sandbox_network(), "{json}");
            let back: serde_json::Value =
                serde_json::from_slice(&encode_spec(&s).unwrap()).unwrap();
            assert_eq!(back, json);
        }
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
    fn what_the_shim_does_not_read_reaches_the_agent_as_it_came() {
        let json = serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "root": {"path": "rootfs", "readonly": true},
            "hostname": "h",
            "mounts": [{"destination": "/v", "type": "bind", "source": "/src",
                        "options": ["rbind", "ro"]}],
            "linux": {"namespaces": [{"type": "pid"}], "future": {"x": 1}},
            "annotations": {"a": "b"},
        });
        let mut spec = spec(json.clone());
        assert_eq!(spec.mounts().len(), 1);
        let back: serde_json::Value = serde_json::from_slice(&encode_spec(&spec).unwrap()).unwrap();
        assert_eq!(back, json);
        // A rewritten mount goes out rewritten, the rest unchanged.
        spec.mounts_mut()[0].set_source(Some("/dev/vdb".into()));
        let back: serde_json::Value = serde_json::from_slice(&encode_spec(&spec).unwrap()).unwrap();
        assert_eq!(back["mounts"][0]["source"], "/dev/vdb");
        assert_eq!(back["linux"], json["linux"]);
        assert_eq!(back["process"], json["process"]);
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
        assert_eq!(spec.hostname.as_deref(), Some("h"));
        let again: BundleSpec = serde_json::from_slice(&encode_spec(&spec).unwrap()).unwrap();
        assert_eq!(again, spec);
    }
}
