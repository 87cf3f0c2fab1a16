//! Counters declared once: [`counters!`] declares a struct of plain `u64` counters together
//! with each one's Prometheus name, help, type and how it combines across shards, and yields
//! the struct, its `merge` and its exported [`Sample`]s. [`render`] turns the samples of every
//! shard into Prometheus text without naming a single field, so adding a counter is one line.
//!
//! This module is a leaf: it knows nothing of shards, sessions or HTTP; the structs declared
//! with the macro live beside the code that counts.

use std::fmt::Write;

/// How a number combines across shards and how many lines it gets in `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Summed over shards; one instance-wide line.
    Sum,
    /// One line per shard (label `shard`); the merged value is the sum.
    PerShard,
    /// The largest value any shard reports; one line (for numbers every shard sees alike,
    /// such as the depth of a queue the shards share).
    Max,
}

impl Scope {
    /// `a` and `b` combined the way this scope merges shards.
    pub fn combine(self, a: u64, b: u64) -> u64 {
        match self {
            Scope::Sum | Scope::PerShard => a.saturating_add(b),
            Scope::Max => a.max(b),
        }
    }
}

/// The Prometheus type of a number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only grows.
    Counter,
    /// Goes up and down.
    Gauge,
}

impl Kind {
    /// The word in the `# TYPE` line.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        }
    }
}

/// One exported number of a counter struct `S`: its name, help, type, scope, an optional
/// extra label (several fields can share one name, e.g. `result="ok"`), and how to read it.
pub struct Metric<S> {
    /// Prometheus name.
    pub name: &'static str,
    /// The `# HELP` text.
    pub help: &'static str,
    /// Counter or gauge.
    pub kind: Kind,
    /// How shards combine.
    pub scope: Scope,
    /// An extra label `(key, value)`.
    pub label: Option<(&'static str, &'static str)>,
    /// Reads the number from a struct.
    pub read: fn(&S) -> u64,
}

impl<S> Metric<S> {
    /// This metric's value in `s`.
    pub fn sample(&self, s: &S) -> Sample {
        Sample {
            name: self.name,
            help: self.help,
            kind: self.kind,
            scope: self.scope,
            label: self.label,
            value: (self.read)(s),
        }
    }
}

/// One number ready to render.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// Prometheus name.
    pub name: &'static str,
    /// The `# HELP` text.
    pub help: &'static str,
    /// Counter or gauge.
    pub kind: Kind,
    /// How shards combine.
    pub scope: Scope,
    /// An extra label `(key, value)`.
    pub label: Option<(&'static str, &'static str)>,
    /// The value.
    pub value: u64,
}

/// A struct of counters that can merge another shard's copy and list its samples.
pub trait Counters {
    /// Adds `other` into `self` as each field's [`Scope`] says.
    fn merge_from(&mut self, other: &Self);
    /// Pushes every exported number, in declaration order (nested structs after own fields).
    fn samples(&self, out: &mut Vec<Sample>);
}

/// The first label of `labels`, if any (lets the macro make an optional label in a `const`).
pub const fn first_label(
    labels: &[(&'static str, &'static str)],
) -> Option<(&'static str, &'static str)> {
    match labels {
        [first, ..] => Some(*first),
        [] => None,
    }
}

