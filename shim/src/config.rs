//! The shim's configuration: `/etc/skiff/config.toml`, overridden by the
//! `SKIFF_CONFIG` environment variable and by containerd's runtime options
//! (`config_path` of `runtimeoptions.v1.Options`).
//!
//! ```toml
//! handler = "linux"      # or "vm"
//! vcpus = 1
//! memory_mib = 256
//! max_vcpus = 4          # `vm`: most vCPUs a pod's CPU limit gets (unset: the host's CPUs)
//! max_memory_mib = 4096  # `vm`: most memory a pod's limit gets, guest's own included (unset: the host's)
//! kernel = "/usr/share/skiff/vmlinux"
//! initrd = "/usr/share/skiff/initramfs.cpio"
//! log_level = "info"     # off, error, warn, info, debug, trace
//! agent_path = "/usr/local/bin/skiff-agent"
//! vm_ready_timeout_secs = 300  # `vm`: bound on boot + agent's first answer
//! kernel_params = ""           # `vm`: appended to the guest kernel command line
//! cpu_template = "pvm-compat"  # `vm`: default | pvm-compat (unset: what `skiff check` picks)
//! vm_rootfs = "virtio-fs"      # `vm`: "virtio-fs" (rootfs and volumes shared live) or "block" (ext4 copies on virtio-blk)
//! fs_cache = "auto"            # `vm`, virtio-fs: guest caching of names/attributes: none, auto (1 s), always
//! vm_disks = 4                 # `vm`, `vm_rootfs = "block"`: virtio-blk slots: most containers a pod's VM holds at once
//! vmm = "process"              # `vm`: "process" (a jailed VMM child process) or "inline" (VMM threads in the shim)
//! vmm_uid = 65534              # `vm`, `vmm = "process"`: the VMM process's user
//! vmm_gid = 65534              # `vm`, `vmm = "process"`: the VMM process's group
//! seccomp = true               # `vm`: per-thread seccomp filters in the VMM (false: debugging only)
//! template = true              # `vm`: start VMs from a snapshot of a booted one (VM templates)
//! template_dir = "/var/lib/skiff/templates"  # `vm`: where templates are kept
//! ```
//!
//! `seccomp = false` runs the VMM's vCPU, device and control threads
//! without their seccomp filters (`crate::vmm::seccomp`; `skiff check`
//! lists them): only to find out which system call a filter denied. Every
//! VM start then logs a warning that the filters are off.
//!
//! Unknown keys and bad values are errors; `start` reports them, so
//! containerd shows them on the failing `ctr run`.

use std::path::{Path, PathBuf};

use protobuf::Message;
use serde::Deserialize;

/// The default configuration file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/skiff/config.toml";
/// Environment variable naming another configuration file.
pub const CONFIG_ENV: &str = "SKIFF_CONFIG";

/// Errors reading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read the skiff config {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown keys / bad types.
    #[error("invalid skiff config {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (names the key and line).
        message: String,
    },
    /// A value is out of range.
    #[error("invalid skiff config {path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// containerd's runtime options could not be decoded.
    #[error("cannot decode containerd's runtime options: {0}")]
    Options(String),
}

/// Which sandbox handler runs the containers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HandlerKind {
    /// The agent as a sandboxed host process.
    Linux,
    /// The agent inside a skiff micro-VM.
    Vm,
}

/// Where the VMM runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmmMode {
    /// A jailed child process of the shim (the default): its own
    /// namespaces, cgroup and user, no capabilities.
    Process,
    /// Threads in the shim's own process (the smallest footprint; the
    /// seccomp filters are then a speed bump, not a boundary).
    Inline,
}

/// How a micro-VM gets its containers' rootfs and volumes (`vm` handler).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum VmRootfs {
    /// Served live from the host through one virtio-fs share per pod (the
    /// default): no copies, writes land on the host, read-write and
    /// single-file binds work.
    #[default]
    #[serde(rename = "virtio-fs")]
    VirtioFs,
    /// Copied into an ext4 image per container rootfs and read-only volume,
    /// each on a virtio-blk disk (`vm_disks` slots): writes stay in the
    /// copy; read-write and file binds are refused.
    #[serde(rename = "block")]
    Block,
}

/// Log verbosity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// Nothing.
    Off,
    /// Errors only.
    Error,
    /// Warnings and errors.
    Warn,
    /// Informational (default).
    Info,
    /// Debugging.
    Debug,
    /// Everything.
    Trace,
}

