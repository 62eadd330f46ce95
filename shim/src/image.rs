//! OCI image layouts for `skiff run --image`: pick an image, verify its
//! blobs, unpack its layers into a fresh rootfs directory.
//!
//! A reference is `PATH[:TAG]`: `PATH` is an OCI image layout directory
//! (`oci-layout`, `index.json`, `blobs/sha256/…`) or a tar of one (what
//! `ctr images export` and `skopeo copy … oci-archive:` write). `TAG`
//! picks the manifest whose `org.opencontainers.image.ref.name` annotation
//! matches; without it the layout must hold exactly one. An index entry
//! that is itself an image index resolves to its manifest for this host's
//! platform (linux/amd64 on x86_64).
//!
//! Every blob is checked against its descriptor's sha256 digest while it is
//! read. Layers (tar, tar+gzip, tar+zstd; OCI and Docker media types) are
//! applied in order with OCI whiteouts (`.wh.NAME`, `.wh..wh..opq`), and no
//! entry may land outside the rootfs: absolute and `..` paths are refused,
//! and symlinks are never followed out of it (the `tar` crate's
//! `unpack_in` canonicalizes each parent; whiteouts never cross a symlink).
//! A digest mismatch is reported once the blob has been read to its end, so
//! a bad layer may have been partly written: callers remove the rootfs on
//! any error. Device nodes and fifos in layers are skipped, and extended
//! attributes (file capabilities included) are not applied.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use oci_spec::image::{
    Arch, Descriptor, ImageConfiguration, ImageIndex, ImageManifest, MediaType, Os,
    ANNOTATION_REF_NAME,
};
use serde::de::DeserializeOwned;
use sha2::{Digest as _, Sha256};

/// The largest JSON document (index, manifest, config) read into memory.
const MAX_JSON_BYTES: u64 = 4 << 20;
/// How many image indexes may lead to a manifest (index.json included).
const MAX_NESTING: usize = 4;
/// The prefix of a whiteout entry's name.
const WHITEOUT_PREFIX: &[u8] = b".wh.";
/// The name of an opaque-directory marker.
const OPAQUE_MARKER: &str = ".wh..wh..opq";

