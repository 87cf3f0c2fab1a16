//! Where log lines go: a dedicated writer thread (`tracing-appender`'s non-blocking writer)
//! fed by a bounded queue of `log.buffered_lines` lines, in lossy mode. A shard formats a line
//! and hands it over; it never waits on stderr. When the queue is full (stderr is a pipe
//! nobody reads fast enough), the line is dropped and counted: `xiaozhi_log_lines_dropped_total`
//! in `/metrics`, and a last line at exit.
//!
//! The returned [`WorkerGuard`] must live until the process exits: dropping it flushes the
//! queue (what tests and operators read last — the drain, "bye" — would otherwise be lost).

use std::io::Write;
use std::sync::OnceLock;

pub use tracing_appender::non_blocking::WorkerGuard;
use tracing_appender::non_blocking::{ErrorCounter, NonBlocking, NonBlockingBuilder};

/// The process's dropped-lines counter, once the writer is installed.
static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// A non-blocking, lossy writer into `out` holding at most `buffered_lines` lines.
pub fn writer<W: Write + Send + 'static>(
    buffered_lines: usize,
    out: W,
) -> (NonBlocking, WorkerGuard) {
    NonBlockingBuilder::default()
        .buffered_lines_limit(buffered_lines.max(1))
        .lossy(true)
        .thread_name("log-writer")
        .finish(out)
}

/// Installs the global subscriber (filter `filter`, stderr through a non-blocking writer,
/// coloured only on a terminal); keep the guard until exit.
pub fn install(filter: tracing_subscriber::EnvFilter, buffered_lines: usize) -> WorkerGuard {
    use std::io::IsTerminal;
    let ansi = std::io::stderr().is_terminal();
    // Buffered: the writer thread flushes after each batch it drains.
    let (writer, guard) = writer(buffered_lines, std::io::BufWriter::new(std::io::stderr()));
    let _ = DROPPED.set(writer.error_counter());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi)
        .init();
    guard
}

/// Log lines dropped so far because the writer's queue was full (0 before [`install`]).
pub fn dropped_lines() -> u64 {
    DROPPED.get().map_or(0, |c| c.dropped_lines() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A sink that blocks every write until released, then keeps what it got.
    #[derive(Clone)]
    struct Stalled {
        release: Arc<Mutex<()>>,
        got: Arc<Mutex<Vec<u8>>>,
    }

    impl Write for Stalled {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let _wait = self.release.lock().map_err(|_| std::io::ErrorKind::Other)?;
            self.got
                .lock()
                .map_err(|_| std::io::ErrorKind::Other)?
                .extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_sink_never_blocks_the_caller_and_lines_beyond_the_queue_are_counted() {
        let sink = Stalled {
            release: Arc::new(Mutex::new(())),
            got: Arc::new(Mutex::new(Vec::new())),
        };
        let stall = sink.release.lock().expect("lock");
        let (mut w, guard) = writer(4, sink.clone());
        let counter = w.error_counter();
        for i in 0..1000 {
            // Would block forever at the fifth line if the writer waited for the sink.
            w.write_all(format!("line {i}\n").as_bytes())
                .expect("write");
        }
        // Four lines wait in the queue and the writer thread holds at most one more.
        let dropped = counter.dropped_lines();
        assert!((995..=996).contains(&dropped), "{dropped}");
        drop(stall);
        // Dropping the guard flushes what was queued.
        drop(guard);
        let got = String::from_utf8(sink.got.lock().expect("lock").clone()).expect("utf8");
        assert_eq!(got.lines().count(), 1000 - dropped);
        assert!(got.starts_with("line 0\n"), "{got}");
    }
}
