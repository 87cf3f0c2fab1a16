//! The loop every transport's driver shares: wait on the device's link, the session's mailbox
//! and the next timer; give each event to the [`Session`]; hand what it asks for to the
//! [`Runner`]; send what is left for the device with a write timeout (a device that stops
//! reading is disconnected). A transport supplies only a [`Link`]: how it waits for the
//! device, how what arrived becomes session input, and how it frames and writes text, audio
//! and the close. The WebSocket ([`super::websocket`]) and MQTT + UDP ([`super::mqtt`])
//! drivers are two links over this one loop, so the session is driven the same way on both.
//! After `server.read_budget_messages` wake-ups in a row that were ready at once the loop
//! yields ([`ReadBudget`]), so a flooding device shares its core; and a device that sends more
//! messages or bytes a second than `server.inbound_*` allow is read more slowly
//! ([`InboundRate`]), so it cannot take a shard's core over time either.

use std::rc::Rc;
use std::time::{Duration, Instant};

use super::effects::Runner;
use super::read_budget::{InboundRate, ReadBudget};
use super::{ConnectionContext, Count, End, Host, Outcome};
use crate::metrics::Transport;
use crate::session::{CloseCause, Effects, Outgoing, Session, SessionEvent};

/// What a link made of one input from the device.
// Returned once per input and consumed at once by the loop: boxing the effects would cost an
// allocation per frame to save a move.
#[allow(clippy::large_enum_variant)]
pub enum Handled {
    /// Effects for the driver to carry out (empty for a ping or a packet with no meaning).
    Effects(Effects),
    /// Close the link with this code and reason, and end the session this way.
    Close {
        /// Close code (WebSocket numbering; a link without codes ignores it).
        code: u16,
        /// Human-readable reason.
        reason: String,
        /// How the session ended.
        end: End,
    },
    /// The device is gone (or the link must end without a goodbye): end the session now.
    Gone(End),
}

/// One transport's side of a session: waiting for the device and writing to it.
#[allow(async_fn_in_trait)] // driven on one glommio executor: the futures need not be Send
pub trait Link {
    /// Something that arrived from the device (or that its socket ended).
    type Input;

    /// The transport `session` runs on (its label in `/metrics`).
    fn transport(&self, session: &Session) -> Transport;

    /// Bytes `input` carried, for the inbound rate (0 for inputs that carry none).
    fn weight(input: &Self::Input) -> usize;

    /// Waits for the next input. Must be cancel-safe: the driver drops it when the mailbox or
    /// a timer wins the race.
    async fn next(&mut self) -> Self::Input;

    /// Gives one input to the session.
    fn handle(
        &mut self,
        input: Self::Input,
        session: &mut Session,
        ctx: &ConnectionContext,
        now: Instant,
    ) -> Handled;

    /// Writes one text or audio item (never [`Outgoing::Close`]); `Err` when the link failed.
    async fn send(&mut self, item: Outgoing, session: &Session) -> Result<(), ()>;

    /// Writes whatever the link queued on its own (protocol answers such as PINGRESP).
    async fn flush(&mut self) -> Result<(), ()> {
        Ok(())
    }

    /// Closes after the session asked to (bounded by `limit`).
    async fn close(&mut self, code: u16, reason: String, limit: Duration);

    /// The link's own deadline (the MQTT keepalive), if any.
    fn deadline(&self) -> Option<Instant> {
        None
    }

    /// The link's deadline passed at `now`: how the session ends, if it does.
    fn expired(&mut self, _now: Instant) -> Option<End> {
        None
    }
}

enum Wake<I> {
    Input(I),
    Event(Option<SessionEvent>),
    Timer,
}