const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// Errors of reading and unpacking an image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Nothing is at the reference's path.
    #[error("{0} does not exist")]
    NotFound(PathBuf),
    /// The path is not an OCI image layout.
    #[error("{0} is not an OCI image layout: it has no index.json")]
    MissingIndex(PathBuf),
    /// Reading the layout failed.
    #[error("cannot read {what}")]
    Read {
        /// What was read.
        what: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The rootfs directory could not be created.
    #[error("cannot create {0}")]
    Create(PathBuf, #[source] io::Error),
    /// A JSON document of the image is malformed.
    #[error("{what} is not valid")]
    Json {
        /// Which document.
        what: String,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// A JSON document's descriptor gives an unreasonable size.
    #[error("{digest} is {size} bytes, too large for a JSON document")]
    TooLarge {
        /// The blob.
        digest: String,
        /// Its size.
        size: u64,
    },
    /// The index lists no image.
    #[error("the image index lists no image")]
    NoManifest,
    /// The index lists several images and no tag picks one.
    #[error("the image layout has several images, pick one with :TAG (choices: {})", .0.join(", "))]
    Ambiguous(Vec<String>),
    /// No image has the tag.
    #[error("the image layout has no tag {tag:?} (choices: {})", .choices.join(", "))]
    NoSuchTag {
        /// The tag asked for.
        tag: String,
        /// The tags (or digests) there are.
        choices: Vec<String>,
    },
    /// A nested image index has no image for this host.
    #[error("the image index has no {wanted} image (platforms: {})", .available.join(", "))]
    NoPlatform {
        /// This host's platform.
        wanted: String,
        /// The platforms there are.
        available: Vec<String>,
    },
    /// Image indexes nest too deep.
    #[error("image indexes nest deeper than {MAX_NESTING}")]
    TooDeep,
    /// A descriptor that should lead to an image leads elsewhere.
    #[error("{digest} is a {media_type}, not an image manifest or index")]
    NotAnImage {
        /// The blob.
        digest: String,
        /// Its media type.
        media_type: String,
    },
    /// A descriptor uses a digest algorithm other than sha256.
    #[error("unsupported digest {0} (only sha256 is)")]
    UnsupportedDigest(String),
    /// A blob is missing from the layout.
    #[error("the image layout has no blob {0}")]
    MissingBlob(String),
    /// A blob's content does not match its descriptor.
    #[error("blob {expected} does not match its digest (its content is sha256:{actual})")]
    DigestMismatch {
        /// The descriptor's digest.
        expected: String,
        /// The content's sha256 (hex).
        actual: String,
    },
    /// A layer's media type is not a tar, tar+gzip or tar+zstd.
    #[error("layer {layer} has the unsupported media type {media_type}")]
    UnsupportedLayer {
        /// The layer's digest.
        layer: String,
        /// Its media type.
        media_type: String,
    },
    /// A layer entry's path (or hard link target) is absolute or has `..`.
    #[error("layer {layer} has an entry outside the rootfs: {path}")]
    Escape {
        /// The layer's digest.
        layer: String,
        /// The entry's path or link target.
        path: String,
    },
    /// Unpacking a layer failed (a symlink leading out of the rootfs
    /// included).
    #[error("cannot unpack layer {layer}")]
    Unpack {
        /// The layer's digest.
        layer: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The config's user is not in the image's /etc/passwd.
    #[error("the image's user {0:?} is not in its /etc/passwd")]
    UnknownUser(String),
    /// The config's group is not in the image's /etc/group.
    #[error("the image's group {0:?} is not in its /etc/group")]
    UnknownGroup(String),
}

/// What an image's config says about the container's process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageProcess {
    /// `Entrypoint`.
    pub entrypoint: Vec<String>,
    /// `Cmd`: the arguments when none are given.
    pub cmd: Vec<String>,
    /// `Env`: `NAME=value` entries.
    pub env: Vec<String>,
    /// `WorkingDir`, if set.
    pub working_dir: Option<String>,
    /// `User` as uid and gid, resolved in the image's /etc/passwd and
    /// /etc/group; `None` if unset (root).
    pub user: Option<(u32, u32)>,
}

impl ImageProcess {
    /// The container's arguments, as docker makes them: the entrypoint,
    /// then `command` if it is not empty, else the image's `Cmd`.
    pub fn args(&self, command: &[String]) -> Vec<String> {
        let tail = if command.is_empty() {
            &self.cmd
        } else {
            command
        };
        self.entrypoint.iter().chain(tail).cloned().collect()
    }
}

/// How a layer is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar.
    None,
    /// tar+gzip.
    Gzip,
    /// tar+zstd.
    Zstd,
}

impl Compression {
    /// The compression a layer media type stands for; `None` if it is not a
    /// layer type this module unpacks.
    pub fn of(media_type: &MediaType) -> Option<Self> {
        match media_type {
            MediaType::ImageLayer | MediaType::ImageLayerNonDistributable => Some(Self::None),
            MediaType::ImageLayerGzip | MediaType::ImageLayerNonDistributableGzip => {
                Some(Self::Gzip)
            }
            MediaType::ImageLayerZstd | MediaType::ImageLayerNonDistributableZstd => {
                Some(Self::Zstd)
            }
            MediaType::Other(t) => match t.as_str() {
                "application/vnd.docker.image.rootfs.diff.tar" => Some(Self::None),
                "application/vnd.docker.image.rootfs.diff.tar.gzip"
                | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Some(Self::Gzip),
                "application/vnd.docker.image.rootfs.diff.tar.zstd" => Some(Self::Zstd),
                _ => None,
            },
            _ => None,
        }
    }

    /// The OCI layer media type with this compression.
    pub fn media_type(self) -> MediaType {
        match self {
            Self::None => MediaType::ImageLayer,
            Self::Gzip => MediaType::ImageLayerGzip,
            Self::Zstd => MediaType::ImageLayerZstd,
        }
    }
}

/// Unpacks the image `reference` (`PATH[:TAG]`) into `rootfs`, a directory
/// it creates (it must not exist; its parent must), and returns what the
/// image's config says about the process. On error `rootfs` may hold part
/// of the image: the caller removes it.
pub fn unpack(reference: &str, rootfs: &Path) -> Result<ImageProcess, ImageError> {
    let (path, tag) = split_reference(reference);
    let layout = Layout::open(&path)?;
    let index = layout.index()?;
    let manifest = image_manifest(&layout, pick_tagged(&index, tag)?, 1)?;
    let config: ImageConfiguration = layout.json(manifest.config(), "the image config")?;
    fs::create_dir(rootfs).map_err(|e| ImageError::Create(rootfs.to_owned(), e))?;
    for layer in manifest.layers() {
        apply_layer(&layout, layer, rootfs)?;
    }
    let process = config.config().clone().unwrap_or_default();
    let user = match process.user().as_deref() {
        None | Some("") => None,
        Some(user) => Some(resolve_user(rootfs, user)?),
    };
    Ok(ImageProcess {
        entrypoint: process.entrypoint().clone().unwrap_or_default(),
        cmd: process.cmd().clone().unwrap_or_default(),
        env: process.env().clone().unwrap_or_default(),
        working_dir: process.working_dir().clone().filter(|d| !d.is_empty()),
        user,
    })
}

/// `PATH[:TAG]` → (PATH, TAG). A path that exists as given has no tag.
fn split_reference(reference: &str) -> (PathBuf, Option<&str>) {
    if !Path::new(reference).exists() {
        if let Some((path, tag)) = reference.rsplit_once(':') {
            if !tag.is_empty() && !tag.contains('/') && Path::new(path).exists() {
                return (path.into(), Some(tag));
            }
        }
    }
    (reference.into(), None)
}

/// An OCI image layout: a directory, or a tar of one (its regular files by
/// name, as data offset and size).
enum Layout {
    Dir(PathBuf),
    Tar {
        path: PathBuf,
        files: HashMap<String, (u64, u64)>,
    },
}

fn read_err(what: impl std::fmt::Display) -> impl FnOnce(io::Error) -> ImageError {
    let what = what.to_string();
    move |source| ImageError::Read { what, source }
}

impl Layout {
    fn open(path: &Path) -> Result<Self, ImageError> {
        let meta = fs::metadata(path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => ImageError::NotFound(path.to_owned()),
            _ => read_err(path.display())(e),
        })?;
        if meta.is_dir() {
            return Ok(Self::Dir(path.to_owned()));
        }
        let file = File::open(path).map_err(read_err(path.display()))?;
        let mut archive = tar::Archive::new(file);
        let mut files = HashMap::new();
        for entry in archive
            .entries_with_seek()
            .map_err(read_err(path.display()))?
        {
            let entry = entry.map_err(read_err(path.display()))?;
            if !entry.header().entry_type().is_file() {
                continue;
            }
            let name = entry.path().map_err(read_err(path.display()))?;
            let Some(name) = relative(&name).and_then(|n| n.to_str().map(str::to_owned)) else {
                continue;
            };
            files.insert(name, (entry.raw_file_position(), entry.size()));
        }
        Ok(Self::Tar {
            path: path.to_owned(),
            files,
        })
    }

    fn path(&self) -> &Path {
        match self {
            Self::Dir(path) | Self::Tar { path, .. } => path,
        }
    }

    /// The file `name` of the layout (`index.json`, `blobs/sha256/…`);
    /// `None` if it has none.
    fn file(&self, name: &str) -> Result<Option<Box<dyn Read>>, ImageError> {
        let what = || format!("{name} in {}", self.path().display());
        match self {
            Self::Dir(dir) => match File::open(dir.join(name)) {
                Ok(f) => Ok(Some(Box::new(f))),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(read_err(what())(e)),
            },
            Self::Tar { path, files } => {
                let Some(&(offset, size)) = files.get(name) else {
                    return Ok(None);
                };
                let mut f = File::open(path).map_err(read_err(what()))?;
                f.seek(SeekFrom::Start(offset)).map_err(read_err(what()))?;
                Ok(Some(Box::new(f.take(size))))
            }
        }
    }

    fn index(&self) -> Result<ImageIndex, ImageError> {
        let file = self
            .file("index.json")?
            .ok_or_else(|| ImageError::MissingIndex(self.path().to_owned()))?;
        let mut data = Vec::new();
        file.take(MAX_JSON_BYTES)
            .read_to_end(&mut data)
            .map_err(read_err("index.json"))?;
        serde_json::from_slice(&data).map_err(|source| ImageError::Json {
            what: "index.json".into(),
            source,
        })
    }

    /// The blob `desc` names, checked against its digest as it is read.
    fn blob(&self, desc: &Descriptor) -> Result<Verified, ImageError> {
        let digest = desc.digest().to_string();
        let hex = desc
            .as_digest_sha256()
            .ok_or_else(|| ImageError::UnsupportedDigest(digest.clone()))?
            .to_owned();
        let inner = self
            .file(&format!("blobs/sha256/{hex}"))?
            .ok_or_else(|| ImageError::MissingBlob(digest.clone()))?
            .take(desc.size());
        Ok(Verified {
            inner,
            hasher: Sha256::new(),
            digest,
            hex,
        })
    }

    /// The JSON blob `desc` names, verified and parsed.
    fn json<T: DeserializeOwned>(&self, desc: &Descriptor, what: &str) -> Result<T, ImageError> {
        if desc.size() > MAX_JSON_BYTES {
            return Err(ImageError::TooLarge {
                digest: desc.digest().to_string(),
                size: desc.size(),
            });
        }
        let mut blob = self.blob(desc)?;
        let mut data = Vec::new();
        blob.read_to_end(&mut data)
            .map_err(read_err(desc.digest()))?;
        blob.finish()?;
        serde_json::from_slice(&data).map_err(|source| ImageError::Json {
            what: format!("{what} {}", desc.digest()),
            source,
        })
    }
}

