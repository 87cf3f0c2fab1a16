//! Thread-per-core runtime for network servers, with no knowledge of any protocol.
//!
//! - [`plan`]: which CPU cores run shard executors and which run inference workers.
//! - [`runtime`]: one pinned glommio executor per shard core, each with its own
//!   `SO_REUSEPORT` listeners (the kernel spreads accepts; no shared lock), a control
//!   channel for cross-core requests, and a watchdog tick.
//! - [`workers`]: pinned inference threads fed over bounded flume channels, batching what is
//!   queued, replying on the originating shard's channel; a key is sticky to one worker, so
//!   results for one key arrive in submission order.
//! - [`mailbox`]: a bounded, shard-local, single-consumer queue for a task's inbox.
//! - [`tick_batch`]: a shard-local gatherer that sends many small jobs as one batch per tick.
//! - [`sweep`]: a shard's device sockets in one epoll set, looked at once per tick, so the reads
//!   of many connections wake the shard once instead of once per packet.
//! - [`signals`]: SIGINT/SIGTERM turned into a drain request on every shard.
//!
//! Shard-local state stays in `Rc`/`RefCell`; the only ways across cores are the channels here.

pub mod mailbox;
pub mod plan;
pub mod runtime;
pub mod signals;
pub mod sweep;
pub mod threads;
pub mod tick_batch;
pub mod workers;

pub use mailbox::Mailbox;
pub use plan::{CorePlan, PlanError};
pub use runtime::{start_shards, Control, ShardContext, ShardMesh, ShardSettings, ShardsHandle};
pub use sweep::{Sweep, SweepStats, SweptStream};
pub use tick_batch::{Batch, TickBatch};
pub use workers::{BatchWorker, Routed, SubmitError, WorkerPool, WorkerPoolConfig};
