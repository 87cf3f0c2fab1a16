//! Log lines a device can cause again and again (an unknown message type, an MCP message
//! without an MCP session): each kind is written in full the first [`SHOWN`] times per
//! session, the last of them saying that the rest are only counted, and the count of the rest
//! is written once when the session ends. A device sending a million unknown messages costs
//! the log four lines, not a million (the session's counters still count every one).
//!
//! Every device-caused line, whatever its kind and text, also passes the session's
//! [`LogRate`]: a token bucket of `log.session_lines_per_s` lines per second with a burst of
//! `log.session_burst`. Lines beyond it are counted (`xiaozhi_log_lines_suppressed_total`), and
//! the next line written says how many were suppressed before it, as does the session's end.

use std::time::Instant;

/// Lines of one kind written in full per session.
pub const SHOWN: u64 = 3;

/// A kind of device-caused line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repeated {
    /// A message whose `type` the server does not know.
    UnknownType,
    /// An `mcp` message on a session without an MCP client.
    StrayMcp,
}

impl Repeated {
    const ALL: [Repeated; 2] = [Repeated::UnknownType, Repeated::StrayMcp];

    /// What the summary line calls these.
    pub fn what(self) -> &'static str {
        match self {
            Repeated::UnknownType => "unknown message types",
            Repeated::StrayMcp => "mcp messages without an MCP session",
        }
    }
}

/// Whether to write this occurrence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shown {
    /// Write it.
    Full,
    /// Write it, saying further ones are only counted.
    Last,
    /// Count it only.
    Counted,
}

impl Shown {
    /// True unless only counted.
    pub fn logged(self) -> bool {
        self != Shown::Counted
    }
}

/// One session's occurrences of each kind.
#[derive(Debug, Default, Clone, Copy)]
pub struct RepeatedLines {
    seen: [u64; 2],
}

impl RepeatedLines {
    /// Counts one occurrence of `kind` and says whether to write it.
    pub fn note(&mut self, kind: Repeated) -> Shown {
        let n = &mut self.seen[kind as usize];
        *n = n.saturating_add(1);
        match (*n).cmp(&SHOWN) {
            std::cmp::Ordering::Less => Shown::Full,
            std::cmp::Ordering::Equal => Shown::Last,
            std::cmp::Ordering::Greater => Shown::Counted,
        }
    }

    /// The kinds with occurrences that were counted but not written, and how many.
    pub fn suppressed(&self) -> impl Iterator<Item = (Repeated, u64)> + '_ {
        Repeated::ALL
            .into_iter()
            .map(|k| (k, self.seen[k as usize].saturating_sub(SHOWN)))
            .filter(|&(_, n)| n > 0)
    }
}

/// One session's budget of device-caused log lines (a token bucket).
#[derive(Debug, Clone, Copy)]
pub struct LogRate {
    per_s: f64,
    burst: f64,
    tokens: f64,
    at: Option<Instant>,
    /// Lines suppressed since the last one written.
    pending: u64,
}

/// What to do with one device-caused line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Write it; `suppressed_before` lines were suppressed since the last one written (say so
    /// first when not zero).
    Write {
        /// Lines suppressed since the last written one.
        suppressed_before: u64,
    },
    /// Do not write it (counted).
    Suppress,
}

impl LogRate {
    /// A budget of `per_s` lines per second, `burst` at once (a burst of at least one line).
    pub fn new(per_s: f64, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        LogRate {
            per_s: per_s.max(0.0),
            burst,
            tokens: burst,
            at: None,
            pending: 0,
        }
    }

    /// Takes a token for a line at `now`, or counts it as suppressed.
    pub fn admit(&mut self, now: Instant) -> Admit {
        if let Some(at) = self.at {
            let refill = now.saturating_duration_since(at).as_secs_f64() * self.per_s;
            self.tokens = (self.tokens + refill).min(self.burst);
        }
        self.at = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Admit::Write {
                suppressed_before: std::mem::take(&mut self.pending),
            }
        } else {
            self.pending += 1;
            Admit::Suppress
        }
    }

    /// Lines suppressed since the last one written (to report when the session ends).
    pub fn pending(&self) -> u64 {
        self.pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_rate_writes_a_burst_then_one_line_per_token_and_says_how_many_were_suppressed() {
        let t0 = Instant::now();
        let mut rate = LogRate::new(2.0, 3);
        let first: Vec<_> = (0..10).map(|_| rate.admit(t0)).collect();
        assert!(first[..3].iter().all(|a| *a
            == Admit::Write {
                suppressed_before: 0
            }));
        assert!(first[3..].iter().all(|a| *a == Admit::Suppress));
        assert_eq!(rate.pending(), 7);
        // Half a second later one token has come back: the line says 7 went unwritten.
        let later = t0 + Duration::from_millis(500);
        assert_eq!(
            rate.admit(later),
            Admit::Write {
                suppressed_before: 7
            }
        );
        assert_eq!(rate.admit(later), Admit::Suppress);
        assert_eq!(rate.pending(), 1);
        // A long silence refills the burst, never more.
        let much_later = t0 + Duration::from_secs(3600);
        let refilled: Vec<_> = (0..4).map(|_| rate.admit(much_later)).collect();
        assert_eq!(
            refilled[0],
            Admit::Write {
                suppressed_before: 1
            }
        );
        assert_eq!(
            refilled[1..3],
            [Admit::Write {
                suppressed_before: 0
            }; 2]
        );
        assert_eq!(refilled[3], Admit::Suppress);
    }

    #[test]
    fn the_first_few_are_written_then_only_counted_per_kind() {
        let mut r = RepeatedLines::default();
        let shown: Vec<_> = (0..1000).map(|_| r.note(Repeated::UnknownType)).collect();
        assert_eq!(&shown[..3], &[Shown::Full, Shown::Full, Shown::Last]);
        assert!(shown[3..].iter().all(|s| *s == Shown::Counted));
        assert_eq!(r.note(Repeated::StrayMcp), Shown::Full);
        assert_eq!(
            r.suppressed().collect::<Vec<_>>(),
            [(Repeated::UnknownType, 997)]
        );
    }
}
