//! The bind mounts of a container's OCI spec (its `mounts`, as `oci-spec`
//! types), parsed once into one type that handlers validate and share.

use std::path::PathBuf;

use oci_spec::runtime::Mount;

/// A bind mount of a container spec: a host path the container sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindMount {
    /// Its position in the spec's `mounts`.
    pub index: usize,
    /// The host path.
    pub source: PathBuf,
    /// Where the container sees it.
    pub destination: PathBuf,
    /// Mounted read-only (the last of `ro`/`rw` wins, as in mount(8)).
    pub read_only: bool,
    /// The mount's options as the spec gives them.
    pub options: Vec<String>,
}

impl BindMount {
    /// The bind mount `mount` describes (type `bind`, or a `bind`/`rbind`
    /// option as containerd writes them), `None` for other mounts.
    pub fn parse(index: usize, mount: &Mount) -> Option<Self> {
        let options = mount.options().clone().unwrap_or_default();
        let bind = mount.typ().as_deref() == Some("bind")
            || options
                .iter()
                .any(|o| matches!(o.as_str(), "bind" | "rbind"));
        if !bind {
            return None;
        }
        let read_only = options
            .iter()
            .rev()
            .find(|o| matches!(o.as_str(), "ro" | "rw"))
            .is_some_and(|o| o == "ro");
        Some(Self {
            index,
            source: mount.source().clone().unwrap_or_default(),
            destination: mount.destination().clone(),
            read_only,
            options,
        })
    }

    /// Every bind mount of a spec's `mounts`, in spec order.
    pub fn all(mounts: &[Mount]) -> Vec<Self> {
        mounts
            .iter()
            .enumerate()
            .filter_map(|(i, m)| Self::parse(i, m))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(mounts: serde_json::Value) -> Vec<Mount> {
        serde_json::from_value(mounts).unwrap()
    }

    #[test]
    fn binds_are_picked_out_with_their_mode() {
        let m = |ty: &str, source: &str, opts: &[&str]| serde_json::json!({"destination": "/v", "type": ty, "source": source, "options": opts});
        let spec = spec(serde_json::json!([
            m("proc", "proc", &[]),
            m("tmpfs", "tmpfs", &["ro"]),
            m("bind", "/a", &["rbind", "ro"]),
            // containerd's style: type "none" with a bind option.
            m("none", "/b", &["ro", "rbind"]),
            m("bind", "/c", &["rbind"]),
            m("bind", "/d", &["ro", "bind", "rw"]),
        ]));
        let binds = BindMount::all(&spec);
        let got: Vec<_> = binds
            .iter()
            .map(|b| (b.index, b.source.to_str().unwrap(), b.read_only))
            .collect();
        assert_eq!(
            got,
            [
                (2, "/a", true),
                (3, "/b", true),
                (4, "/c", false),
                (5, "/d", false)
            ]
        );
        assert_eq!(binds[0].destination, PathBuf::from("/v"));
        assert_eq!(binds[0].options, ["rbind", "ro"]);
        assert!(BindMount::all(&oci_spec::runtime::get_default_mounts()).is_empty());
    }
}