impl LogLevel {
    /// The `log` crate's filter.
    pub fn filter(self) -> log::LevelFilter {
        match self {
            Self::Off => log::LevelFilter::Off,
            Self::Error => log::LevelFilter::Error,
            Self::Warn => log::LevelFilter::Warn,
            Self::Info => log::LevelFilter::Info,
            Self::Debug => log::LevelFilter::Debug,
            Self::Trace => log::LevelFilter::Trace,
        }
    }

    /// The name the agent's `--log-level` takes.
    pub fn name(self) -> &'static str {
        match self {
            Self::Off => "error",
            Self::Error => "error",
            Self::Warn => "warn",
            Self::Info => "info",
            Self::Debug => "debug",
            Self::Trace => "trace",
        }
    }
}

/// The shim's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The sandbox handler.
    pub handler: HandlerKind,
    /// vCPUs of the VM (`vm` handler).
    pub vcpus: u32,
    /// Guest memory of the VM in MiB (`vm` handler): a pod without a
    /// memory limit gets this; one with a limit gets this plus the limit.
    pub memory_mib: u32,
    /// Most vCPUs a pod's CPU limit gets its VM (`vm` handler); unset, the
    /// host's CPU count. See [`crate::sandbox::size`].
    pub max_vcpus: Option<u32>,
    /// Most guest memory, MiB, a pod's memory limit gets its VM (`vm`
    /// handler); unset, the host's memory.
    pub max_memory_mib: Option<u32>,
    /// Guest kernel (`vm` handler).
    pub kernel: Option<PathBuf>,
    /// Guest initramfs (`vm` handler).
    pub initrd: Option<PathBuf>,
    /// The shim's (and the agent's) log level.
    pub log_level: LogLevel,
    /// The agent binary; default: `skiff-agent` next to the shim binary,
    /// then on `PATH`.
    pub agent_path: Option<PathBuf>,
    /// Bound, in seconds, on booting the VM and reaching its agent (`vm`
    /// handler); default [`DEFAULT_VM_READY_TIMEOUT_SECS`].
    pub vm_ready_timeout_secs: Option<u64>,
    /// Extra guest kernel parameters, appended to what `skiff check` picks
    /// for this host (`vm` handler), e.g. `"print-fatal-signals=1"`.
    pub kernel_params: String,
    /// The CPUID template (`vm` handler): `default` or `pvm-compat`;
    /// unset, the one `skiff check` picks for this host.
    pub cpu_template: Option<String>,
    /// virtio-blk slots of the VM (`vm` handler): each container of the
    /// pod takes one for its rootfs while it exists, so this bounds the
    /// containers a pod holds at once. Empty slots cost the guest a probe
    /// at boot and the host one idle device.
    pub vm_disks: u32,
    /// How the VM gets container rootfs and volumes (`vm` handler).
    pub vm_rootfs: VmRootfs,
    /// How long the guest may cache the virtio-fs share's names and
    /// attributes (`vm_rootfs = "virtio-fs"`): `none`, `auto` (1 s, the
    /// default) or `always`.
    pub fs_cache: crate::vmm::fs::CacheMode,
    /// Where the VMM runs (`vm` handler).
    pub vmm: VmmMode,
    /// The jailed VMM's user (`vmm = "process"`).
    pub vmm_uid: u32,
    /// The jailed VMM's group (`vmm = "process"`).
    pub vmm_gid: u32,
    /// Whether the VMM's threads install their seccomp filters (`vm`
    /// handler). `false` is for debugging only.
    pub seccomp: bool,
    /// Whether VMs start from a template (`vm` handler): the first VM of a
    /// configuration boots and is snapshotted once its agent answers;
    /// later ones are restored from that snapshot.
    pub template: bool,
    /// Where templates are kept, one directory per configuration.
    pub template_dir: PathBuf,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            handler: HandlerKind::Linux,
            vcpus: 1,
            memory_mib: 256,
            max_vcpus: None,
            max_memory_mib: None,
            kernel: None,
            initrd: None,
            log_level: LogLevel::Info,
            agent_path: None,
            vm_ready_timeout_secs: None,
            kernel_params: String::new(),
            cpu_template: None,
            vm_disks: DEFAULT_VM_DISKS,
            vm_rootfs: VmRootfs::VirtioFs,
            fs_cache: crate::vmm::fs::CacheMode::default(),
            vmm: VmmMode::Process,
            vmm_uid: NOBODY,
            vmm_gid: NOBODY,
            seccomp: true,
            template: true,
            template_dir: PathBuf::from(DEFAULT_TEMPLATE_DIR),
        }
    }
}

/// Where templates are kept by default.
pub const DEFAULT_TEMPLATE_DIR: &str = "/var/lib/skiff/templates";

