//! cgroup v2 statistics read leniently.
//!
//! libcgroups' v2 `stats()` fails as a whole when any file it reads is
//! missing: the pressure files (a kernel without `CONFIG_PSI`, like the
//! guest's), `memory.swap.*` (no swap accounting), `io.stat` (no block
//! cgroup). It also reports `cpu.stat`'s microseconds as they are, under
//! names the callers read as nanoseconds. This reads what the guest
//! kernel has, in nanoseconds, and leaves the rest at zero.

use std::collections::HashMap;
use std::path::Path;

use libcgroups::stats::{BlkioDeviceStat, Stats};

/// The unified hierarchy's mount point.
pub const UNIFIED_ROOT: &str = "/sys/fs/cgroup";

/// Whether `root` is a cgroup v2 (unified) hierarchy.
pub fn is_unified(root: &Path) -> bool {
    root.join("cgroup.controllers").exists()
}

fn flat_keyed(path: &Path) -> HashMap<String, u64> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_owned(), v.trim().parse().ok()?))
        })
        .collect()
}

/// A single value; `max` is `u64::MAX`, a missing or garbled file 0.
fn single(path: &Path) -> u64 {
    match std::fs::read_to_string(path) {
        Ok(s) if s.trim() == "max" => u64::MAX,
        Ok(s) => s.trim().parse().unwrap_or(0),
        Err(_) => 0,
    }
}

/// The statistics of the cgroup at `dir` (a directory of a v2 hierarchy).
pub fn read(dir: &Path) -> Stats {
    let mut stats = Stats::default();
    let cpu = flat_keyed(&dir.join("cpu.stat"));
    let usec = |k: &str| cpu.get(k).copied().unwrap_or(0);
    stats.cpu.usage.usage_total = usec("usage_usec").saturating_mul(1000);
    stats.cpu.usage.usage_user = usec("user_usec").saturating_mul(1000);
    stats.cpu.usage.usage_kernel = usec("system_usec").saturating_mul(1000);
    stats.cpu.throttling.periods = usec("nr_periods");
    stats.cpu.throttling.throttled_periods = usec("nr_throttled");
    stats.cpu.throttling.throttled_time = usec("throttled_usec").saturating_mul(1000);

    let memory = &mut stats.memory;
    memory.memory.usage = single(&dir.join("memory.current"));
    memory.memory.limit = single(&dir.join("memory.max"));
    memory.memory.max_usage = single(&dir.join("memory.peak"));
    memory.memory.fail_count = flat_keyed(&dir.join("memory.events"))
        .get("max")
        .copied()
        .unwrap_or(0);
    memory.hierarchy = true;
    memory.stats = flat_keyed(&dir.join("memory.stat"));

    stats.pids.current = single(&dir.join("pids.current"));
    stats.pids.limit = single(&dir.join("pids.max"));

    for line in std::fs::read_to_string(dir.join("io.stat"))
        .unwrap_or_default()
        .lines()
    {
        let mut fields = line.split_whitespace();
        let Some((major, minor)) = fields
            .next()
            .and_then(|d| d.split_once(':'))
            .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
        else {
            continue;
        };
        for kv in fields {
            let Some((key, value)) = kv.split_once('=') else {
                continue;
            };
            let op = match key {
                "rbytes" => "read",
                "wbytes" => "write",
                _ => continue,
            };
            stats.blkio.service_bytes.push(BlkioDeviceStat {
                major,
                minor,
                op_type: Some(op.to_owned()),
                value: value.parse().unwrap_or(0),
            });
        }
    }
    stats
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_there_is_in_nanoseconds() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(
            d.join("cpu.stat"),
            "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 10\n\
             nr_throttled 2\nthrottled_usec 30\n",
        )
        .unwrap();
        std::fs::write(d.join("memory.current"), "4096\n").unwrap();
        std::fs::write(d.join("memory.max"), "max\n").unwrap();
        std::fs::write(d.join("memory.events"), "low 0\nhigh 0\nmax 3\noom 1\n").unwrap();
        std::fs::write(d.join("memory.stat"), "anon 1024\ninactive_file 512\n").unwrap();
        std::fs::write(d.join("pids.current"), "2\n").unwrap();
        std::fs::write(d.join("pids.max"), "100\n").unwrap();
        std::fs::write(
            d.join("io.stat"),
            "254:0 rbytes=4096 wbytes=8192 rios=1 wios=2\ngarbage\n",
        )
        .unwrap();
        // No cpu.pressure, memory.peak or memory.swap.*: as in the guest.
        let s = read(d);
        assert_eq!(s.cpu.usage.usage_total, 1_500_000);
        assert_eq!(s.cpu.usage.usage_user, 1_000_000);
        assert_eq!(s.cpu.usage.usage_kernel, 500_000);
        assert_eq!(s.cpu.throttling.throttled_periods, 2);
        assert_eq!(s.cpu.throttling.throttled_time, 30_000);
        assert_eq!(s.memory.memory.usage, 4096);
        assert_eq!(s.memory.memory.limit, u64::MAX);
        assert_eq!(s.memory.memory.max_usage, 0);
        assert_eq!(s.memory.memory.fail_count, 3);
        assert_eq!(s.memory.stats.get("inactive_file"), Some(&512));
        assert_eq!((s.pids.current, s.pids.limit), (2, 100));
        let io: Vec<_> = s
            .blkio
            .service_bytes
            .iter()
            .map(|b| (b.major, b.minor, b.op_type.clone().unwrap(), b.value))
            .collect();
        assert_eq!(
            io,
            vec![
                (254, 0, "read".into(), 4096),
                (254, 0, "write".into(), 8192)
            ]
        );
    }

    #[test]
    fn an_empty_or_missing_cgroup_reads_as_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let s = read(&dir.path().join("gone"));
        assert_eq!(s.cpu.usage.usage_total, 0);
        assert_eq!(s.memory.memory.usage, 0);
        assert!(s.blkio.service_bytes.is_empty());
        assert!(!is_unified(dir.path()));
    }
}