/// Declares a counter struct once and yields the struct, `merge` and its [`Counters`] impl.
///
/// ```ignore
/// counters! {
///     /// The HTTP port's counters.
///     #[derive(Debug, Default, Clone, Copy)]
///     pub struct HttpCounters {
///         /// Connections answered 503.
///         refused_full: Sum Counter "xiaozhi_http_refused_full_total" "HTTP connections refused.",
///         /// Answered by the model.
///         ok: Sum Counter "xiaozhi_vision_requests_total" {result = "ok"} "Requests by result.",
///     }
///     plain {
///         /// Not exported, not merged (e.g. the shard index).
///         shard: usize,
///     }
///     nested {
///         /// Another counter struct, merged and exported after the fields above.
///         http: HttpCounters,
///     }
/// }
/// ```
macro_rules! counters {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $(
                $(#[doc = $doc:literal])*
                $field:ident : $scope:ident $kind:ident $metric:literal
                    $({ $lk:ident = $lv:literal })? $help:literal
            ),* $(,)?
        }
        $(plain {
            $( $(#[doc = $pdoc:literal])* $pfield:ident : $pty:ty ),* $(,)?
        })?
        $(nested {
            $( $(#[doc = $ndoc:literal])* $nfield:ident : $nty:ty ),* $(,)?
        })?
    ) => {
        $(#[$meta])*
        pub struct $name {
            $($( $(#[doc = $pdoc])* pub $pfield: $pty, )*)?
            $( $(#[doc = $doc])* pub $field: u64, )*
            $($( $(#[doc = $ndoc])* pub $nfield: $nty, )*)?
        }

        impl $name {
            /// The numbers this struct exports itself (nested structs list their own).
            pub const METRICS: &'static [$crate::metrics::counters::Metric<$name>] = &[$(
                $crate::metrics::counters::Metric {
                    name: $metric,
                    help: $help,
                    kind: $crate::metrics::counters::Kind::$kind,
                    scope: $crate::metrics::counters::Scope::$scope,
                    label: $crate::metrics::counters::first_label(&[$((stringify!($lk), $lv))?]),
                    read: |s: &$name| s.$field,
                },
            )*];

            /// Adds `o` into `self` (for a merged view across shards).
            pub fn merge(&mut self, o: &$name) {
                $(
                    self.$field = $crate::metrics::counters::Scope::$scope
                        .combine(self.$field, o.$field);
                )*
                $($( $crate::metrics::counters::Counters::merge_from(
                    &mut self.$nfield, &o.$nfield); )*)?
            }
        }

        impl $crate::metrics::counters::Counters for $name {
            fn merge_from(&mut self, other: &Self) {
                self.merge(other);
            }

            fn samples(&self, out: &mut Vec<$crate::metrics::counters::Sample>) {
                out.extend(Self::METRICS.iter().map(|m| m.sample(self)));
                $($( $crate::metrics::counters::Counters::samples(&self.$nfield, out); )*)?
            }
        }
    };
}
pub(crate) use counters;

/// Renders the samples of every shard (`(shard index, samples)`, every list in the same order,
/// as [`Counters::samples`] gives them) and their merged `total` as Prometheus text: one
/// `# HELP`/`# TYPE` pair per name, one line per shard for [`Scope::PerShard`], one line
/// otherwise.
pub fn render(out: &mut String, shards: &[(usize, Vec<Sample>)], total: &[Sample]) {
    let mut last_name = "";
    for (i, t) in total.iter().enumerate() {
        if t.name != last_name {
            let _ = writeln!(out, "# HELP {} {}", t.name, t.help);
            let _ = writeln!(out, "# TYPE {} {}", t.name, t.kind.name());
            last_name = t.name;
        }
        let extra = t
            .label
            .map(|(k, v)| format!("{k}=\"{v}\""))
            .unwrap_or_default();
        match t.scope {
            Scope::PerShard => {
                for (shard, samples) in shards {
                    let value = samples.get(i).map_or(0, |s| s.value);
                    let sep = if extra.is_empty() { "" } else { "," };
                    let _ = writeln!(out, "{}{{shard=\"{shard}\"{sep}{extra}}} {value}", t.name);
                }
            }
            Scope::Sum | Scope::Max if extra.is_empty() => {
                let _ = writeln!(out, "{} {}", t.name, t.value);
            }
            Scope::Sum | Scope::Max => {
                let _ = writeln!(out, "{}{{{extra}}} {}", t.name, t.value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    counters! {
        /// A test struct.
        #[derive(Debug, Default, Clone, Copy)]
        pub struct Inner {
            /// A labelled counter.
            ok: Sum Counter "t_requests_total" {result = "ok"} "Requests by result.",
            /// Another label of the same name.
            failed: Sum Counter "t_requests_total" {result = "failed"} "Requests by result.",
        }
    }

    counters! {
        /// A test struct.
        #[derive(Debug, Default, Clone, Copy)]
        pub struct Outer {
            /// Per shard.
            open: PerShard Gauge "t_open" "Open things.",
            /// Largest.
            depth: Max Gauge "t_depth" "Queue depth.",
            /// Summed.
            total: Sum Counter "t_total" "Things.",
        }
        plain {
            /// Not exported.
            shard: usize,
        }
        nested {
            /// Nested.
            inner: Inner,
        }
    }

    #[test]
    fn one_declaration_gives_merge_and_prometheus_lines() {
        let a = Outer {
            shard: 0,
            open: 2,
            depth: 5,
            total: 1,
            inner: Inner { ok: 1, failed: 0 },
        };
        let b = Outer {
            shard: 1,
            open: 3,
            depth: 4,
            total: 2,
            inner: Inner { ok: 2, failed: 1 },
        };
        let mut merged = Outer::default();
        merged.merge(&a);
        merged.merge(&b);
        assert_eq!((merged.open, merged.depth, merged.total), (5, 5, 3));
        assert_eq!(merged.shard, 0, "plain fields are not merged");
        let samples = |o: &Outer| {
            let mut v = Vec::new();
            o.samples(&mut v);
            v
        };
        let mut out = String::new();
        render(
            &mut out,
            &[(0, samples(&a)), (1, samples(&b))],
            &samples(&merged),
        );
        assert_eq!(
            out,
            "# HELP t_open Open things.\n# TYPE t_open gauge\n\
             t_open{shard=\"0\"} 2\nt_open{shard=\"1\"} 3\n\
             # HELP t_depth Queue depth.\n# TYPE t_depth gauge\nt_depth 5\n\
             # HELP t_total Things.\n# TYPE t_total counter\nt_total 3\n\
             # HELP t_requests_total Requests by result.\n# TYPE t_requests_total counter\n\
             t_requests_total{result=\"ok\"} 3\nt_requests_total{result=\"failed\"} 1\n"
        );
    }
}
