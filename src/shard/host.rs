//! The shard's side of the connection wing: [`ShardHost`] implements
//! [`Host`](crate::connection::Host) over a [`Shard`] (admission into its session registry,
//! hand-off to a shard with room, its counters and histograms), and
//! [`Shard::connection_context`] gives each connection the narrow context it runs with.

use std::net::IpAddr;
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::time::Instant;

use crate::connection::{
    Admission, ConnectionContext, Count, End, Host, Outcome, Refusal, Upgrade,
};
use crate::metrics::{Stage, Transport};

use super::Shard;

/// A shard as its connections see it.
pub struct ShardHost(pub Rc<Shard>);

impl Shard {
    /// The context a new connection on this shard runs with.
    pub fn connection_context(self: &Rc<Self>) -> ConnectionContext {
        ConnectionContext {
            shard: self.id,
            settings: self.connection.clone(),
            providers: self.providers.clone(),
            host: Rc::new(ShardHost(self.clone())),
            sweep: self.sweep.clone(),
        }
    }
}

impl Host for ShardHost {
    fn admit(&self) -> Result<Admission, Refusal> {
        let slot = self.0.admit()?;
        Ok(Admission::new(
            slot.key(),
            slot.mailbox.clone(),
            Box::new(slot),
        ))
    }

    fn hand_off(&self, fd: OwnedFd, upgrade: Upgrade) -> bool {
        match self.0.hand_off(fd, upgrade) {
            Some(to) => {
                tracing::debug!(
                    shard = self.0.id,
                    to,
                    "shard full: handed a connection over"
                );
                true
            }
            None => false,
        }
    }

    fn allow_connection_from(&self, ip: IpAddr) -> bool {
        self.0.allow_connection_from(ip)
    }

    fn drain_deadline(&self) -> Option<Instant> {
        self.0.drain_deadline()
    }

    fn count(&self, what: Count) {
        let mut stats = self.0.stats.borrow_mut();
        match what {
            Count::HandshakeError => stats.handshake_errors += 1,
            Count::ProxyHeaderError => stats.proxy_header_errors += 1,
            Count::PlainHttp => stats.plain_http += 1,
            Count::IdentityError => stats.identity_errors += 1,
            Count::AuthFailure => stats.auth_failures += 1,
            Count::RefusedFull => stats.refused_full += 1,
            Count::ReadBudgetYield => stats.read_budget_yields += 1,
            Count::InboundThrottled => stats.inbound_throttled += 1,
        }
    }

    fn opened(&self, transport: Transport) {
        self.0.stats.borrow_mut().transports.opened(transport);
    }

    fn closed(&self, transport: Transport) {
        self.0.stats.borrow_mut().transports.closed(transport);
    }

    fn record(&self, transport: Transport, samples: &[(Stage, u64)]) {
        let mut h = self.0.hist.borrow_mut();
        for &(stage, v) in samples {
            h.record_on(transport, stage, v);
            if stage == Stage::EosToTtsStop {
                self.0
                    .stats
                    .borrow_mut()
                    .transports
                    .turn_answered(transport);
            }
        }
    }

    fn ended(&self, outcome: &Outcome) {
        let mut stats = self.0.stats.borrow_mut();
        match outcome.end {
            End::SlowConsumer => stats.slow_consumers += 1,
            End::Oversized => stats.oversized += 1,
            End::OversizedFrame => stats.oversized_frames += 1,
            End::ProtocolError => stats.protocol_errors += 1,
            End::HelloTimeout => stats.hello_timeouts += 1,
            End::Timeout => stats.idle_closes += 1,
            End::Normal => {}
        }
        stats.ended.add(&outcome.counters);
    }
}
