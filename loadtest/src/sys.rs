//! What ckload reads from the operating system: the system-wide monotonic clock (shared by all
//! worker processes, so their timestamps compare), `/proc` samples of a process's CPU time and
//! memory and of the machine's CPU, kernel limits, and raising `RLIMIT_NOFILE`.

use std::path::Path;
use std::time::Duration;

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
use rustix::time::{ClockId, clock_gettime};
use serde::{Deserialize, Serialize};

/// Nanoseconds on `CLOCK_MONOTONIC`: the same clock in every process on the machine.
pub fn mono_ns() -> u64 {
    clock_ns(ClockId::Monotonic)
}

/// Nanoseconds on `CLOCK_REALTIME` (the clock of the kernel's receive timestamps,
/// `connector::recv_stamped`).
pub fn real_ns() -> u64 {
    clock_ns(ClockId::Realtime)
}

/// Nanoseconds on `clock`.
fn clock_ns(clock: ClockId) -> u64 {
    let t = clock_gettime(clock);
    u64::try_from(t.tv_sec)
        .unwrap_or(0)
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::try_from(t.tv_nsec).unwrap_or(0))
}

/// Raises the soft open-files limit to the hard one; returns the new soft limit.
pub fn raise_nofile_limit() -> u64 {
    let lim = getrlimit(Resource::Nofile);
    let Some(hard) = lim.maximum else {
        // Unlimited hard limit: ask for a large soft one.
        let want = 1 << 20;
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(want),
                maximum: None,
            },
        );
        return getrlimit(Resource::Nofile).current.unwrap_or(want);
    };
    if lim.current != Some(hard) {
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(hard),
                maximum: Some(hard),
            },
        );
    }
    getrlimit(Resource::Nofile).current.unwrap_or(hard)
}

/// The hard open-files limit (`u64::MAX` when unlimited).
pub fn nofile_hard_limit() -> u64 {
    getrlimit(Resource::Nofile).maximum.unwrap_or(u64::MAX)
}

/// How many local ports `net.ipv4.ip_local_port_range` offers (per source address and
/// destination), or `None` if it cannot be read.
pub fn ephemeral_port_count() -> Option<u64> {
    let (lo, hi) = ephemeral_port_range()?;
    Some(u64::from(hi - lo) + 1)
}

/// `net.ipv4.ip_local_port_range` (first, last), or `None` if it cannot be read.
pub fn ephemeral_port_range() -> Option<(u16, u16)> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut it = text.split_whitespace().map(str::parse::<u16>);
    let lo = it.next()?.ok()?;
    let hi = it.next()?.ok()?;
    (lo <= hi).then_some((lo, hi))
}

/// CPU time and memory of one process at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ProcSample {
    /// User plus system CPU seconds since the process started.
    pub cpu_secs: f64,
    /// Resident set size, KiB.
    pub rss_kib: u64,
    /// Peak resident set size, KiB.
    pub hwm_kib: u64,
    /// Threads.
    pub threads: u64,
}

impl ProcSample {
    /// Reads `/proc/<pid>/stat` and `/proc/<pid>/status`; `None` if the process is gone.
    pub fn read(pid: u32) -> Option<Self> {
        Self::read_dir(&Path::new("/proc").join(pid.to_string()))
    }

    /// The calling process.
    pub fn read_self() -> Option<Self> {
        Self::read_dir(Path::new("/proc/self"))
    }

    /// The calling thread (CPU time of this thread only).
    pub fn read_thread_self() -> Option<Self> {
        Self::read_dir(Path::new("/proc/thread-self"))
    }

    fn read_dir(dir: &Path) -> Option<Self> {
        let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
        let status = std::fs::read_to_string(dir.join("status")).ok()?;
        let ticks = parse_stat_cpu_ticks(&stat)?;
        Some(Self {
            cpu_secs: ticks as f64 / clock_ticks() as f64,
            rss_kib: status_kib(&status, "VmRSS:").unwrap_or(0),
            hwm_kib: status_kib(&status, "VmHWM:").unwrap_or(0),
            threads: status_kib(&status, "Threads:").unwrap_or(0),
        })
    }
}

/// The machine's CPU counters from `/proc/stat` (all cores), in clock ticks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MachineCpu {
    /// Busy ticks (everything but idle and iowait).
    pub busy: u64,
    /// All ticks.
    pub total: u64,
    /// Ticks stolen by the hypervisor (included in `busy`).
    pub steal: u64,
}