/// Runs `session` over `link` until it closes, starting with the effects `pending` (a drain
/// that began before the session, or the answer to the message that opened it).
pub async fn drive<L: Link>(
    link: &mut L,
    mut session: Session,
    mailbox: &Rc<shards::Mailbox<SessionEvent>>,
    ctx: &ConnectionContext,
    mut pending: Effects,
) -> Outcome {
    let transport = link.transport(&session);
    let _open = OpenSession::new(ctx.host.clone(), transport);
    let server = &ctx.settings.server;
    // Dropping the runner cancels the LLM stream, the remote calls and the session's queued
    // inference jobs: whenever this function returns.
    let mut runner = Runner::new(
        ctx.shard,
        session.key,
        ctx.providers.clone(),
        mailbox.clone(),
    );
    let write_timeout = Duration::from_millis(server.write_timeout_ms);
    let max_queue = server.outbound_queue_messages;
    let mut budget = ReadBudget::new(server.read_budget_messages);
    let mut rate = InboundRate::new(
        server.inbound_messages_per_s,
        server.inbound_messages_burst,
        server.inbound_bytes_per_s,
        server.inbound_bytes_burst,
        Instant::now(),
    );
    let mut throttled = 0u64;
    loop {
        let fx = runner.settle(&mut session, std::mem::take(&mut pending), Instant::now());
        if !fx.samples.is_empty() {
            ctx.host.record(transport, &fx.samples);
        }
        if fx.send.len() > max_queue {
            tracing::info!(session = %session.id, "device stopped reading; disconnecting");
            return Outcome::of(&session, End::SlowConsumer);
        }
        for item in fx.send {
            if let Outgoing::Close { code, reason } = item {
                let end = match session.close_cause() {
                    Some(CloseCause::HelloTimeout) => End::HelloTimeout,
                    Some(CloseCause::IdleTimeout | CloseCause::NoVoice) => End::Timeout,
                    _ => End::Normal,
                };
                link.close(code, reason, write_timeout).await;
                return Outcome::of(&session, end);
            }
            match within(link.send(item, &session), write_timeout).await {
                Some(Ok(())) => {}
                Some(Err(())) => return Outcome::of(&session, End::Normal),
                None => {
                    tracing::info!(session = %session.id, "device stopped reading; disconnecting");
                    return Outcome::of(&session, End::SlowConsumer);
                }
            }
        }
        match within(link.flush(), write_timeout).await {
            Some(Ok(())) => {}
            Some(Err(())) => return Outcome::of(&session, End::Normal),
            None => return Outcome::of(&session, End::SlowConsumer),
        }

        let deadline = match link.deadline() {
            Some(d) => d.min(session.next_deadline()),
            None => session.next_deadline(),
        };
        let wake = {
            let pause = rate.wait(Instant::now());
            if pause.is_some() {
                throttled += 1;
                ctx.host.count(Count::InboundThrottled);
                if throttled == 1 {
                    tracing::info!(
                        session = %session.id,
                        "device sends faster than server.inbound_* allow; reading it more slowly"
                    );
                }
            }
            let input = async {
                if let Some(pause) = pause {
                    glommio::timer::sleep(pause).await;
                }
                Wake::Input(link.next().await)
            };
            let event = async { Wake::Event(mailbox.recv().await) };
            let timer = async {
                let now = Instant::now();
                if deadline > now {
                    glommio::timer::sleep(deadline - now).await;
                } else {
                    // Due already (the rest of a reply's first burst, see
                    // audio_out::FRAMES_PER_PUMP): let the shard's other tasks run first.
                    futures_lite::future::yield_now().await;
                }
                Wake::Timer
            };
            let (wake, yielded) = budget
                .next(futures_lite::future::or(
                    input,
                    futures_lite::future::or(event, timer),
                ))
                .await;
            if yielded {
                ctx.host.count(Count::ReadBudgetYield);
            }
            wake
        };
        let now = Instant::now();
        pending = match wake {
            Wake::Input(input) => {
                rate.take(L::weight(&input), now);
                match link.handle(input, &mut session, ctx, now) {
                    Handled::Effects(fx) => fx,
                    Handled::Close { code, reason, end } => {
                        tracing::info!(session = %session.id, %reason, "closing on bad input");
                        link.close(code, reason, write_timeout).await;
                        return Outcome::of(&session, end);
                    }
                    Handled::Gone(end) => return Outcome::of(&session, end),
                }
            }
            Wake::Event(None) => return Outcome::of(&session, End::Normal),
            Wake::Event(Some(event)) => runner.on_event(&mut session, event, now),
            Wake::Timer => match link.expired(now) {
                Some(end) => return Outcome::of(&session, end),
                None => session.on_timer(now),
            },
        };
    }
}

/// A session counted open on its transport until this is dropped (however the drive ends).
struct OpenSession {
    host: Rc<dyn Host>,
    transport: Transport,
}

impl OpenSession {
    fn new(host: Rc<dyn Host>, transport: Transport) -> OpenSession {
        host.opened(transport);
        OpenSession { host, transport }
    }
}

impl Drop for OpenSession {
    fn drop(&mut self) {
        self.host.closed(self.transport);
    }
}

/// A text message from the device, whatever carried it: the session hears whether its
/// inference worker is busy first (a new turn is refused while it is).
pub fn text_in(
    session: &mut Session,
    ctx: &ConnectionContext,
    text: &str,
    now: Instant,
) -> Effects {
    let vad = &ctx.providers.vad;
    let (depth, cap) = (vad.outstanding(), vad.capacity());
    session.set_inference_busy(depth as f64 > ctx.settings.busy_watermark * cap as f64);
    session.on_text(text, now)
}

/// `fut`'s output, or `None` when `limit` passed first.
pub async fn within<T>(fut: impl std::future::Future<Output = T>, limit: Duration) -> Option<T> {
    let done = async { Some(fut.await) };
    let timeout = async {
        glommio::timer::sleep(limit).await;
        None
    };
    futures_lite::future::or(done, timeout).await
}