/// A blob's reader that hashes what passes through it.
struct Verified {
    inner: io::Take<Box<dyn Read>>,
    hasher: Sha256,
    digest: String,
    hex: String,
}

impl Read for Verified {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

impl Verified {
    /// Reads the rest of the blob and checks its digest.
    fn finish(mut self) -> Result<(), ImageError> {
        io::copy(&mut self, &mut io::sink()).map_err(read_err(&self.digest))?;
        let actual = format!("{:x}", self.hasher.finalize());
        if actual == self.hex {
            Ok(())
        } else {
            Err(ImageError::DigestMismatch {
                expected: self.digest,
                actual,
            })
        }
    }
}

/// The entry of index.json `tag` names (by its ref.name annotation), or
/// its only entry.
fn pick_tagged<'a>(index: &'a ImageIndex, tag: Option<&str>) -> Result<&'a Descriptor, ImageError> {
    let ref_name = |d: &Descriptor| {
        d.annotations()
            .as_ref()
            .and_then(|a| a.get(ANNOTATION_REF_NAME).cloned())
    };
    let choices = || {
        index
            .manifests()
            .iter()
            .map(|d| ref_name(d).unwrap_or_else(|| d.digest().to_string()))
            .collect()
    };
    match tag {
        Some(tag) => index
            .manifests()
            .iter()
            .find(|d| ref_name(d).as_deref() == Some(tag))
            .ok_or_else(|| ImageError::NoSuchTag {
                tag: tag.to_owned(),
                choices: choices(),
            }),
        None => match index.manifests().as_slice() {
            [] => Err(ImageError::NoManifest),
            [one] => Ok(one),
            _ => Err(ImageError::Ambiguous(choices())),
        },
    }
}

/// This host's platform in OCI terms.
fn host_platform() -> (Os, Arch) {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    (Os::Linux, Arch::from(arch))
}

/// The image manifest `desc` leads to, through nested indexes (`depth` of
/// them read so far).
fn image_manifest(
    layout: &Layout,
    desc: &Descriptor,
    depth: usize,
) -> Result<ImageManifest, ImageError> {
    let is_index = match desc.media_type() {
        MediaType::ImageManifest => false,
        MediaType::ImageIndex => true,
        MediaType::Other(t) if t == DOCKER_MANIFEST => false,
        MediaType::Other(t) if t == DOCKER_MANIFEST_LIST => true,
        other => {
            return Err(ImageError::NotAnImage {
                digest: desc.digest().to_string(),
                media_type: other.to_string(),
            })
        }
    };
    if !is_index {
        return layout.json(desc, "the image manifest");
    }
    if depth >= MAX_NESTING {
        return Err(ImageError::TooDeep);
    }
    let index: ImageIndex = layout.json(desc, "the image index")?;
    let (os, arch) = host_platform();
    let next = index.manifests().iter().find(|d| {
        d.platform()
            .as_ref()
            .is_some_and(|p| *p.os() == os && *p.architecture() == arch)
    });
    match next {
        Some(next) => image_manifest(layout, next, depth + 1),
        None => Err(ImageError::NoPlatform {
            wanted: format!("{os}/{arch}"),
            available: index
                .manifests()
                .iter()
                .filter_map(|d| d.platform().as_ref())
                .map(|p| format!("{}/{}", p.os(), p.architecture()))
                .collect(),
        }),
    }
}