impl MachineCpu {
    /// Reads the first line of `/proc/stat`.
    pub fn read() -> Option<Self> {
        let text = std::fs::read_to_string("/proc/stat").ok()?;
        parse_proc_stat(&text)
    }

    /// Percentage of all cores' time stolen by the hypervisor between `earlier` and `self`.
    pub fn steal_pct_since(&self, earlier: &Self) -> f64 {
        let total = self.total.saturating_sub(earlier.total);
        if total == 0 {
            return 0.0;
        }
        100.0 * self.steal.saturating_sub(earlier.steal) as f64 / total as f64
    }

    /// Percentage of all cores busy between `earlier` and `self`.
    pub fn busy_pct_since(&self, earlier: &Self) -> f64 {
        let total = self.total.saturating_sub(earlier.total);
        if total == 0 {
            return 0.0;
        }
        100.0 * self.busy.saturating_sub(earlier.busy) as f64 / total as f64
    }
}

/// The kernel's packet-loss counters, machine-wide: what makes a loopback benchmark's latency
/// tail. A packet dropped on loopback is resent only after TCP's loss probe or retransmission
/// timer, ~200 ms later (`tcp_rto_min`), which one run's p99 may or may not catch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetCounters {
    /// Packets dropped because a CPU's input queue was full (`netdev_max_backlog`): the second
    /// column of `/proc/net/softnet_stat`, summed over CPUs.
    pub backlog_drops: u64,
    /// TCP segments retransmitted (`/proc/net/snmp` Tcp RetransSegs), SYNs included.
    pub retrans_segs: u64,
    /// SYNs retransmitted (`/proc/net/netstat` TcpExt TCPSynRetrans).
    pub syn_retrans: u64,
    /// Tail-loss probes sent (TcpExt TCPLossProbes).
    pub loss_probes: u64,
}

impl NetCounters {
    /// Reads the three files; `None` when one is missing or unreadable.
    pub fn read() -> Option<Self> {
        let softnet = std::fs::read_to_string("/proc/net/softnet_stat").ok()?;
        let snmp = std::fs::read_to_string("/proc/net/snmp").ok()?;
        let netstat = std::fs::read_to_string("/proc/net/netstat").ok()?;
        Some(Self {
            backlog_drops: parse_softnet_drops(&softnet)?,
            retrans_segs: proc_net_field(&snmp, "Tcp:", "RetransSegs")?,
            syn_retrans: proc_net_field(&netstat, "TcpExt:", "TCPSynRetrans").unwrap_or(0),
            loss_probes: proc_net_field(&netstat, "TcpExt:", "TCPLossProbes").unwrap_or(0),
        })
    }

    /// What happened between `earlier` and `self` (each counter's difference).
    pub fn since(&self, earlier: &Self) -> Self {
        Self {
            backlog_drops: self.backlog_drops.saturating_sub(earlier.backlog_drops),
            retrans_segs: self.retrans_segs.saturating_sub(earlier.retrans_segs),
            syn_retrans: self.syn_retrans.saturating_sub(earlier.syn_retrans),
            loss_probes: self.loss_probes.saturating_sub(earlier.loss_probes),
        }
    }
}

/// Sum of the second (hexadecimal) column of `/proc/net/softnet_stat`.
fn parse_softnet_drops(text: &str) -> Option<u64> {
    let mut sum = 0u64;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let field = line.split_whitespace().nth(1)?;
        sum = sum.saturating_add(u64::from_str_radix(field, 16).ok()?);
    }
    Some(sum)
}

/// A counter from the two-line tables of `/proc/net/snmp` and `/proc/net/netstat` (a line of
/// names, then a line of values, both starting with `prefix`).
fn proc_net_field(text: &str, prefix: &str, name: &str) -> Option<u64> {
    let mut lines = text.lines().filter(|l| l.starts_with(prefix));
    let names = lines.next()?;
    let values = lines.next()?;
    let at = names.split_whitespace().position(|n| n == name)?;
    values.split_whitespace().nth(at)?.parse().ok()
}

/// Each CPU's stolen time from `/proc/stat` (`cpuN` lines), in clock ticks, in CPU order.
pub fn steal_per_cpu() -> Option<Vec<u64>> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    Some(parse_steal_per_cpu(&text))
}

fn parse_steal_per_cpu(text: &str) -> Vec<u64> {
    text.lines()
        .filter(|l| l.starts_with("cpu") && !l.starts_with("cpu "))
        .map(|l| {
            l.split_whitespace()
                .nth(8)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        })
        .collect()
}

/// Milliseconds per clock tick of `/proc/stat`.
pub fn ms_per_tick() -> u64 {
    1000 / clock_ticks()
}

