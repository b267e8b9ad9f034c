//! What `/proc` says about processes and the machine: resident memory
//! (`VmRSS`, `VmHWM`), CPU time (own and of reaped children), the process
//! tree, and the machine's busy/total CPU time.

use std::{collections::HashMap, path::Path};

/// Resident memory of one process, in KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Memory {
    pub rss_kib: u64,
    /// Peak resident set (high water mark).
    pub hwm_kib: u64,
}

/// From `/proc/<pid>/stat`: parent and CPU times in clock ticks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stat {
    pub ppid: u32,
    pub utime: u64,
    pub stime: u64,
    /// CPU time of children this process has waited for (and theirs).
    pub cutime: u64,
    pub cstime: u64,
}

impl Stat {
    /// The process's own CPU time.
    pub fn own(&self) -> u64 {
        self.utime + self.stime
    }

    /// CPU time of its reaped descendants.
    pub fn children(&self) -> u64 {
        self.cutime + self.cstime
    }
}

/// `VmRSS` and `VmHWM` of `pid`; `None` once it is gone.
pub fn memory(pid: u32) -> Option<Memory> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_status(&text)
}

fn parse_status(text: &str) -> Option<Memory> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some(Memory {
        rss_kib: field("VmRSS:")?,
        hwm_kib: field("VmHWM:")?,
    })
}

/// `/proc/<pid>/stat`; `None` once it is gone.
pub fn stat(pid: u32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

fn parse_stat(text: &str) -> Option<Stat> {
    // The command name is in parentheses and may itself hold spaces or ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    Some(Stat {
        ppid: n(1)? as u32,
        utime: n(11)?,
        stime: n(12)?,
        cutime: n(13)?,
        cstime: n(14)?,
    })
}

/// Every live descendant of `roots` (not the roots themselves).
pub fn descendants(roots: &[u32]) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some(s) = stat(pid) {
                children.entry(s.ppid).or_default().push(pid);
            }
        }
    }
    let mut out = Vec::new();
    let mut stack: Vec<u32> = roots.to_vec();
    while let Some(pid) = stack.pop() {
        for &c in children.get(&pid).map(Vec::as_slice).unwrap_or_default() {
            out.push(c);
            stack.push(c);
        }
    }
    out
}

/// The machine's CPU time so far, in clock ticks: (busy, total).
pub fn machine_cpu() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    parse_machine_cpu(&text)
}

fn parse_machine_cpu(text: &str) -> Option<(u64, u64)> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest is inside user).
    if v.len() < 8 {
        return None;
    }
    let total: u64 = v.iter().sum();
    let idle = v[3] + v[4];
    Some((total - idle, total))
}

/// Clock ticks per second (`getconf CLK_TCK`, 100 when it cannot say).
pub fn clock_ticks() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

/// The content of a one-line `/proc` or `/sys` file, trimmed.
pub fn read_line(path: impl AsRef<Path>) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_fields() {
        let text = "Name:\tcm-api\nVmPeak:\t  100 kB\nVmHWM:\t   2048 kB\nVmRSS:\t    1024 kB\n";
        assert_eq!(
            parse_status(text),
            Some(Memory {
                rss_kib: 1024,
                hwm_kib: 2048
            })
        );
        assert_eq!(parse_status("Name:\tzombie\n"), None);
    }

    #[test]
    fn stat_fields_survive_odd_names() {
        let text = "42 (a) b)) S 7 42 42 0 -1 4194560 100 0 0 0 11 12 13 14 20 0 1 0 5 0 0";
        assert_eq!(
            parse_stat(text),
            Some(Stat {
                ppid: 7,
                utime: 11,
                stime: 12,
                cutime: 13,
                cstime: 14
            })
        );
    }

    #[test]
    fn machine_cpu_counts_idle_and_iowait_as_idle() {
        let text = "cpu  10 1 5 100 4 1 1 0 0 0\ncpu0 1 1 1 1 1 1 1 1 0 0\n";
        assert_eq!(parse_machine_cpu(text), Some((18, 122)));
    }

    #[test]
    fn this_process_is_readable() {
        let me = std::process::id();
        let mem = memory(me).expect("own status");
        assert!(mem.rss_kib > 0 && mem.hwm_kib >= mem.rss_kib);
        assert!(stat(me).is_some());
        let (busy, total) = machine_cpu().expect("/proc/stat");
        assert!(total >= busy && total > 0);
    }

    #[test]
    fn children_are_found() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .expect("sleep");
        let found = descendants(&[std::process::id()]);
        let _ = child.kill();
        let _ = child.wait();
        assert!(found.contains(&child.id()), "{found:?}");
    }
}