/// Default bound on a VM's boot and its agent's first answer: guest boots
/// take 60 to 120 s on a PVM host.
pub const DEFAULT_VM_READY_TIMEOUT_SECS: u64 = 300;

/// The default user and group of a jailed VMM (`nobody`).
pub const NOBODY: u32 = 65534;

/// Default number of virtio-blk slots.
pub const DEFAULT_VM_DISKS: u32 = 4;
/// Most virtio-blk slots (the VM has 19 virtio devices; vsock takes one).
pub const MAX_VM_DISKS: u32 = 16;

/// Most vCPUs a sandbox may have.
pub const MAX_VCPUS: u32 = 64;
/// Smallest guest memory, MiB.
pub const MIN_MEMORY_MIB: u32 = 64;
/// Largest guest memory, MiB.
pub const MAX_MEMORY_MIB: u32 = 1 << 20;

/// The host's memory (`MemTotal`), MiB.
fn host_memory_mib() -> Option<u32> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    u32::try_from(kib / 1024).ok()
}

impl Config {
    /// Parses and validates TOML text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|err| ConfigError::Parse {
            path: path.to_owned(),
            message: err.to_string().trim().replace('\n', " "),
        })?;
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        };
        if !(1..=MAX_VCPUS).contains(&self.vcpus) {
            return Err(invalid(format!(
                "vcpus = {} is out of range (1 to {MAX_VCPUS})",
                self.vcpus
            )));
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(invalid(format!(
                "memory_mib = {} is out of range ({MIN_MEMORY_MIB} to {MAX_MEMORY_MIB})",
                self.memory_mib
            )));
        }
        if let Some(max) = self.max_vcpus {
            if !(self.vcpus..=MAX_VCPUS).contains(&max) {
                return Err(invalid(format!(
                    "max_vcpus = {max} is out of range (vcpus = {} to {MAX_VCPUS})",
                    self.vcpus
                )));
            }
        }
        if let Some(max) = self.max_memory_mib {
            if !(self.memory_mib..=MAX_MEMORY_MIB).contains(&max) {
                return Err(invalid(format!(
                    "max_memory_mib = {max} is out of range (memory_mib = {} to {MAX_MEMORY_MIB})",
                    self.memory_mib
                )));
            }
        }
        for (key, value) in [
            ("kernel", &self.kernel),
            ("initrd", &self.initrd),
            ("agent_path", &self.agent_path),
        ] {
            if let Some(p) = value {
                if !p.is_absolute() {
                    return Err(invalid(format!(
                        "{key} = {:?} must be an absolute path",
                        p.display()
                    )));
                }
            }
        }
        if let Some(t) = &self.cpu_template {
            if !["default", "pvm-compat"].contains(&t.as_str()) {
                return Err(invalid(format!(
                    "cpu_template = {t:?} is unknown (default, pvm-compat)"
                )));
            }
        }
        if self.kernel_params.contains('\n') {
            return Err(invalid("kernel_params must be one line".into()));
        }
        if !self.template_dir.is_absolute() {
            return Err(invalid(format!(
                "template_dir = {:?} is not an absolute path",
                self.template_dir
            )));
        }
        if !(1..=MAX_VM_DISKS).contains(&self.vm_disks) {
            return Err(invalid(format!(
                "vm_disks = {} is out of range (1 to {MAX_VM_DISKS})",
                self.vm_disks
            )));
        }
        if self.vmm_uid == 0 || self.vmm_gid == 0 {
            return Err(invalid(format!(
                "vmm_uid = {} / vmm_gid = {}: the jailed VMM must not run as root",
                self.vmm_uid, self.vmm_gid
            )));
        }
        if self.vm_ready_timeout_secs == Some(0) {
            return Err(invalid("vm_ready_timeout_secs must be at least 1".into()));
        }
        Ok(())
    }

    /// The most vCPUs a pod's VM gets: `max_vcpus`, else the host's CPU
    /// count; never less than `vcpus`.
    pub fn max_vcpus(&self) -> u32 {
        self.max_vcpus
            .unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map_or(1, |n| u32::try_from(n.get()).unwrap_or(MAX_VCPUS))
            })
            .clamp(self.vcpus, MAX_VCPUS)
    }

    /// The most guest memory a pod's VM gets, MiB: `max_memory_mib`, else
    /// the host's memory; never less than `memory_mib`.
    pub fn max_memory_mib(&self) -> u32 {
        self.max_memory_mib
            .or_else(host_memory_mib)
            .unwrap_or(self.memory_mib)
            .clamp(self.memory_mib, MAX_MEMORY_MIB)
    }

    /// The bound on a VM's boot and its agent's first answer.
    pub fn vm_ready_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(
            self.vm_ready_timeout_secs
                .unwrap_or(DEFAULT_VM_READY_TIMEOUT_SECS),
        )
    }

    /// Loads `path`; a missing file is an error.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Resolves the configuration: `options_path` (containerd's runtime
    /// options) if given, else `$SKIFF_CONFIG`, else
    /// `/etc/skiff/config.toml` if it exists, else the defaults. Returns
    /// the file used, if any.
    pub fn resolve(options_path: Option<&Path>) -> Result<(Self, Option<PathBuf>), ConfigError> {
        let explicit = options_path.map(Path::to_owned).or_else(|| {
            std::env::var_os(CONFIG_ENV)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        });
        match explicit {
            Some(path) => Ok((Self::load(&path)?, Some(path))),
            None => {
                let default = Path::new(DEFAULT_CONFIG_PATH);
                if default.exists() {
                    Ok((Self::load(default)?, Some(default.to_owned())))
                } else {
                    Ok((Self::default(), None))
                }
            }
        }
    }
}