/// `path` without `.` components; `None` if it is absolute or has `..`.
fn relative(path: &Path) -> Option<PathBuf> {
    let mut rel = PathBuf::new();
    for part in path.components() {
        match part {
            Component::Normal(p) => rel.push(p),
            Component::CurDir => {}
            Component::RootDir | Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(rel)
}

/// `rootfs/rel` if every component of `rel` exists and none is a symlink
/// (so nothing done there can leave `rootfs`); `None` otherwise.
fn inside(rootfs: &Path, rel: &Path) -> Option<PathBuf> {
    let mut path = rootfs.to_owned();
    for part in rel.components() {
        path.push(part);
        if fs::symlink_metadata(&path).ok()?.file_type().is_symlink() {
            return None;
        }
    }
    Some(path)
}

/// Removes `path` (a directory with its content, or anything else; a
/// symlink itself, never its target). Absent is fine.
fn remove(path: &Path) -> io::Result<()> {
    let result = match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) => Err(e),
    };
    match result {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

fn apply_layer(layout: &Layout, desc: &Descriptor, rootfs: &Path) -> Result<(), ImageError> {
    let layer = desc.digest().to_string();
    let compression =
        Compression::of(desc.media_type()).ok_or_else(|| ImageError::UnsupportedLayer {
            layer: layer.clone(),
            media_type: desc.media_type().to_string(),
        })?;
    log::debug!("unpacking layer {layer} ({compression:?})");
    let mut blob = layout.blob(desc)?;
    let unpacked = match compression {
        Compression::None => unpack_tar(&mut blob, rootfs, &layer),
        Compression::Gzip => {
            unpack_tar(flate2::read::MultiGzDecoder::new(&mut blob), rootfs, &layer)
        }
        Compression::Zstd => match zstd::Decoder::new(&mut blob) {
            Ok(decoder) => unpack_tar(decoder, rootfs, &layer),
            Err(source) => Err(ImageError::Unpack {
                layer: layer.clone(),
                source,
            }),
        },
    };
    // A digest mismatch explains any unpack error, so it goes first.
    blob.finish()?;
    unpacked
}

/// Applies one layer's tar to `rootfs`.
fn unpack_tar(reader: impl Read, rootfs: &Path, layer: &str) -> Result<(), ImageError> {
    let err = |source| ImageError::Unpack {
        layer: layer.to_owned(),
        source,
    };
    let escape = |path: &Path| ImageError::Escape {
        layer: layer.to_owned(),
        path: path.display().to_string(),
    };
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(nix::unistd::geteuid().is_root());
    archive.set_overwrite(true);
    // What this layer added: whiteouts only hide what lower layers have.
    let mut added: HashSet<PathBuf> = HashSet::new();
    for entry in archive.entries().map_err(err)? {
        let mut entry = entry.map_err(err)?;
        let path = entry.path().map_err(err)?.into_owned();
        let rel = relative(&path).ok_or_else(|| escape(&path))?;
        let (Some(name), Some(parent)) = (rel.file_name(), rel.parent()) else {
            continue; // the layer's root itself
        };
        if name == OPAQUE_MARKER {
            if let Some(dir) = inside(rootfs, parent) {
                for child in fs::read_dir(&dir).map_err(err)? {
                    let child = child.map_err(err)?;
                    let child_rel = parent.join(child.file_name());
                    if !added.iter().any(|p| p.starts_with(&child_rel)) {
                        remove(&child.path()).map_err(err)?;
                    }
                }
            }
            continue;
        }
        if let Some(hidden) = name.as_bytes().strip_prefix(WHITEOUT_PREFIX) {
            // `.wh.`, `.wh..` and `.wh...` would hide a parent.
            if matches!(hidden, b"" | b"." | b"..") {
                return Err(escape(&path));
            }
            // `.wh..wh.*` other than the opaque marker are aufs internals.
            if !hidden.starts_with(WHITEOUT_PREFIX) {
                if let Some(dir) = inside(rootfs, parent) {
                    remove(&dir.join(OsStr::from_bytes(hidden))).map_err(err)?;
                }
            }
            continue;
        }
        let kind = entry.header().entry_type();
        if kind.is_hard_link() {
            let target = entry.link_name().map_err(err)?.unwrap_or_default();
            if relative(&target).is_none_or(|t| t.as_os_str().is_empty()) {
                return Err(escape(&target));
            }
        }
        if kind.is_character_special() || kind.is_block_special() || kind.is_fifo() {
            log::debug!(
                "layer {layer}: skipping the device or fifo {}",
                rel.display()
            );
            continue;
        }
        // What a lower layer has here gives way, unless both are
        // directories (as in overlayfs).
        if let Some(dir) = inside(rootfs, parent) {
            let existing = dir.join(name);
            let merge = kind.is_dir() && fs::symlink_metadata(&existing).is_ok_and(|m| m.is_dir());
            if !merge {
                remove(&existing).map_err(err)?;
            }
        }
        if !entry.unpack_in(rootfs).map_err(err)? {
            return Err(escape(&path));
        }
        added.insert(rel);
    }
    Ok(())
}

/// The file `rel` of the rootfs as text; empty if it is missing or reached
/// through a symlink.
fn read_etc(rootfs: &Path, rel: &str) -> String {
    inside(rootfs, Path::new(rel))
        .and_then(|path| fs::read_to_string(path).ok())
        .unwrap_or_default()
}

/// The uid and gid of a config's `User` (`user`, `uid`, `user:group`,
/// `uid:gid`, …), names looked up in the rootfs's /etc/passwd and
/// /etc/group; a uid alone gets its passwd entry's gid, else 0.
pub fn resolve_user(rootfs: &Path, user: &str) -> Result<(u32, u32), ImageError> {
    let (name, group) = match user.split_once(':') {
        Some((name, group)) => (name, Some(group)),
        None => (user, None),
    };
    let passwd = read_etc(rootfs, "etc/passwd");
    let entry = passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| f.len() >= 4)
        .find(|f| match name.parse::<u32>() {
            Ok(_) => f[2] == name,
            Err(_) => f[0] == name,
        });
    let uid = match name.parse::<u32>() {
        Ok(uid) => uid,
        Err(_) => entry
            .as_ref()
            .and_then(|f| f[2].parse().ok())
            .ok_or_else(|| ImageError::UnknownUser(name.to_owned()))?,
    };
    let gid = match group {
        None => entry.as_ref().and_then(|f| f[3].parse().ok()).unwrap_or(0),
        Some(group) => match group.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => read_etc(rootfs, "etc/group")
                .lines()
                .map(|l| l.split(':').collect::<Vec<_>>())
                .find(|f| f.len() >= 3 && f[0] == group)
                .and_then(|f| f[2].parse().ok())
                .ok_or_else(|| ImageError::UnknownGroup(group.to_owned()))?,
        },
    };
    Ok((uid, gid))
}

