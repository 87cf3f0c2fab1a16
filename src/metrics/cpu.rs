//! CPU time per thread role, read from `/proc/self/task`, so CPU per interaction is a live figure:
//! `rate(xiaozhi_cpu_seconds_total{role="shard"}[1m]) / rate(xiaozhi_interactions_total[1m])`.
//!
//! Threads are classified by name: shard executors are `shard<N>-<executor id>` (their glommio
//! blocking-pool threads, which format these pages, carry the same name), inference workers
//! `vad<N>`/`asr<N>`/`tts<N>` (CTranslate2's own threads inherit their creator's name, so they
//! count as `asr`). Everything else (the log writer, the signal threads, the main thread) is
//! `other`, computed as the process total minus the named roles, so CPU of threads that have
//! exited is not lost and the roles add up to the process's CPU clock. Each thread's time comes
//! from its CPU clock (nanoseconds); reading costs a `comm` file and a `clock_gettime` per
//! thread, where `/metrics` is formatted, on the blocking pool, never on a shard executor.

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
    // "shard0-1" (glommio appends the executor id), "vad0", "asr1": the letters before the
    // first digit name the role.
    let name = name.trim_end();
    let letters = name
        .find(|c: char| c.is_ascii_digit())
        .map_or("", |i| &name[..i]);
    match letters {
        "shard" => 0,
        "vad" => 1,
        "asr" => 2,
        "tts" => 3,
        _ => 4,
    }
}

fn clock_seconds(clock: libc::clockid_t) -> Option<f64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; a bad clock id is an error return.
    let r = unsafe { libc::clock_gettime(clock, &mut ts) };
    (r == 0).then(|| ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9)
}

/// CPU seconds of thread `tid` of this process, to the nanosecond: Linux's per-thread CPU clock
/// (`MAKE_THREAD_CPUCLOCK(tid, CPUCLOCK_SCHED)`, what `pthread_getcpuclockid` returns; every
/// kernel with io_uring has it). `None` once the thread has exited.
fn thread_seconds(tid: i32) -> Option<f64> {
    clock_seconds((!tid << 3) | 6)
}

/// This process's CPU per role, or `None` where `/proc` is not available.
pub fn sample() -> Option<RoleCpu> {
    let mut out = RoleCpu::default();
    for entry in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let dir = entry.path();
        let Some(tid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        // A thread may exit between the listing and the reads: skip it (its time stays in
        // the process total, hence in `other`).
        let Ok(name) = std::fs::read_to_string(dir.join("comm")) else {
            continue;
        };
        let Some(t) = thread_seconds(tid) else {
            continue;
        };
        let role = role_of(&name);
        out.seconds[role] += t;
        out.threads[role] += 1;
    }
    // Read last, so it covers every thread read above (CPU time only grows).
    let total = clock_seconds(libc::CLOCK_PROCESS_CPUTIME_ID)?;
    let named: f64 = out.seconds[..4].iter().sum();
    out.seconds[4] = (total - named).max(0.0);
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
        assert_eq!(ROLES[role_of("shard0-1\n")], "shard");
        assert_eq!(ROLES[role_of("shard0\n")], "shard");
        assert_eq!(ROLES[role_of("log-writer")], "other");
        assert_eq!(ROLES[role_of("vad")], "other");
        assert_eq!(ROLES[role_of("shard12")], "shard");
        assert_eq!(ROLES[role_of("vad0")], "vad");
        assert_eq!(ROLES[role_of("asr1\n")], "asr");
        assert_eq!(ROLES[role_of("tts0")], "tts");
        assert_eq!(ROLES[role_of("xiaozhi-tpc")], "other");
        assert_eq!(ROLES[role_of("sharding")], "other");
        assert_eq!(ROLES[role_of("tracing-appende")], "other");
    }

    #[test]
    fn a_thread_clock_is_read_by_tid_to_the_nanosecond() {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        let by_tid = thread_seconds(tid).expect("per-thread CPU clock by tid");
        let own = clock_seconds(libc::CLOCK_THREAD_CPUTIME_ID).unwrap();
        assert!(own >= by_tid && own - by_tid < 0.001, "{by_tid} vs {own}");
    }

    #[test]
    fn a_busy_named_thread_shows_up_in_its_role_and_roles_add_up_to_the_process() {
        let spin = std::thread::Builder::new()
            .name("vad97".into())
            .spawn(|| {
                // Spin until this thread has used 150 ms of CPU (not wall time: the machine may
                // be busy): enough for several clock ticks.
                let thread_cpu = || clock_seconds(libc::CLOCK_THREAD_CPUTIME_ID).unwrap();
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
        assert!(cpu.seconds[1] >= 0.15, "{cpu:?}");
        let total = clock_seconds(libc::CLOCK_PROCESS_CPUTIME_ID).unwrap();
        let sum: f64 = cpu.seconds.iter().sum();
        // The sample was taken a moment before `total`; the process only gains CPU.
        assert!(sum <= total && sum > 0.0, "{sum} vs {total}");
        let mut text = String::new();
        render(&mut text, Some(&cpu), 3);
        assert!(text.contains("xiaozhi_cpu_seconds_total{role=\"vad\"} "));
        assert!(text.contains("xiaozhi_interactions_total 3\n"));
    }
}