/// `config_path` from containerd's runtime options: a protobuf `Any`
/// holding `runtimeoptions.v1.Options` (`type_url` = 1, `config_path` = 2).
/// Empty input means no options.
pub fn config_path_from_options(any_bytes: &[u8]) -> Result<Option<PathBuf>, ConfigError> {
    if any_bytes.is_empty() {
        return Ok(None);
    }
    let any = protobuf::well_known_types::any::Any::parse_from_bytes(any_bytes)
        .map_err(|e| ConfigError::Options(e.to_string()))?;
    config_path_from_any(&any)
}

/// `config_path` from an already decoded options `Any` (CreateTaskRequest).
pub fn config_path_from_any(
    any: &protobuf::well_known_types::any::Any,
) -> Result<Option<PathBuf>, ConfigError> {
    if !any.type_url.ends_with("runtimeoptions.v1.Options") {
        // Other runtimes' option types (e.g. runc's) carry no config path.
        return Ok(None);
    }
    let mut input = protobuf::CodedInputStream::from_bytes(&any.value);
    let mut path = None;
    while !input
        .eof()
        .map_err(|e| ConfigError::Options(e.to_string()))?
    {
        let tag = input
            .read_raw_varint32()
            .map_err(|e| ConfigError::Options(e.to_string()))?;
        let (field, wire) = (tag >> 3, tag & 7);
        match (field, wire) {
            (2, 2) => {
                path = Some(
                    input
                        .read_string()
                        .map_err(|e| ConfigError::Options(e.to_string()))?,
                )
            }
            (_, wire) => {
                let wire = protobuf::rt::WireType::new(wire)
                    .ok_or_else(|| ConfigError::Options(format!("bad wire type {wire}")))?;
                input
                    .skip_field(wire)
                    .map_err(|e| ConfigError::Options(e.to_string()))?;
            }
        }
    }
    Ok(path.filter(|p| !p.is_empty()).map(PathBuf::from))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/t.toml"))
    }

    #[test]
    fn defaults_and_full_file() {
        assert_eq!(parse("").unwrap(), Config::default());
        let c = parse(
            "handler = \"linux\"\nvcpus = 2\nmemory_mib = 512\nkernel = \"/k\"\n\
             initrd = \"/i\"\nlog_level = \"debug\"\nagent_path = \"/a\"\n",
        )
        .unwrap();
        assert_eq!(c.vcpus, 2);
        assert_eq!(c.memory_mib, 512);
        assert_eq!(c.log_level, LogLevel::Debug);
        assert_eq!(c.agent_path.as_deref(), Some(Path::new("/a")));
    }

    #[test]
    fn pod_size_bounds_are_checked_and_default_to_the_host() {
        let e = parse("vcpus = 2\nmax_vcpus = 1\n").unwrap_err().to_string();
        assert!(
            e.contains("max_vcpus = 1 is out of range (vcpus = 2"),
            "{e}"
        );
        let e = parse("max_memory_mib = 128\n").unwrap_err().to_string();
        assert!(
            e.contains("max_memory_mib = 128 is out of range (memory_mib = 256"),
            "{e}"
        );
        let c = parse("vcpus = 2\nmax_vcpus = 4\nmax_memory_mib = 1024\n").unwrap();
        assert_eq!((c.max_vcpus(), c.max_memory_mib()), (4, 1024));
        // Unset: the host's CPUs and memory, never below the base size.
        let c = parse("vcpus = 1\n").unwrap();
        let cpus = std::thread::available_parallelism().unwrap().get() as u32;
        assert_eq!(c.max_vcpus(), cpus.clamp(1, MAX_VCPUS));
        assert_eq!(Some(c.max_memory_mib()), host_memory_mib());
    }

    #[test]
    fn unknown_keys_and_bad_values_are_clear_errors() {
        let e = parse("vcpu = 2\n").unwrap_err().to_string();
        assert!(e.contains("unknown field `vcpu`"), "{e}");
        assert!(e.contains("/t.toml"), "{e}");
        let e = parse("vcpus = 0\n").unwrap_err().to_string();
        assert!(e.contains("vcpus = 0 is out of range"), "{e}");
        let e = parse("memory_mib = 1\n").unwrap_err().to_string();
        assert!(e.contains("memory_mib = 1 is out of range"), "{e}");
        let c = parse("vm_rootfs = \"block\"\nfs_cache = \"none\"\n").unwrap();
        assert_eq!(c.vm_rootfs, VmRootfs::Block);
        assert_eq!(c.fs_cache, crate::vmm::fs::CacheMode::None);
        assert_eq!(Config::default().vm_rootfs, VmRootfs::VirtioFs);
        assert_eq!(Config::default().fs_cache, crate::vmm::fs::CacheMode::Auto);
        let e = parse("vm_rootfs = \"9p\"\n").unwrap_err().to_string();
        assert!(e.contains("unknown variant `9p`"), "{e}");
        let e = parse("handler = \"kvm\"\n").unwrap_err().to_string();
        assert!(e.contains("unknown variant `kvm`"), "{e}");
        let e = parse("log_level = \"loud\"\n").unwrap_err().to_string();
        assert!(e.contains("unknown variant `loud`"), "{e}");
        let e = parse("agent_path = \"rel/agent\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("must be an absolute path"), "{e}");
        let e = parse("vcpus = \"two\"\n").unwrap_err().to_string();
        assert!(e.contains("invalid type"), "{e}");
        assert_eq!(
            parse("handler = \"vm\"\n").unwrap().handler,
            HandlerKind::Vm
        );
        let e = parse("vm_disks = 0\n").unwrap_err().to_string();
        assert!(e.contains("vm_disks = 0 is out of range (1 to 16)"), "{e}");
        assert_eq!(parse("vm_disks = 16\n").unwrap().vm_disks, 16);
        assert_eq!(Config::default().vmm, VmmMode::Process);
        assert!(Config::default().seccomp);
        assert!(!parse("seccomp = false\n").unwrap().seccomp);
        let e = parse("seccomp = \"off\"\n").unwrap_err().to_string();
        assert!(e.contains("seccomp"), "{e}");
        let c = parse("vmm = \"inline\"\nvmm_uid = 1000\nvmm_gid = 1001\n").unwrap();
        assert_eq!((c.vmm, c.vmm_uid, c.vmm_gid), (VmmMode::Inline, 1000, 1001));
        let e = parse("vmm = \"jailer\"\n").unwrap_err().to_string();
        assert!(e.contains("unknown variant `jailer`"), "{e}");
        let e = parse("vmm_uid = 0\n").unwrap_err().to_string();
        assert!(e.contains("vmm_uid = 0"), "{e}");
        let e = parse("vm_ready_timeout_secs = 0\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("vm_ready_timeout_secs must be at least 1"),
            "{e}"
        );
        assert_eq!(
            Config::default().vm_ready_timeout(),
            std::time::Duration::from_secs(DEFAULT_VM_READY_TIMEOUT_SECS)
        );
        assert_eq!(
            parse("vm_ready_timeout_secs = 9\n")
                .unwrap()
                .vm_ready_timeout(),
            std::time::Duration::from_secs(9)
        );
    }

    #[test]
    fn runtime_options_config_path() {
        assert_eq!(config_path_from_options(&[]).unwrap(), None);
        // runtimeoptions.v1.Options { type_url = "x", config_path = "/c.toml" }
        let mut value = vec![0x0a, 1, b'x', 0x12, 7];
        value.extend_from_slice(b"/c.toml");
        let any = protobuf::well_known_types::any::Any {
            type_url: "runtimeoptions.v1.Options".into(),
            value,
            ..Default::default()
        };
        let bytes = any.write_to_bytes().unwrap();
        assert_eq!(
            config_path_from_options(&bytes).unwrap(),
            Some(PathBuf::from("/c.toml"))
        );
        let other = protobuf::well_known_types::any::Any {
            type_url: "containerd.runc.v1.Options".into(),
            value: vec![0x12, 1, b'a'],
            ..Default::default()
        };
        assert_eq!(config_path_from_any(&other).unwrap(), None);
        assert!(config_path_from_options(&[0xff, 0xff]).is_err());
    }
}