/// Builds OCI image layouts for tests.
#[cfg(any(test, feature = "test-utils"))]
pub mod fixture {
    use std::io::Write;

    use serde_json::{json, Value};

    use super::*;

    /// An OCI image layout being written in a directory.
    #[derive(Debug)]
    pub struct LayoutBuilder {
        root: PathBuf,
    }

    impl LayoutBuilder {
        /// Starts a layout in `root` (created if missing).
        pub fn new(root: &Path) -> io::Result<Self> {
            fs::create_dir_all(root.join("blobs/sha256"))?;
            fs::write(root.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)?;
            Ok(Self {
                root: root.to_owned(),
            })
        }

        /// Stores a blob; returns its descriptor.
        pub fn blob(&self, media_type: &str, data: &[u8]) -> io::Result<Value> {
            let hex = format!("{:x}", Sha256::digest(data));
            fs::write(self.root.join("blobs/sha256").join(&hex), data)?;
            Ok(json!({
                "mediaType": media_type,
                "digest": format!("sha256:{hex}"),
                "size": data.len(),
            }))
        }

        /// Stores a layer made of the tar `tar`, compressed with
        /// `compression`; returns its descriptor.
        pub fn layer(&self, tar: &[u8], compression: Compression) -> io::Result<Value> {
            let data = match compression {
                Compression::None => tar.to_vec(),
                Compression::Gzip => {
                    let mut gz =
                        flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                    gz.write_all(tar)?;
                    gz.finish()?
                }
                Compression::Zstd => zstd::encode_all(tar, 1)?,
            };
            self.blob(compression.media_type().as_ref(), &data)
        }

        /// Stores an image: a config whose `config` section is `process`
        /// (`Entrypoint`, `Cmd`, `Env`, …) for this host's platform, and a
        /// manifest of it and `layers`; returns the manifest's descriptor.
        pub fn image(&self, process: Value, layers: &[Value]) -> io::Result<Value> {
            let (os, arch) = host_platform();
            let config = json!({
                "architecture": arch.to_string(),
                "os": os.to_string(),
                "config": process,
                "rootfs": {"type": "layers", "diff_ids": []},
            });
            let config = self.blob(
                "application/vnd.oci.image.config.v1+json",
                config.to_string().as_bytes(),
            )?;
            let manifest = json!({
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": config,
                "layers": layers,
            });
            self.blob(
                "application/vnd.oci.image.manifest.v1+json",
                manifest.to_string().as_bytes(),
            )
        }

        /// Stores an image index of `manifests` (as a blob); returns its
        /// descriptor.
        pub fn nested_index(&self, manifests: &[Value]) -> io::Result<Value> {
            self.blob(
                "application/vnd.oci.image.index.v1+json",
                index_json(manifests).to_string().as_bytes(),
            )
        }

        /// Writes index.json listing `manifests`.
        pub fn finish(&self, manifests: &[Value]) -> io::Result<()> {
            fs::write(
                self.root.join("index.json"),
                index_json(manifests).to_string(),
            )
        }
    }