/// Number of online CPUs as the scheduler sees them.
pub fn cpu_count() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
}

/// `CLK_TCK`.
fn clock_ticks() -> u64 {
    rustix::param::clock_ticks_per_second().max(1)
}

/// A duration as fractional seconds, for reports.
pub fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// utime + stime (fields 14 and 15) from a `/proc/<pid>/stat` line. The command name may hold
/// spaces and parentheses, so fields are counted after the last `)`.
fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    let after = stat.get(stat.rfind(')')? + 1..)?;
    let mut fields = after.split_whitespace();
    // After ")": field 3 (state) is index 0, so utime (14) is index 11 and stime (15) index 12.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

fn status_kib(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

fn parse_proc_stat(text: &str) -> Option<MachineCpu> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let vals: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = vals.iter().take(8).sum();
    let idle = vals.get(3).copied().unwrap_or(0) + vals.get(4).copied().unwrap_or(0);
    Some(MachineCpu {
        busy: total.saturating_sub(idle),
        total,
        steal: vals.get(7).copied().unwrap_or(0),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "test code")]
mod tests {
    use super::*;

    #[test]
    fn stat_line_with_odd_command_name() {
        let line = "1234 (a (b) c) S 1 1 1 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 100 1000 200";
        assert_eq!(parse_stat_cpu_ticks(line), Some(300));
        assert_eq!(parse_stat_cpu_ticks("garbage"), None);
    }

    #[test]
    fn status_fields() {
        let s = "Name:\tx\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\nThreads:\t5\n";
        assert_eq!(status_kib(s, "VmRSS:"), Some(1024));
        assert_eq!(status_kib(s, "VmHWM:"), Some(2048));
        assert_eq!(status_kib(s, "Threads:"), Some(5));
        assert_eq!(status_kib(s, "VmSwap:"), None);
    }

    #[test]
    fn machine_cpu() {
        let a = parse_proc_stat("cpu  100 0 100 700 100 0 0 0 0 0\ncpu0 1 2 3\n").unwrap();
        assert_eq!((a.busy, a.total), (200, 1000));
        let b = MachineCpu {
            busy: 300,
            total: 1200,
            steal: 0,
        };
        assert!((b.busy_pct_since(&a) - 50.0).abs() < 1e-9);
    }

    #[test]
    fn net_counters_parse() {
        let softnet = "0000abcd 0000036d 000009ad 00000000\n1299b18d 000000fb 000009f3 00000000\n";
        assert_eq!(parse_softnet_drops(softnet), Some(0x36d + 0xfb));
        assert_eq!(parse_softnet_drops("zz"), None);
        let snmp = "Ip: Forwarding DefaultTTL\nIp: 1 64\nTcp: RtoAlgorithm RtoMin RetransSegs\nTcp: 1 200 16282\n";
        assert_eq!(proc_net_field(snmp, "Tcp:", "RetransSegs"), Some(16282));
        assert_eq!(proc_net_field(snmp, "Tcp:", "Missing"), None);
        assert_eq!(proc_net_field(snmp, "Udp:", "RetransSegs"), None);
        let a = NetCounters {
            backlog_drops: 5,
            retrans_segs: 10,
            syn_retrans: 2,
            loss_probes: 1,
        };
        let b = NetCounters {
            backlog_drops: 9,
            retrans_segs: 30,
            syn_retrans: 2,
            loss_probes: 4,
        };
        assert_eq!(
            b.since(&a),
            NetCounters {
                backlog_drops: 4,
                retrans_segs: 20,
                syn_retrans: 0,
                loss_probes: 3
            }
        );
        // This machine has the files (Linux).
        assert!(NetCounters::read().is_some());
    }

    #[test]
    fn steal_per_cpu_lines() {
        let text = "cpu  1 2 3 4 5 6 7 99 0 0\ncpu0 1 2 3 4 5 6 7 40 0 0\ncpu1 1 2 3 4 5 6 7 59 0 0\nintr 5\n";
        assert_eq!(parse_steal_per_cpu(text), vec![40, 59]);
        assert!(!steal_per_cpu().unwrap().is_empty());
        assert!(ms_per_tick() >= 1);
    }

    #[test]
    fn own_process_and_clock() {
        let s = ProcSample::read_self().unwrap();
        assert!(s.rss_kib > 0 && s.threads >= 1);
        let a = mono_ns();
        let b = mono_ns();
        assert!(b >= a && a > 0);
        assert!(raise_nofile_limit() >= 1);
    }
}
