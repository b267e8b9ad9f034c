//! The machine a run happened on, recorded next to its numbers: cores, CPU
//! model, memory, kernel, load when the run started, git commit, Pulumi.

use std::path::Path;

use serde::Serialize;

use crate::procfs;

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// CPUs this process may use.
    pub nproc: usize,
    pub cpu_model: String,
    pub mem_total_mib: u64,
    pub kernel: String,
    /// `/proc/loadavg` when the run started (other tenants show here).
    pub loadavg_at_start: String,
    pub git_commit: String,
    /// Uncommitted changes in the work tree when the run started.
    pub git_dirty: bool,
    pub pulumi_version: String,
}

impl Machine {
    /// Reads what it can; unknown fields say `unknown`.
    pub fn probe(repo: &Path, pulumi: &Path) -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let git = |args: &[&str]| {
            std::process::Command::new("git")
                .arg("-C")
                .arg(repo)
                .args(args)
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        };
        Self {
            nproc: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model: cpu_model(&cpuinfo).unwrap_or_else(unknown),
            mem_total_mib: mem_total_kib(&meminfo).unwrap_or(0) / 1024,
            kernel: procfs::read_line("/proc/sys/kernel/osrelease").unwrap_or_else(unknown),
            loadavg_at_start: procfs::read_line("/proc/loadavg").unwrap_or_else(unknown),
            git_commit: git(&["rev-parse", "HEAD"]).unwrap_or_else(unknown),
            git_dirty: git(&["status", "--porcelain"]).is_some_and(|s| !s.is_empty()),
            pulumi_version: std::process::Command::new(pulumi)
                .arg("version")
                .env("PULUMI_SKIP_UPDATE_CHECK", "true")
                .output()
                .ok()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(unknown),
        }
    }

    /// One line for the top of the table.
    pub fn summary(&self) -> String {
        format!(
            "{} x {}, {} MiB, Linux {}, load {}, commit {}{}, pulumi {}",
            self.nproc,
            self.cpu_model,
            self.mem_total_mib,
            self.kernel,
            self.loadavg_at_start,
            self.git_commit.get(..12).unwrap_or(&self.git_commit),
            if self.git_dirty { " (dirty)" } else { "" },
            self.pulumi_version
        )
    }
}

fn unknown() -> String {
    "unknown".into()
}

fn cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_owned())
}

fn mem_total_kib(meminfo: &str) -> Option<u64> {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpuinfo_and_meminfo_fields() {
        let cpu = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t: fpu\n";
        assert_eq!(cpu_model(cpu).as_deref(), Some("AMD EPYC 7B13"));
        let mem = "MemTotal:       24684000 kB\nMemFree: 1 kB\n";
        assert_eq!(mem_total_kib(mem), Some(24_684_000));
    }

    #[test]
    fn this_machine() {
        let m = Machine::probe(Path::new("."), Path::new("/nonexistent/pulumi"));
        assert!(m.nproc >= 1);
        assert!(m.mem_total_mib > 0);
        assert_ne!(m.kernel, "unknown");
        assert_eq!(m.pulumi_version, "unknown");
    }
}
