//! What a pod asks of its sandbox's size, and the VM size that gives.
//!
//! containerd's CRI plugin puts the pod's summed limits on the sandbox
//! container's spec as annotations (`io.kubernetes.cri.sandbox-cpu-quota`
//! and `-cpu-period`, `-memory` in bytes, from the kubelet's
//! `PodSandboxConfig.linux.resources`; Debian's containerd 1.6.20 writes
//! them). The `vm` handler
//! sizes the pod's VM from them, the way Kata's static sandbox sizing
//! does: as many vCPUs as the CPU limit rounds up to (at least the
//! config's `vcpus`), and the config's `memory_mib` for the guest itself
//! plus the pod's memory limit, both bounded by the config's `max_vcpus`
//! and `max_memory_mib`. A pod without limits gets the config's size.

use std::collections::HashMap;

use crate::config::Config;

/// The sandbox's CPU quota (µs per period), from the pod's CPU limit.
pub const CPU_QUOTA_ANNOTATION: &str = "io.kubernetes.cri.sandbox-cpu-quota";
/// The period the quota is per (µs).
pub const CPU_PERIOD_ANNOTATION: &str = "io.kubernetes.cri.sandbox-cpu-period";
/// The pod's memory limit in bytes.
pub const MEMORY_ANNOTATION: &str = "io.kubernetes.cri.sandbox-memory";

const MIB: u64 = 1 << 20;

/// An annotation whose value is not what CRI writes there.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("annotation {key} = {value:?} is not a non-negative integer")]
pub struct SizeError {
    /// The annotation.
    pub key: String,
    /// Its value.
    pub value: String,
}

/// What a pod asks for: CPUs and memory from its limits, `None` where it
/// has none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PodSize {
    /// The CPU limit, rounded up to whole CPUs.
    pub cpus: Option<u32>,
    /// The memory limit, rounded up to MiB.
    pub memory_mib: Option<u64>,
}

impl PodSize {
    /// Reads the CRI sandbox annotations; absent or zero values (CRI
    /// writes `0` for "no limit") give `None`.
    pub fn from_annotations(
        annotations: Option<&HashMap<String, String>>,
    ) -> Result<Self, SizeError> {
        let get = |key: &str| -> Result<Option<u64>, SizeError> {
            let Some(value) = annotations.and_then(|a| a.get(key)) else {
                return Ok(None);
            };
            // CRI writes quota -1 for "unlimited" on some paths.
            if value.trim() == "-1" {
                return Ok(None);
            }
            value
                .trim()
                .parse::<u64>()
                .map(|v| (v > 0).then_some(v))
                .map_err(|_| SizeError {
                    key: key.to_owned(),
                    value: value.clone(),
                })
        };
        let quota = get(CPU_QUOTA_ANNOTATION)?;
        let period = get(CPU_PERIOD_ANNOTATION)?;
        let cpus = match (quota, period) {
            (Some(q), Some(p)) => Some(u32::try_from(q.div_ceil(p)).unwrap_or(u32::MAX)),
            _ => None,
        };
        let memory_mib = get(MEMORY_ANNOTATION)?.map(|b| b.div_ceil(MIB));
        Ok(Self { cpus, memory_mib })
    }

    /// The VM for this pod under `config`: (vCPUs, memory in MiB).
    pub fn vm(&self, config: &Config) -> (u32, u64) {
        let vcpus = self
            .cpus
            .map_or(config.vcpus, |c| c.max(config.vcpus))
            .min(config.max_vcpus());
        let memory = self
            .memory_mib
            .map_or(u64::from(config.memory_mib), |m| {
                u64::from(config.memory_mib).saturating_add(m)
            })
            .min(u64::from(config.max_memory_mib()));
        (vcpus, memory)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn config(vcpus: u32, memory_mib: u32, max_vcpus: u32, max_memory_mib: u32) -> Config {
        Config {
            vcpus,
            memory_mib,
            max_vcpus: Some(max_vcpus),
            max_memory_mib: Some(max_memory_mib),
            ..Config::default()
        }
    }

    #[test]
    fn cri_limits_become_cpus_and_mib() {
        let a = annotations(&[
            (CPU_QUOTA_ANNOTATION, "150000"),
            (CPU_PERIOD_ANNOTATION, "100000"),
            (MEMORY_ANNOTATION, "134217729"),
        ]);
        let size = PodSize::from_annotations(Some(&a)).unwrap();
        assert_eq!(size.cpus, Some(2), "1.5 CPUs round up");
        assert_eq!(size.memory_mib, Some(129), "a byte over 128 MiB rounds up");
    }

    #[test]
    fn no_limits_and_zero_or_unlimited_values_are_none() {
        assert_eq!(PodSize::from_annotations(None).unwrap(), PodSize::default());
        let a = annotations(&[
            (CPU_QUOTA_ANNOTATION, "-1"),
            (CPU_PERIOD_ANNOTATION, "100000"),
            (MEMORY_ANNOTATION, "0"),
        ]);
        assert_eq!(
            PodSize::from_annotations(Some(&a)).unwrap(),
            PodSize::default()
        );
        // A quota without a period says nothing.
        let a = annotations(&[(CPU_QUOTA_ANNOTATION, "100000")]);
        assert_eq!(PodSize::from_annotations(Some(&a)).unwrap().cpus, None);
    }

    #[test]
    fn garbage_is_a_typed_error() {
        let a = annotations(&[(MEMORY_ANNOTATION, "lots")]);
        let err = PodSize::from_annotations(Some(&a)).unwrap_err();
        assert_eq!(err.key, MEMORY_ANNOTATION);
        assert!(err.to_string().contains("\"lots\""), "{err}");
        let a = annotations(&[(CPU_PERIOD_ANNOTATION, "-5")]);
        assert!(PodSize::from_annotations(Some(&a)).is_err());
    }

    #[test]
    fn the_vm_is_the_config_plus_the_pod_within_the_bounds() {
        let c = config(1, 256, 4, 1024);
        assert_eq!(PodSize::default().vm(&c), (1, 256), "no limits: the config");
        let pod = PodSize {
            cpus: Some(2),
            memory_mib: Some(128),
        };
        assert_eq!(pod.vm(&c), (2, 384));
        let big = PodSize {
            cpus: Some(16),
            memory_mib: Some(4096),
        };
        assert_eq!(
            big.vm(&c),
            (4, 1024),
            "bounded by max_vcpus, max_memory_mib"
        );
        // A pod asking for less than the config's vCPUs still gets them.
        let c = config(2, 256, 4, 1024);
        let small = PodSize {
            cpus: Some(1),
            memory_mib: None,
        };
        assert_eq!(small.vm(&c), (2, 256));
    }
}
