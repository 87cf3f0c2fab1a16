//! This process's threads by name: their kernel state (for the error of an executor that never
//! came up) and a wake-up signal for an executor that glommio put to sleep before its first
//! task ran.
//!
//! **Why the signal.** glommio 0.9's run loop arms a preemption timer, then runs the task
//! queues, which return "nothing ran" at once when the timer has already fired. The loop then
//! parks as if idle; the park consumes the timer's completion, which woke no task, so it
//! sleeps in `io_uring_enter` with the first task still queued and no timer to end the sleep
//! (a running shard always has one: its watchdog tick). It takes the thread being held off its
//! core for a whole preemption period (500 µs) at that point; on 2 loaded cores that happened
//! twice in the project's history (a shard that never started). With a 10 µs preemption timer
//! it happens on almost every start, which is how the test below provokes it. A signal
//! interrupts the sleep (glommio treats `EINTR` as a wake-up), the loop goes round again and
//! runs the task. The signal is `SIGURG`, whose default action is to do nothing, with a
//! handler that does nothing and `SA_RESTART`, so any other system call it lands on is resumed.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

/// How long an executor may take to run its first task before its thread gets a wake-up
/// signal (and again every such period).
pub const POKE_EVERY: Duration = Duration::from_millis(100);

/// The wake-up signal: ignored by default, so a stray one never hurts a process.
const WAKE_SIGNAL: libc::c_int = libc::SIGURG;

extern "C" fn do_nothing(_: libc::c_int) {}

/// Installs the do-nothing handler for the wake-up signal (once per process). Without a
/// handler the kernel discards the signal without interrupting anything.
pub fn install_wake_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction with a handler that touches nothing, and an empty mask.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = do_nothing as extern "C" fn(libc::c_int) as usize;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            if libc::sigaction(WAKE_SIGNAL, &action, std::ptr::null_mut()) != 0 {
                tracing::warn!(
                    error = %std::io::Error::last_os_error(),
                    "cannot install the executor wake-up handler"
                );
            }
        }
    });
}

/// Sends the wake-up signal to the thread whose name starts with `name` (see the module doc);
/// false when there is no such thread. [`install_wake_handler`] must have run.
pub fn poke_awake(name: &str) -> bool {
    let Some(tid) = find(name).and_then(|dir| dir.file_name()?.to_str()?.parse::<i32>().ok())
    else {
        return false;
    };
    // SAFETY: tgkill to a thread of this very process; a tid that has just exited fails with
    // ESRCH and is reported as false.
    unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, WAKE_SIGNAL) == 0 }
}

/// For executors started outside [`crate::start_shards`] (the bench's): from a plain thread,
/// pokes the thread whose name starts with `name` every [`POKE_EVERY`] until `started` is set (by the
/// executor's first task) or `limit` has passed.
pub fn wake_until_started(name: String, started: Arc<AtomicBool>, limit: Duration) {
    install_wake_handler();
    let spawned = std::thread::Builder::new()
        .name("wake-watch".into())
        .spawn(move || {
            let t0 = Instant::now();
            while !started.load(Ordering::Acquire) && t0.elapsed() < limit {
                std::thread::sleep(POKE_EVERY);
                if !started.load(Ordering::Acquire) {
                    poke_awake(&name);
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the executor wake-up watch");
    }
}

/// The kernel's view of the thread whose name starts with `name` in this process (state, wait
/// channel and, when readable, its kernel stack), for the error of an executor that never came up.
pub fn thread_state(name: &str) -> String {
    let Some(dir) = find(name) else {
        return "its thread is gone".into();
    };
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
    let state = read("stat")
        .rsplit_once(") ")
        .and_then(|(_, rest)| rest.split(' ').next())
        .unwrap_or("?")
        .to_string();
    let stack: Vec<String> = read("stack")
        .lines()
        .take(8)
        .map(|l| l.split_whitespace().last().unwrap_or("").to_string())
        .collect();
    format!(
        "thread {} state {state}, wchan {}, kernel stack [{}]",
        dir.file_name().unwrap_or_default().to_string_lossy(),
        read("wchan").trim(),
        stack.join(" < ")
    )
}

/// `/proc/self/task/<tid>` of the first thread whose name starts with `name` (the kernel keeps
/// 15 bytes of a name; glommio names an executor's thread `<name>-<executor id>`).
fn find(name: &str) -> Option<PathBuf> {
    let comm = &name[..name.len().min(15)];
    std::fs::read_dir("/proc/self/task")
        .ok()?
        .flatten()
        .map(|task| task.path())
        .find(|dir| {
            std::fs::read_to_string(dir.join("comm")).is_ok_and(|c| c.trim_end().starts_with(comm))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_state_names_the_kernel_state_of_a_thread() {
        let (tx, rx) = flume::bounded::<()>(0);
        let t = std::thread::Builder::new()
            .name("probe-sleeper".into())
            .spawn(move || {
                let _ = rx.recv();
            })
            .unwrap();
        let mut state = String::new();
        for _ in 0..100 {
            state = thread_state("probe-sleeper");
            if state.contains("state S") {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(state.starts_with("thread "), "{state}");
        assert!(state.contains("state S"), "{state}");
        assert_eq!(thread_state("no-such-thread"), "its thread is gone");
        drop(tx);
        t.join().unwrap();
    }

    #[test]
    fn a_poke_interrupts_a_sleep_in_the_named_thread() {
        install_wake_handler();
        let (tx, rx) = flume::bounded::<Duration>(1);
        let t = std::thread::Builder::new()
            .name("probe-poked".into())
            .spawn(move || {
                // nanosleep is never restarted: a signal with a handler ends it early.
                let mut left = libc::timespec {
                    tv_sec: 20,
                    tv_nsec: 0,
                };
                let t0 = std::time::Instant::now();
                // SAFETY: valid timespec pointers.
                unsafe { libc::nanosleep(&left.clone(), &mut left) };
                let _ = tx.send(t0.elapsed());
            })
            .unwrap();
        // Poke until it wakes (a poke before the sleep began is lost, as in start_shards).
        let mut slept = None;
        // The thread names itself once it runs.
        while thread_state("probe-poked") == "its thread is gone" {
            std::thread::sleep(Duration::from_millis(1));
        }
        for _ in 0..50 {
            assert!(
                poke_awake("probe-poked"),
                "the thread was found and signalled"
            );
            if let Ok(d) = rx.recv_timeout(Duration::from_millis(100)) {
                slept = Some(d);
                break;
            }
        }
        let slept = slept.expect("the poked thread woke");
        assert!(slept < Duration::from_secs(10), "slept {slept:?}");
        t.join().unwrap();
        assert!(!poke_awake("no-such-thread"));
    }
}
