//! Watching a stack under load: resident memory of our processes and of the
//! Pulumi processes under the workers (sampled every 200 ms), and the CPU
//! time each group used over the window (from `/proc/<pid>/stat`, where the
//! CPU of every Pulumi run a worker has reaped lands in its `cutime`).

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use crate::{procfs, stack::Stack};

const PERIOD: Duration = Duration::from_millis(200);

/// CPU time (clock ticks) per group at one instant.
#[derive(Debug, Clone, Default)]
struct Cpu {
    machine: (u64, u64),
    ours: BTreeMap<String, u64>,
    /// Reaped children of the workers: Pulumi, its language host, programs.
    pulumi: u64,
    /// nats-server and etcd.
    infra: u64,
    /// This bench process (the HTTP clients).
    bench: u64,
}

#[derive(Debug, Clone)]
struct Pids {
    ours: Vec<(String, u32)>,
    workers: Vec<u32>,
    infra: Vec<u32>,
}

impl Pids {
    fn cpu(&self) -> Cpu {
        let own = |pid: u32| procfs::stat(pid).map_or(0, |s| s.own());
        Cpu {
            machine: procfs::machine_cpu().unwrap_or_default(),
            ours: self
                .ours
                .iter()
                .map(|(n, p)| (n.clone(), own(*p)))
                .collect(),
            pulumi: self
                .workers
                .iter()
                .map(|p| procfs::stat(*p).map_or(0, |s| s.children()))
                .sum(),
            infra: self.infra.iter().map(|p| own(*p)).sum(),
            bench: own(std::process::id()),
        }
    }
}

/// Memory samples, in KiB.
#[derive(Debug, Default)]
struct Series {
    ours: BTreeMap<String, Vec<u64>>,
    /// Sum over the workers' descendants at each sample.
    pulumi: Vec<u64>,
    pulumi_max_processes: usize,
}

/// A running measurement; [`Load::finish`] ends it.
#[derive(Debug)]
pub struct Load {
    pids: Pids,
    started: Instant,
    before: Cpu,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Series>,
}

/// Share of the machine's CPU over the window, in percent of all cores.
#[derive(Debug, Clone, Default)]
pub struct CpuShare {
    pub machine_busy: f64,
    pub ours: BTreeMap<String, f64>,
    pub ours_total: f64,
    pub pulumi: f64,
    pub infra: f64,
    pub bench: f64,
    /// Busy time nobody above accounts for: other tenants of the machine.
    pub others: f64,
    /// CPU seconds, for per-item figures.
    pub pulumi_secs: f64,
    pub ours_secs: f64,
}

/// What a window of load showed.
#[derive(Debug)]
pub struct LoadResult {
    /// Our processes' `VmRSS` samples (KiB) and final `VmHWM` (KiB).
    pub rss: BTreeMap<String, (Vec<u64>, u64)>,
    /// Sum of the Pulumi processes' `VmRSS` at each sample (KiB).
    pub pulumi_rss: Vec<u64>,
    pub pulumi_max_processes: usize,
    pub cpu: CpuShare,
}

impl Load {
    /// Starts watching `stack`'s processes.
    pub fn start(stack: &Stack) -> Self {
        let pids = Pids {
            ours: stack
                .services()
                .iter()
                .map(|s| (s.name.clone(), s.pid()))
                .collect(),
            workers: stack.workers.iter().map(|w| w.pid()).collect(),
            infra: vec![stack.nats.pid(), stack.etcd.pid()],
        };
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let pids = pids.clone();
            let stop = stop.clone();
            std::thread::spawn(move || sample(&pids, &stop))
        };
        Self {
            before: pids.cpu(),
            pids,
            started: Instant::now(),
            stop,
            thread,
        }
    }

    /// Stops sampling and works out the shares.
    pub fn finish(self) -> LoadResult {
        let after = self.pids.cpu();
        let elapsed = self.started.elapsed();
        self.stop.store(true, Ordering::Relaxed);
        let series = self.thread.join().unwrap_or_default();
        let ticks = procfs::clock_ticks() as f64;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let capacity = (elapsed.as_secs_f64() * ticks * cores).max(1.0);
        let pct = |t: u64| t as f64 / capacity * 100.0;
        let ours: BTreeMap<String, f64> = after
            .ours
            .iter()
            .map(|(n, t)| {
                (
                    n.clone(),
                    pct(t.saturating_sub(self.before.ours.get(n).copied().unwrap_or(0))),
                )
            })
            .collect();
        let ours_ticks: u64 = after
            .ours
            .iter()
            .map(|(n, t)| t.saturating_sub(self.before.ours.get(n).copied().unwrap_or(0)))
            .sum();
        let pulumi_ticks = after.pulumi.saturating_sub(self.before.pulumi);
        let infra = pct(after.infra.saturating_sub(self.before.infra));
        let bench = pct(after.bench.saturating_sub(self.before.bench));
        let busy = after.machine.0.saturating_sub(self.before.machine.0) as f64;
        let total = after.machine.1.saturating_sub(self.before.machine.1).max(1) as f64;
        let machine_busy = busy / total * 100.0;
        let ours_total = pct(ours_ticks);
        let pulumi = pct(pulumi_ticks);
        let cpu = CpuShare {
            machine_busy,
            ours_total,
            pulumi,
            infra,
            bench,
            others: (machine_busy - ours_total - pulumi - infra - bench).max(0.0),
            ours,
            pulumi_secs: pulumi_ticks as f64 / ticks,
            ours_secs: ours_ticks as f64 / ticks,
        };
        let rss = series
            .ours
            .into_iter()
            .map(|(name, samples)| {
                let hwm = self
                    .pids
                    .ours
                    .iter()
                    .find(|(n, _)| *n == name)
                    .and_then(|(_, p)| procfs::memory(*p))
                    .map_or(0, |m| m.hwm_kib);
                (name, (samples, hwm))
            })
            .collect();
        LoadResult {
            rss,
            pulumi_rss: series.pulumi,
            pulumi_max_processes: series.pulumi_max_processes,
            cpu,
        }
    }
}

fn sample(pids: &Pids, stop: &AtomicBool) -> Series {
    let mut series = Series::default();
    while !stop.load(Ordering::Relaxed) {
        for (name, pid) in &pids.ours {
            if let Some(m) = procfs::memory(*pid) {
                series.ours.entry(name.clone()).or_default().push(m.rss_kib);
            }
        }
        let children = procfs::descendants(&pids.workers);
        let mut sum = 0;
        let mut alive = 0;
        for pid in children {
            if let Some(m) = procfs::memory(pid) {
                sum += m.rss_kib;
                alive += 1;
            }
        }
        series.pulumi.push(sum);
        series.pulumi_max_processes = series.pulumi_max_processes.max(alive);
        std::thread::sleep(PERIOD);
    }
    series
}
