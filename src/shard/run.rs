//! A shard's life: [`run_shard`] builds the shard ([`Shard::build`]), starts it (reply
//! routers, listeners, background tasks), answers its control channel until told to drain,
//! drains ([`super::drain::drain`]) and hands its histograms to the main thread.

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use glommio::{Latency, Shares};
use shards::{Control, ShardContext};

use super::{
    drain, histograms, peers, replies, vad_tick, BoundAddrs, Shard, ShardFinal, ShardRequest,
};
use crate::config::Config;
use crate::connection::mqtt::MqttEndpoint;
use crate::connection::udp::UdpAudio;
use crate::inference::{InferenceQueues, ShardReplies};
use crate::metrics::intervals::IntervalLog;
use crate::providers::asr::AsrOutput;
use crate::providers::tts::TtsAudio;

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
    /// The device ports' accept loops (WebSocket, MQTT): stopped when the drain stops accepting.
    accepts: Vec<glommio::Task<()>>,
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
    drain::drain(&shard, running.accepts, &ctx.control).await;
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
    if let Some(sweep) = &shard.sweep {
        // In the connections' task queue: a sweep yields once after waking them, so it runs
        // again only after all of them did (see shards::sweep).
        rest.push(glommio::spawn_local(sweep.clone().run()));
    }
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
    let ws_accept = accept_loop(ws_listener, "WebSocket", {
        let shard = shard.clone();
        move |stream| crate::connection::accept::serve(stream, shard.connection_context())
    });
    rest.push(accept_loop(http_listener, "HTTP", move |stream| {
        crate::http::serve_connection(stream, http_ctx.clone())
    }));
    let mut accepts = vec![ws_accept];
    if shard.config.mqtt.enabled {
        let (mqtt_accept, udp_receive) = start_mqtt(shard)?;
        accepts.push(mqtt_accept);
        rest.push(udp_receive);
    }
    Ok((Running { accepts, rest }, (shard.id, ws_addr, http_addr)))
}

/// Binds the MQTT port (SO_REUSEPORT, shared by every shard) and this shard's own UDP port
/// (`mqtt.udp_port_base` + shard index, or an ephemeral one), and spawns their loops.
fn start_mqtt(shard: &Rc<Shard>) -> Result<(glommio::Task<()>, glommio::Task<()>), String> {
    let config = &shard.config.mqtt;
    let ip = shard.config.server.ip;
    let udp_port = match config.udp_port_base {
        0 => 0,
        base => u16::try_from(usize::from(base) + shard.id).map_err(|_| {
            format!(
                "mqtt.udp_port_base {base} + shard {} is past 65535",
                shard.id
            )
        })?,
    };
    let udp_addr = SocketAddr::new(ip, udp_port);
    let udp = UdpAudio::bind(udp_addr)
        .map_err(|e| format!("cannot bind UDP audio on {udp_addr}: {e}"))?;
    let announce = {
        let (mesh, me) = (shard.mesh.clone(), shard.id);
        Box::new(move |client_id: &str| {
            for to in (0..mesh.len()).filter(|&to| to != me) {
                let request = ShardRequest::MqttClientConnected {
                    client_id: client_id.to_string(),
                };
                let _ = mesh.try_send(to, Control::User(request));
            }
        })
    };
    let endpoint = MqttEndpoint::new(
        config.clone(),
        udp.clone(),
        shard.connection_limit,
        announce,
    )?;
    let mqtt_addr = SocketAddr::new(ip, config.port);
    let listener = glommio::net::TcpListener::bind(mqtt_addr)
        .map_err(|e| format!("cannot listen on {mqtt_addr}: {e}"))?;
    tracing::info!(
        shard = shard.id,
        mqtt = %listener.local_addr().unwrap_or(mqtt_addr),
        udp_port = udp.port(),
        "MQTT + UDP listening"
    );
    *shard.mqtt.borrow_mut() = Some(endpoint.clone());
    let accept = accept_loop(listener, "MQTT", {
        let shard = shard.clone();
        move |stream| {
            crate::connection::mqtt::serve(stream, shard.connection_context(), endpoint.clone())
        }
    });
    Ok((accept, glommio::spawn_local(udp.receive())))
}

/// Accepts connections on `listener` until dropped, serving each in its own task.
fn accept_loop<F, Fut>(
    listener: glommio::net::TcpListener,
    port: &'static str,
    serve: F,
) -> glommio::Task<()>
where
    F: Fn(glommio::net::TcpStream) -> Fut + 'static,
    Fut: std::future::Future<Output = ()> + 'static,
{
    glommio::spawn_local(async move {
        loop {
            match listener.accept().await {
                Ok(stream) => {
                    glommio::spawn_local(serve(stream)).detach();
                }
                Err(e) => {
                    tracing::warn!(error = %e, port, "accept failed");
                    glommio::timer::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    })
}

/// One router per kind of inference reply and the VAD flusher, in a latency-sensitive task
/// queue.
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
    routers.extend(glommio::spawn_local_into(replies::route_vad(shard.clone(), r.vad), tq).ok());
    routers.extend(glommio::spawn_local_into(vad_tick::flush(shard.clone()), tq).ok());
    routers.extend(
        glommio::spawn_local_into(replies::route::<AsrOutput>(shard.clone(), r.asr), tq).ok(),
    );
    routers.extend(
        glommio::spawn_local_into(replies::route::<TtsAudio>(shard.clone(), r.tts), tq).ok(),
    );
    routers
}
