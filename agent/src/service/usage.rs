//! The agent's own footprint, sent with every report: resident memory (`VmRSS` in
//! `/proc/self/status`) and CPU time (user + system clock ticks in `/proc/self/stat`). The
//! plane keeps the last one (`node show`); two reports apart give the idle CPU share.

use std::path::Path;

use ironroot_contract::wire::AgentUsage;

use crate::external::{self, Links};

/// procfs files are small; these caps are far above what the kernel writes.
const MAX_PROC_FILE: u64 = 16 * 1024;

/// This process's usage now, or `None` when procfs cannot be read (never an error to report).
pub fn read() -> Option<AgentUsage> {
    let status = external::read(Path::new("/proc/self/status"), MAX_PROC_FILE, Links::Follow).ok()?;
    let stat = external::read(Path::new("/proc/self/stat"), MAX_PROC_FILE, Links::Follow).ok()?;
    let ticks = rustix::param::clock_ticks_per_second();
    Some(AgentUsage {
        rss_kib: rss_kib(&String::from_utf8_lossy(&status))?,
        cpu_ms: cpu_ms(&String::from_utf8_lossy(&stat), ticks)?,
    })
}

/// `VmRSS:    5120 kB` → 5120.
fn rss_kib(status: &str) -> Option<u64> {
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    line.trim().strip_suffix("kB")?.trim().parse().ok()
}

/// utime + stime (fields 14 and 15 of `stat`, counted after the command name, which may
/// itself hold spaces and parentheses) in milliseconds.
fn cpu_ms(stat: &str, ticks_per_second: u64) -> Option<u64> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    // Fields from 3 (state) on: utime is the 12th of them, stime the 13th.
    let mut fields = after_comm.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    let ticks = utime.checked_add(stime)?;
    ticks.checked_mul(1000)?.checked_div(ticks_per_second)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_and_cpu_time_are_read_from_procfs_text() {
        let status = "Name:\tironroot-agent\nVmPeak:\t  20000 kB\nVmRSS:\t    9216 kB\nThreads:\t3\n";
        assert_eq!(rss_kib(status), Some(9216));
        assert_eq!(rss_kib("Name:\tx\n"), None);
        // A command name with spaces and a parenthesis does not shift the fields.
        let stat = "412 (iron (root) a) S 1 412 412 0 -1 4194560 1311 0 0 0 250 37 0 0 20 0 3 0 1234 5000 2304";
        assert_eq!(cpu_ms(stat, 100), Some(2870));
        assert_eq!(cpu_ms("412 (x) S 1", 100), None, "too few fields");
        assert_eq!(cpu_ms(stat, 0), None, "no clock rate");
    }

    #[test]
    fn this_process_is_measured() {
        let usage = read().expect("procfs is mounted where tests run");
        assert!(usage.rss_kib > 0, "{usage:?}");
    }
}
