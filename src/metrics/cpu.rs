//! CPU time per thread role, read from `/proc/self/task`, so CPU per interaction is a live figure:
//! `rate(xiaozhi_cpu_seconds_total{role="shard"}[1m]) / rate(xiaozhi_interactions_total[1m])`.
//!
//! Threads are classified by name: shard executors are `shard<N>`, inference workers
//! `vad<N>`/`asr<N>`/`tts<N>` (CTranslate2's own threads inherit their creator's name, so they
//! count as `asr`). Everything else (the log writer, glommio's blocking pool that renders these
//! pages, the signal thread, the main thread) is `other`, computed as the process total minus the
//! named roles, so CPU of threads that have exited is not lost and the roles add up to the
//! process's `utime + stime`. Reading costs one small file per thread; it runs where `/metrics`
//! is formatted, on the blocking pool, never on a shard executor.

use std::fmt::Write;

/// Thread roles, in export order.
pub const ROLES: [&str; 5] = ["shard", "vad", "asr", "tts", "other"];

/// CPU seconds and live thread count per role (indexed like [`ROLES`]).
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct RoleCpu {
    /// CPU seconds (user + system) per role.
    pub seconds: [f64; 5],
    /// Live threads per role.
    pub threads: [u32; 5],
}

/// The role of a thread called `name`.
pub fn role_of(name: &str) -> usize {
    let name = name.trim_end();
    // glommio names an executor's thread `<name>-<executor id>` (`shard0-1`).
    let name = name
        .rsplit_once('-')
        .filter(|(_, id)| !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()))
        .map_or(name, |(base, _)| base);
    let digits = name.trim_end_matches(|c: char| c.is_ascii_digit());
    match digits {
        "shard" => 0,
        "vad" => 1,
        "asr" => 2,
        "tts" => 3,
        _ => 4,
    }
}

/// utime + stime (fields 14 and 15) of a `/proc/.../stat` line, in clock ticks. The command name
/// (field 2) is in parentheses and may contain spaces or `)`, so fields are counted after the
/// last `)`.
pub fn stat_ticks(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    let mut fields = after.split_whitespace();
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// This process's CPU per role, or `None` where `/proc` is not available.
pub fn sample() -> Option<RoleCpu> {
    let hz = ticks_per_second();
    let total = stat_ticks(&std::fs::read_to_string("/proc/self/stat").ok()?)?;
    let mut ticks = [0u64; 5];
    let mut out = RoleCpu::default();
    for entry in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let dir = entry.path();
        // A thread may exit between the listing and the reads: skip it (its time stays in
        // the process total, hence in `other`).
        let (Ok(name), Ok(stat)) = (
            std::fs::read_to_string(dir.join("comm")),
            std::fs::read_to_string(dir.join("stat")),
        ) else {
            continue;
        };
        let Some(t) = stat_ticks(&stat) else { continue };
        let role = role_of(&name);
        ticks[role] += t;
        out.threads[role] += 1;
    }
    let named: u64 = ticks[..4].iter().sum();
    ticks[4] = total.saturating_sub(named);
    for (s, t) in out.seconds.iter_mut().zip(ticks) {
        *s = t as f64 / hz;
    }
    Some(out)
}

/// Appends the CPU-per-role families and the interaction counter they are divided by.
pub fn render(out: &mut String, cpu: Option<&RoleCpu>, interactions: u64) {
    if let Some(cpu) = cpu {
        let _ = writeln!(
            out,
            "# HELP xiaozhi_cpu_seconds_total CPU time (user + system) of this process by thread role: shard executors, inference workers (vad, asr, tts), and everything else."
        );
        let _ = writeln!(out, "# TYPE xiaozhi_cpu_seconds_total counter");
        for (role, s) in ROLES.iter().zip(cpu.seconds) {
            let _ = writeln!(out, "xiaozhi_cpu_seconds_total{{role=\"{role}\"}} {s:.2}");
        }
        let _ = writeln!(out, "# HELP xiaozhi_threads Live threads by role.");
        let _ = writeln!(out, "# TYPE xiaozhi_threads gauge");
        for (role, n) in ROLES.iter().zip(cpu.threads) {
            let _ = writeln!(out, "xiaozhi_threads{{role=\"{role}\"}} {n}");
        }
    }
    let _ = writeln!(
        out,
        "# HELP xiaozhi_interactions_total Replies completed (tts stop after a turn's answer); CPU per interaction is the rate of xiaozhi_cpu_seconds_total over the rate of this."
    );
    let _ = writeln!(out, "# TYPE xiaozhi_interactions_total counter");
    let _ = writeln!(out, "xiaozhi_interactions_total {interactions}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_names_map_to_roles() {
        assert_eq!(ROLES[role_of("shard0\n")], "shard");
        assert_eq!(ROLES[role_of("shard12")], "shard");
        assert_eq!(
            ROLES[role_of("shard0-1\n")],
            "shard",
            "glommio's executor thread name"
        );
        assert_eq!(ROLES[role_of("shard3-14")], "shard");
        assert_eq!(ROLES[role_of("vad0")], "vad");
        assert_eq!(ROLES[role_of("asr1\n")], "asr");
        assert_eq!(ROLES[role_of("tts0")], "tts");
        assert_eq!(ROLES[role_of("xiaozhi-tpc")], "other");
        assert_eq!(ROLES[role_of("sharding")], "other");
        assert_eq!(ROLES[role_of("tracing-appende")], "other");
    }

    #[test]
    fn stat_fields_are_counted_after_the_last_parenthesis() {
        let line = "42 (odd) name)) S 1 42 42 0 -1 4194560 100 0 0 0 250 17 0 0 20 0 3 0 1 0 0";
        assert_eq!(stat_ticks(line), Some(267));
        assert_eq!(stat_ticks("42 (x) S 1"), None);
    }

    #[test]
    fn a_busy_named_thread_shows_up_in_its_role_and_roles_add_up_to_the_process() {
        let spin = std::thread::Builder::new()
            .name("vad97".into())
            .spawn(|| {
                // Spin until this thread has used 150 ms of CPU (not wall time: the machine may
                // be busy): enough for several clock ticks.
                let thread_cpu = || {
                    let mut ts = libc::timespec {
                        tv_sec: 0,
                        tv_nsec: 0,
                    };
                    // SAFETY: `ts` is a valid, writable timespec.
                    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
                    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
                };
                let mut x = 0u64;
                while thread_cpu() < 0.15 {
                    for _ in 0..10_000 {
                        x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
                    }
                }
                let cpu = sample().expect("/proc is readable");
                (x, cpu)
            })
            .unwrap();
        let (_, cpu) = spin.join().unwrap();
        assert!(cpu.threads[1] >= 1, "{cpu:?}");
        assert!(cpu.seconds[1] >= 0.1, "{cpu:?}");
        let total = stat_ticks(&std::fs::read_to_string("/proc/self/stat").unwrap()).unwrap()
            as f64
            / ticks_per_second();
        let sum: f64 = cpu.seconds.iter().sum();
        // The sample was taken a moment before `total`; the process only gains CPU.
        assert!(sum <= total + 0.011 && sum > 0.0, "{sum} vs {total}");
        let mut text = String::new();
        render(&mut text, Some(&cpu), 3);
        assert!(text.contains("xiaozhi_cpu_seconds_total{role=\"vad\"} "));
        assert!(text.contains("xiaozhi_interactions_total 3\n"));
    }
}
