//! Log lines a device can cause again and again (an unknown message type, an MCP message
//! without an MCP session): each kind is written in full the first [`SHOWN`] times per
//! session, the last of them saying that the rest are only counted, and the count of the rest
//! is written once when the session ends. A device sending a million unknown messages costs
//! the log four lines, not a million (the session's counters still count every one).

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

#[cfg(test)]
mod tests {
    use super::*;

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