    fn index_json(manifests: &[Value]) -> Value {
        json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": manifests,
        })
    }

    /// `desc` with the ref.name annotation `tag`.
    pub fn tagged(mut desc: Value, tag: &str) -> Value {
        desc["annotations"] = json!({ ANNOTATION_REF_NAME: tag });
        desc
    }

    /// `desc` with the platform `os`/`arch`.
    pub fn for_platform(mut desc: Value, os: &str, arch: &str) -> Value {
        desc["platform"] = json!({"os": os, "architecture": arch});
        desc
    }

    /// A tar of the directory `dir`'s content (as `ctr images export`
    /// writes a layout, or as a layer).
    pub fn tar_dir(dir: &Path) -> io::Result<Vec<u8>> {
        let mut tar = tar::Builder::new(Vec::new());
        tar.follow_symlinks(false);
        tar.append_dir_all(".", dir)?;
        tar.into_inner()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::fixture::*;
    use super::*;

    /// A tar of files (`path`, content), directories (`path/`) and
    /// symlinks (`path -> target` as content `@target`).
    fn layer_tar(entries: &[(&str, &str)]) -> Vec<u8> {
        let mut tar = tar::Builder::new(Vec::new());
        for (path, content) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_mtime(1);
            h.set_uid(nix::unistd::geteuid().as_raw().into());
            h.set_gid(nix::unistd::getegid().as_raw().into());
            if let Some(dir) = path.strip_suffix('/') {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                tar.append_data(&mut h, dir, io::empty()).unwrap();
            } else if let Some(target) = content.strip_prefix('@') {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                tar.append_link(&mut h, path, target).unwrap();
            } else {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(0o644);
                h.set_size(content.len() as u64);
                tar.append_data(&mut h, path, content.as_bytes()).unwrap();
            }
        }
        tar.into_inner().unwrap()
    }

    /// A tar with one file whose name is written raw (the builder refuses
    /// `..` and absolute names).
    fn raw_name_tar(name: &str, content: &str) -> Vec<u8> {
        let mut h = tar::Header::new_old();
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_mode(0o644);
        h.set_size(content.len() as u64);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        let mut tar = tar::Builder::new(Vec::new());
        tar.append(&h, content.as_bytes()).unwrap();
        tar.into_inner().unwrap()
    }

    struct Fixture {
        dir: tempfile::TempDir,
        layout: LayoutBuilder,
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let layout = LayoutBuilder::new(&dir.path().join("layout")).unwrap();
            Self { dir, layout }
        }

        fn layer(&self, entries: &[(&str, &str)], compression: Compression) -> Value {
            self.layout.layer(&layer_tar(entries), compression).unwrap()
        }

        fn reference(&self) -> String {
            self.dir.path().join("layout").display().to_string()
        }

        fn rootfs(&self) -> PathBuf {
            self.dir.path().join("rootfs")
        }

        fn unpack(&self, suffix: &str) -> Result<ImageProcess, ImageError> {
            unpack(&format!("{}{suffix}", self.reference()), &self.rootfs())
        }

        fn read(&self, rel: &str) -> Option<String> {
            fs::read_to_string(self.rootfs().join(rel)).ok()
        }
    }

    #[test]
    fn layers_apply_in_order_with_whiteouts_and_opaque_dirs() {
        let f = Fixture::new();
        let base = f.layer(
            &[
                ("etc/", ""),
                ("etc/keep", "base"),
                ("etc/gone", "base"),
                ("etc/replaced", "base"),
                ("opaque/", ""),
                ("opaque/old", "base"),
                ("opaque/sub/", ""),
                ("opaque/sub/deep", "base"),
                ("link", "@etc/keep"),
                ("was-dir/", ""),
                ("was-dir/inner", "base"),
            ],
            Compression::Gzip,
        );
        let top = f.layer(
            &[
                ("etc/.wh.gone", ""),
                ("etc/replaced", "top"),
                ("opaque/new", "top"),
                ("opaque/.wh..wh..opq", ""),
                ("link", "top is a file now"),
                ("was-dir", "a file now"),
            ],
            Compression::None,
        );
        let manifest = f.layout.image(json!({}), &[base, top]).unwrap();
        f.layout.finish(&[manifest]).unwrap();
        f.unpack("").unwrap();

        assert_eq!(f.read("etc/keep").as_deref(), Some("base"));
        assert_eq!(f.read("etc/replaced").as_deref(), Some("top"));
        assert!(!f.rootfs().join("etc/gone").exists());
        assert!(!f.rootfs().join("etc/.wh.gone").exists());
        // The opaque dir keeps only what the top layer put there.
        let mut names: Vec<_> = fs::read_dir(f.rootfs().join("opaque"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["new"]);
        // A file replaces a symlink (not written through it) and a dir.
        assert_eq!(f.read("link").as_deref(), Some("top is a file now"));
        assert_eq!(f.read("etc/keep").as_deref(), Some("base"));
        assert_eq!(f.read("was-dir").as_deref(), Some("a file now"));
    }

    #[test]
    fn zstd_layers_unpack() {
        let f = Fixture::new();
        let layer = f.layer(&[("hello", "zstd")], Compression::Zstd);
        let manifest = f.layout.image(json!({}), &[layer]).unwrap();
        f.layout.finish(&[manifest]).unwrap();
        f.unpack("").unwrap();
        assert_eq!(f.read("hello").as_deref(), Some("zstd"));
    }

    #[test]
    fn the_config_gives_the_process() {
        let f = Fixture::new();
        let layer = f.layer(
            &[
                ("etc/", ""),
                (
                    "etc/passwd",
                    "root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/app:/bin/sh\n",
                ),
                ("etc/group", "root:x:0:\nstaff:x:50:\n"),
            ],
            Compression::Gzip,
        );
        let process = json!({
            "Entrypoint": ["/bin/app", "--flag"],
            "Cmd": ["serve"],
            "Env": ["PATH=/app/bin", "MODE=image"],
            "WorkingDir": "/app",
            "User": "app",
        });
        let manifest = f.layout.image(process, &[layer]).unwrap();
        f.layout.finish(&[manifest]).unwrap();
        let got = f.unpack("").unwrap();
        assert_eq!(got.entrypoint, ["/bin/app", "--flag"]);
        assert_eq!(got.cmd, ["serve"]);
        assert_eq!(got.env, ["PATH=/app/bin", "MODE=image"]);
        assert_eq!(got.working_dir.as_deref(), Some("/app"));
        assert_eq!(got.user, Some((1000, 1001)));
        assert_eq!(got.args(&[]), ["/bin/app", "--flag", "serve"]);
        assert_eq!(got.args(&["x".into()]), ["/bin/app", "--flag", "x"]);

        let rootfs = f.rootfs();
        assert_eq!(resolve_user(&rootfs, "app:staff").unwrap(), (1000, 50));
        assert_eq!(resolve_user(&rootfs, "1000").unwrap(), (1000, 1001));
        assert_eq!(resolve_user(&rootfs, "7:8").unwrap(), (7, 8));
        assert_eq!(resolve_user(&rootfs, "42").unwrap(), (42, 0));
        assert!(matches!(
            resolve_user(&rootfs, "nobody"),
            Err(ImageError::UnknownUser(u)) if u == "nobody"
        ));
        assert!(matches!(
            resolve_user(&rootfs, "app:wheel"),
            Err(ImageError::UnknownGroup(g)) if g == "wheel"
        ));
    }

    #[test]
    fn a_tag_picks_the_image_and_without_one_several_are_ambiguous() {
        let f = Fixture::new();
        let one = f.layer(&[("which", "one")], Compression::Gzip);
        let two = f.layer(&[("which", "two")], Compression::Gzip);
        let one = f.layout.image(json!({}), &[one]).unwrap();
        let two = f.layout.image(json!({}), &[two]).unwrap();
        f.layout
            .finish(&[tagged(one, "v1"), tagged(two, "v2")])
            .unwrap();

        f.unpack(":v2").unwrap();
        assert_eq!(f.read("which").as_deref(), Some("two"));
        fs::remove_dir_all(f.rootfs()).unwrap();
        f.unpack(":v1").unwrap();
        assert_eq!(f.read("which").as_deref(), Some("one"));
        fs::remove_dir_all(f.rootfs()).unwrap();

        match f.unpack("").unwrap_err() {
            ImageError::Ambiguous(choices) => assert_eq!(choices, ["v1", "v2"]),
            other => panic!("{other}"),
        }
        match f.unpack(":v3").unwrap_err() {
            ImageError::NoSuchTag { tag, choices } => {
                assert_eq!(tag, "v3");
                assert_eq!(choices, ["v1", "v2"]);
            }
            other => panic!("{other}"),
        }
    }

    #[test]
    fn a_nested_index_resolves_to_this_hosts_platform() {
        let f = Fixture::new();
        let (os, arch) = host_platform();
        let other = f.layer(&[("arch", "other")], Compression::Gzip);
        let ours = f.layer(&[("arch", "ours")], Compression::Gzip);
        let other = f.layout.image(json!({}), &[other]).unwrap();
        let ours = f.layout.image(json!({}), &[ours]).unwrap();
        let list = f
            .layout
            .nested_index(&[
                for_platform(other, "linux", "s390x"),
                for_platform(ours, &os.to_string(), &arch.to_string()),
            ])
            .unwrap();
        f.layout.finish(&[tagged(list, "latest")]).unwrap();
        f.unpack(":latest").unwrap();
        assert_eq!(f.read("arch").as_deref(), Some("ours"));
    }

    #[test]
    fn a_tar_of_the_layout_works_like_the_directory() {
        let f = Fixture::new();
        let layer = f.layer(&[("from", "tar")], Compression::Gzip);
        let manifest = f.layout.image(json!({"Cmd": ["sh"]}), &[layer]).unwrap();
        f.layout.finish(&[tagged(manifest, "latest")]).unwrap();
        let tar = f.dir.path().join("image.tar");
        fs::write(&tar, tar_dir(&f.dir.path().join("layout")).unwrap()).unwrap();
        let got = unpack(&format!("{}:latest", tar.display()), &f.rootfs()).unwrap();
        assert_eq!(got.cmd, ["sh"]);
        assert_eq!(f.read("from").as_deref(), Some("tar"));
    }

    #[test]
    fn a_blob_that_does_not_match_its_digest_is_refused() {
        let f = Fixture::new();
        let layer = f.layer(&[("x", "good")], Compression::Gzip);
        let digest = layer["digest"].as_str().unwrap().to_owned();
        // Same size, different content.
        let path = f.dir.path().join("layout/blobs/sha256").join(&digest[7..]);
        let mut data = fs::read(&path).unwrap();
        let last = data.len() - 1;
        data[last] ^= 0xff;
        fs::write(&path, data).unwrap();
        let manifest = f.layout.image(json!({}), &[layer]).unwrap();
        f.layout.finish(&[manifest]).unwrap();
        match f.unpack("").unwrap_err() {
            ImageError::DigestMismatch { expected, actual } => {
                assert_eq!(expected, digest);
                assert_ne!(format!("sha256:{actual}"), digest);
            }
            other => panic!("{other}"),
        }
    }

    #[test]
    fn a_manifest_that_does_not_match_its_digest_is_refused() {
        let f = Fixture::new();
        let layer = f.layer(&[("x", "y")], Compression::None);
        let manifest = f.layout.image(json!({}), &[layer]).unwrap();
        let digest = manifest["digest"].as_str().unwrap();
        let path = f.dir.path().join("layout/blobs/sha256").join(&digest[7..]);
        fs::write(path, "{}").unwrap();
        f.layout.finish(&[manifest]).unwrap();
        assert!(matches!(
            f.unpack("").unwrap_err(),
            ImageError::DigestMismatch { .. }
        ));
        assert!(!f.rootfs().exists(), "nothing unpacked before the layers");
    }

    #[test]
    fn entries_outside_the_rootfs_are_refused() {
        for name in ["../escaped", "a/../../escaped", "/abs"] {
            let f = Fixture::new();
            let layer = f
                .layout
                .layer(&raw_name_tar(name, "evil"), Compression::None)
                .unwrap();
            let manifest = f.layout.image(json!({}), &[layer]).unwrap();
            f.layout.finish(&[manifest]).unwrap();
            match f.unpack("").unwrap_err() {
                ImageError::Escape { path, .. } => assert_eq!(path, name),
                other => panic!("{name}: {other}"),
            }
            assert!(!f.dir.path().join("escaped").exists(), "{name}");
        }
    }

    #[test]
    fn whiteouts_of_a_parent_are_refused() {
        for name in [".wh...", "etc/.wh..", ".wh."] {
            let f = Fixture::new();
            let base = f.layer(&[("etc/", ""), ("etc/keep", "base")], Compression::None);
            let layer = f
                .layout
                .layer(&raw_name_tar(name, ""), Compression::None)
                .unwrap();
            let manifest = f.layout.image(json!({}), &[base, layer]).unwrap();
            f.layout.finish(&[manifest]).unwrap();
            match f.unpack("").unwrap_err() {
                ImageError::Escape { path, .. } => assert_eq!(path, name),
                other => panic!("{name}: {other}"),
            }
            assert!(f.dir.path().join("layout/index.json").exists(), "{name}");
            assert_eq!(f.read("etc/keep").as_deref(), Some("base"), "{name}");
        }
    }

    #[test]
    fn symlinks_out_of_the_rootfs_are_not_followed() {
        let f = Fixture::new();
        let outside = f.dir.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("victim"), "safe").unwrap();
        let out = outside.display().to_string();
        let links = f.layer(
            &[("out", &format!("@{out}")), ("dotdot", "@../outside")],
            Compression::None,
        );
        let writes = f.layer(&[("out/victim", "pwned")], Compression::None);
        let whiteouts = f.layer(
            &[("out/.wh.victim", ""), ("dotdot/.wh..wh..opq", "")],
            Compression::None,
        );
        let manifest = f
            .layout
            .image(json!({}), &[links.clone(), whiteouts])
            .unwrap();
        f.layout.finish(&[manifest]).unwrap();
        // Whiteouts under a symlink touch nothing.
        f.unpack("").unwrap();
        assert_eq!(fs::read_to_string(outside.join("victim")).unwrap(), "safe");

        fs::remove_dir_all(f.rootfs()).unwrap();
        let manifest = f.layout.image(json!({}), &[links, writes]).unwrap();
        f.layout.finish(&[manifest]).unwrap();
        let err = f.unpack("").unwrap_err();
        assert!(matches!(err, ImageError::Unpack { .. }), "{err}");
        assert_eq!(fs::read_to_string(outside.join("victim")).unwrap(), "safe");
    }

    #[test]
    fn a_hard_link_out_of_the_rootfs_is_refused() {
        let f = Fixture::new();
        let mut tar = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Link);
        h.set_size(0);
        tar.append_link(&mut h, "passwd", "/etc/passwd").unwrap();
        let layer = f
            .layout
            .layer(&tar.into_inner().unwrap(), Compression::None)
            .unwrap();
        let manifest = f.layout.image(json!({}), &[layer]).unwrap();
        f.layout.finish(&[manifest]).unwrap();
        match f.unpack("").unwrap_err() {
            ImageError::Escape { path, .. } => assert_eq!(path, "/etc/passwd"),
            other => panic!("{other}"),
        }
    }

    #[test]
    fn a_directory_without_index_json_is_not_a_layout() {
        let f = Fixture::new();
        match f.unpack("").unwrap_err() {
            ImageError::MissingIndex(path) => assert_eq!(path, f.dir.path().join("layout")),
            other => panic!("{other}"),
        }
        let missing = f.dir.path().join("nope");
        assert!(matches!(
            unpack(&missing.display().to_string(), &f.rootfs()),
            Err(ImageError::NotFound(p)) if p == missing
        ));
        assert!(!f.rootfs().exists());
    }

    #[test]
    fn an_unknown_layer_type_is_refused() {
        let f = Fixture::new();
        let layer = f.layout.blob("application/x-squashfs", b"hsqs").unwrap();
        let manifest = f.layout.image(json!({}), &[layer]).unwrap();
        f.layout.finish(&[manifest]).unwrap();
        assert!(matches!(
            f.unpack("").unwrap_err(),
            ImageError::UnsupportedLayer { media_type, .. } if media_type == "application/x-squashfs"
        ));
    }

    #[test]
    fn references_split_off_a_tag_only_when_the_path_needs_it() {
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("img");
        let colon = dir.path().join("img:odd");
        fs::create_dir(&plain).unwrap();
        fs::create_dir(&colon).unwrap();
        let s = |p: &Path| p.display().to_string();
        assert_eq!(split_reference(&s(&plain)), (plain.clone(), None));
        assert_eq!(split_reference(&s(&colon)), (colon.clone(), None));
        let tagged = format!("{}:v1", s(&plain));
        assert_eq!(split_reference(&tagged), (plain.clone(), Some("v1")));
        let missing = format!("{}/x:v1", s(dir.path()));
        assert_eq!(split_reference(&missing), (PathBuf::from(&missing), None));
    }
}
