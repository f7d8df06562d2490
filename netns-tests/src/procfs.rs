//! What the benchmarks and tests read of a process from /proc: its peak memory and CPU time.

use std::time::Duration;

/// Peak resident set (VmHWM) of a process, KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// utime + stime of a process, all threads, in clock ticks ([`clock_ticks_per_second`]).
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; fields after it are space-separated. Fields 14 and 15
    // of stat(5) (utime, stime) are 12 and 13 after the name (which is field 2).
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// USER_HZ: what /proc counts CPU time in.
pub fn clock_ticks_per_second() -> f64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(ticks)) if ticks > 0 => ticks as f64,
        _ => 100.0,
    }
}

/// CPU time (user + system) a process has used.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    Some(Duration::from_secs_f64(
        cpu_ticks(pid)? as f64 / clock_ticks_per_second(),
    ))
}
