//! SIGINT/SIGTERM handling: a plain thread turns signals into calls the application chooses
//! (first signal: drain every shard; a second one: the application may exit at once).

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

/// Calls `on_signal(n, signo)` for the n-th (1-based) SIGINT or SIGTERM, from a dedicated thread.
pub fn on_termination<F>(on_signal: F) -> std::io::Result<()>
where
    F: Fn(u32, i32) + Send + 'static,
{
    let mut signals = Signals::new([SIGINT, SIGTERM])?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut count = 0;
            for signo in signals.forever() {
                count += 1;
                on_signal(count, signo);
            }
        })?;
    Ok(())
}
