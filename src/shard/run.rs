//! A shard's life: [`run_shard`] builds the shard ([`Shard::build`]), starts it (reply
//! routers, listeners, background tasks), answers its control channel until told to drain,
//! drains ([`super::drain::drain`]) and hands its histograms to the main thread.

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use glommio::{Latency, Shares};
use shards::{Control, ShardContext};

use super::{drain, histograms, peers, replies, BoundAddrs, Shard, ShardFinal, ShardRequest};
use crate::config::Config;
use crate::inference::{InferenceQueues, ShardReplies};
use crate::metrics::intervals::IntervalLog;
use crate::providers::asr::AsrOutput;
use crate::providers::tts::TtsAudio;
use crate::providers::vad::VadScores;

/// The process-wide inputs each shard copies at start.
#[derive(Clone)]
pub struct ServerEnv {
    /// Configuration.
    pub config: Config,
    /// Job queues into the inference workers.
    pub queues: InferenceQueues,
    /// Reply receivers, by shard id.
    pub replies: Vec<ShardReplies>,
    /// Reports each shard's bind result to the main thread.
    pub startup: flume::Sender<Result<BoundAddrs, String>>,
    /// Each shard's histograms once it has drained (bounded: one per shard).
    pub finals: flume::Sender<ShardFinal>,
}

/// The tasks a started shard runs; dropping one stops it.
struct Running {
    ws_accept: glommio::Task<()>,
    /// The HTTP port, reply routers and background tasks: stopped after the drain.
    rest: Vec<glommio::Task<()>>,
}

/// A shard's main future: build, start, serve, and on `Control::Drain` drain and return.
pub async fn run_shard(ctx: ShardContext<ShardRequest>, env: ServerEnv) {
    let replies = env.replies.get(ctx.id).cloned();
    let shard = match Shard::build(ctx.id, ctx.mesh.clone(), env.config, env.queues, replies) {
        Ok(shard) => shard,
        Err(e) => {
            let _ = env.startup.send(Err(format!("shard {}: {e}", ctx.id)));
            return;
        }
    };
    let running = match start(&shard) {
        Ok((running, addrs)) => {
            let _ = env.startup.send(Ok(addrs));
            running
        }
        Err(e) => {
            let _ = env.startup.send(Err(format!("shard {}: {e}", ctx.id)));
            return;
        }
    };

    // Answer other shards until asked to drain.
    while let Ok(msg) = ctx.control.recv_async().await {
        match msg {
            Control::User(request) => peers::answer(&shard, request),
            Control::Drain => break,
        }
    }
    drain::drain(&shard, running.ws_accept, &ctx.control).await;
    drop(running.rest);
    let _ = env.finals.try_send(ShardFinal {
        shard: shard.id,
        hist: shard.hist.borrow().clone(),
        intervals: shard
            .intervals
            .as_ref()
            .map(|l| l.replace(IntervalLog::new(std::time::SystemTime::now(), 1))),
    });
}

/// Binds both ports and spawns the reply routers, the accept loops and the background tasks;
/// says where the ports ended up.
fn start(shard: &Rc<Shard>) -> Result<(Running, BoundAddrs), String> {
    let ip = shard.config.server.ip;
    let bind = |port: u16| -> Result<glommio::net::TcpListener, String> {
        let addr = SocketAddr::new(ip, port);
        glommio::net::TcpListener::bind(addr).map_err(|e| format!("cannot listen on {addr}: {e}"))
    };
    let ws_listener = bind(shard.config.server.port)?;
    let http_listener = bind(shard.config.server.http_port)?;
    let unspecified = || SocketAddr::from(([0, 0, 0, 0], 0));
    let ws_addr = ws_listener.local_addr().unwrap_or_else(|_| unspecified());
    let http_addr = http_listener.local_addr().unwrap_or_else(|_| unspecified());
    shard.http_port.set(http_addr.port());

    let mut rest = spawn_routers(shard);
    let http_ctx = shard.http_context(ws_addr);
    rest.push(glommio::spawn_local(histograms::measure_timer_lateness(
        shard.clone(),
    )));
    if shard.intervals.is_some() {
        rest.push(glommio::spawn_local(histograms::record_intervals(
            shard.clone(),
        )));
    }
    if shard.mesh.len() > 1 {
        rest.push(glommio::spawn_local(peers::announce_load(shard.clone())));
    }
    let ws_accept = glommio::spawn_local({
        let shard = shard.clone();
        async move {
            loop {
                match ws_listener.accept().await {
                    Ok(stream) => {
                        let ctx = shard.connection_context();
                        glommio::spawn_local(crate::connection::accept::serve(stream, ctx))
                            .detach();
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed on the WebSocket port");
                        glommio::timer::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        }
    });
    rest.push(glommio::spawn_local(async move {
        loop {
            match http_listener.accept().await {
                Ok(stream) => {
                    glommio::spawn_local(crate::http::serve_connection(stream, http_ctx.clone()))
                        .detach();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed on the HTTP port");
                    glommio::timer::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }));
    Ok((Running { ws_accept, rest }, (shard.id, ws_addr, http_addr)))
}

/// One router per kind of inference reply, in a latency-sensitive task queue.
fn spawn_routers(shard: &Rc<Shard>) -> Vec<glommio::Task<()>> {
    let Some(r) = shard.replies.clone() else {
        return Vec::new();
    };
    let tq = glommio::executor().create_task_queue(
        Shares::default(),
        Latency::Matters(Duration::from_millis(1)),
        "inference-replies",
    );
    let mut routers = Vec::new();
    routers.extend(
        glommio::spawn_local_into(replies::route::<VadScores>(shard.clone(), r.vad), tq).ok(),
    );
    routers.extend(
        glommio::spawn_local_into(replies::route::<AsrOutput>(shard.clone(), r.asr), tq).ok(),
    );
    routers.extend(
        glommio::spawn_local_into(replies::route::<TtsAudio>(shard.clone(), r.tts), tq).ok(),
    );
    routers
}
