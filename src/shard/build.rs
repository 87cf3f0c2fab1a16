//! Building a shard from the configuration: token signers, connection limits, the rate
//! limiter, trusted balancers, tools, its providers and connection settings; and the narrow
//! [`HttpContext`] its HTTP port gets (OTA settings, readiness, `/metrics`, `/histograms`,
//! the vision endpoint) instead of the whole shard.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use shards::{ShardMesh, TickBatch};

use super::{drain::Drain, stats, Shard, ShardRequest, ShardStats};
use crate::config::Config;
use crate::connection::settings::{ConnectionSettings, SharedParts};
use crate::front_door::rate_limit::AddressRateLimiter;
use crate::http::{HttpAdmission, HttpContext, OtaSettings};
use crate::inference::{InferenceQueues, ShardReplies};
use crate::metrics::intervals::IntervalLog;
use crate::metrics::StageHistograms;
use crate::protocol::TokenSigner;
use crate::providers::LocalQueues;

impl Shard {
    /// Shard `id` of `mesh`, from `config`, feeding `queues` and reading `replies` (only for
    /// their depth: the routers own clones). Nothing is bound or spawned here.
    pub fn build(
        id: usize,
        mesh: ShardMesh<ShardRequest>,
        config: Config,
        queues: InferenceQueues,
        replies: Option<ShardReplies>,
    ) -> Result<Rc<Shard>, String> {
        let vision_signer = {
            let mut secrets = config.server.auth.secrets.iter().filter(|s| !s.is_empty());
            secrets.next().map(|first| {
                secrets.fold(TokenSigner::new(first.clone()), |s, k| {
                    s.also_accepting(k.clone())
                })
            })
        };
        let signer = vision_signer.clone().filter(|_| config.server.auth.enabled);
        let server_tools = Rc::new(crate::tools::server::ServerTools::new(
            &config.tools.server_tools,
        ));
        let shards = mesh.len().max(1);
        let s = &config.server;
        let connection_limit = match s.max_connections {
            0 => s.max_connections_per_shard,
            n => s.max_connections_per_shard.min(n.div_ceil(shards)),
        };
        let rate_limiter = (s.rate_limit.per_address_per_s > 0.0).then(|| {
            AddressRateLimiter::new(
                s.rate_limit.per_address_per_s,
                s.rate_limit.burst,
                s.rate_limit.max_addresses,
            )
        });
        let trusted = s.trusted_proxies.clone();
        let providers = Rc::new(crate::connection::settings::providers(
            &config,
            LocalQueues {
                vad: Rc::new(TickBatch::new(config.inference.queue_capacity)),
                asr: queues.asr.clone(),
                tts: queues.tts.clone(),
            },
        )?);
        let base_tools = Rc::new(crate::tools::ToolSet::build(
            &server_tools,
            &[],
            &crate::tools::iot::IotThings::default(),
            config.tools.max_tools,
        ));
        let http_port = Rc::new(Cell::new(config.server.http_port));
        let connection = Rc::new(ConnectionSettings::new(
            &config,
            SharedParts {
                offline_llm: providers.offline_llm(),
                signer: signer.clone(),
                vision_signer: vision_signer.clone(),
                server_tools: server_tools.clone(),
                base_tools: base_tools.clone(),
                http_port: http_port.clone(),
                trusted: trusted.clone(),
            },
        ));
        let sweep = match s.socket_sweep_ms {
            0 => None,
            ms => Some(
                shards::Sweep::new(std::time::Duration::from_millis(ms))
                    .map_err(|e| format!("cannot create the socket sweep's epoll set: {e}"))?,
            ),
        };
        Ok(Rc::new(Shard {
            id,
            sweep,
            signer,
            vision_signer,
            http_port,
            trusted,
            connection_limit,
            rate_limiter: RefCell::new(rate_limiter),
            http_admission: Rc::new(HttpAdmission::new(s)),
            metrics_render: Rc::default(),
            sessions: RefCell::new(HashMap::new()),
            ended_mailbox_refusals: Cell::new(0),
            vad_batches_unsent: Cell::new(0),
            peer_sessions: RefCell::new(vec![0; shards]),
            next_key: Cell::new(0),
            drain: Drain::default(),
            stats: RefCell::new(ShardStats::default()),
            hist: RefCell::new(StageHistograms::default()),
            intervals: (id == 0).then(|| {
                RefCell::new(IntervalLog::new(
                    std::time::SystemTime::now(),
                    config.metrics.keep_intervals,
                ))
            }),
            queues,
            replies,
            http: providers.http.clone(),
            providers,
            connection,
            mesh,
            mqtt: RefCell::new(None),
            base_tools,
            server_tools,
            config,
        }))
    }

    /// What the HTTP port of this shard serves, once the WebSocket port is bound at `ws_addr`.
    pub fn http_context(self: &Rc<Self>, ws_addr: SocketAddr) -> Rc<HttpContext> {
        let server = &self.config.server;
        Rc::new(HttpContext {
            ota: OtaSettings {
                public_ws_url: server.public_ws_url.clone(),
                ws_port: ws_addr.port(),
                timezone_offset_minutes: (server.timezone_offset_hours * 60.0).round() as i64,
                firmware_version: server.firmware.version.clone(),
                firmware_url: server.firmware.url.clone(),
                signer: self.signer.clone(),
                allowed_devices: server.auth.allowed_devices.clone(),
                allowed_devices_skip_token: server.auth.allowed_devices_skip_token,
                ota_tokens: server.auth.ota_tokens,
                mqtt: self.ota_mqtt(),
            },
            ready: self.drain.ready_flag(),
            admission: self.http_admission.clone(),
            metrics: {
                let shard = self.clone();
                Rc::new(move || {
                    let shard = shard.clone();
                    Box::pin(async move {
                        // Snapshots travel by message; formatting them runs on glommio's
                        // blocking pool, never on the executor the devices share.
                        let snapshots = shard.collect_stats().await;
                        glommio::executor()
                            .spawn_blocking(move || stats::render_snapshots(&snapshots))
                            .await
                    })
                })
            },
            metrics_render: self.metrics_render.clone(),
            histogram_renders: Rc::new(glommio::sync::Semaphore::new(1)),
            histograms: {
                let shard = self.clone();
                Rc::new(move |path: String| {
                    let shard = shard.clone();
                    Box::pin(async move { super::histograms::histogram(&shard, &path).await })
                })
            },
            vision: vision_endpoint(self),
        })
    }
}

impl Shard {
    /// What the OTA answer needs to hand out MQTT credentials, when MQTT is on.
    fn ota_mqtt(&self) -> Option<crate::http::ota::OtaMqtt> {
        let config = &self.config.mqtt;
        if !config.enabled {
            return None;
        }
        let keys = crate::mqtt::credentials::SignatureKeys::new(&config.signature_keys).ok()?;
        Some(crate::http::ota::OtaMqtt {
            config: config.clone(),
            keys,
        })
    }
}

/// The `/mcp/vision/explain` endpoint of `shard`, counting into its stats.
fn vision_endpoint(shard: &Rc<Shard>) -> crate::http::vision::VisionEndpoint {
    let v = &shard.config.vision;
    let model = (v.provider == crate::config::VisionProvider::Openai).then(|| {
        crate::providers::vision::OpenAiVisionSettings {
            base_url: v.openai.base_url.clone(),
            api_key: crate::providers::http_client::ApiKey::from_env_or(
                "XIAOZHI_VISION_API_KEY",
                &v.openai.api_key,
            ),
            model: v.openai.model.clone(),
            timeout: Duration::from_millis(v.openai.timeout_ms),
        }
    });
    let counted = shard.clone();
    crate::http::vision::VisionEndpoint {
        model,
        max_body_bytes: v.max_body_bytes,
        max_in_flight: v.max_in_flight,
        in_flight: Rc::new(Cell::new(0)),
        quota: Rc::new(crate::http::vision_quota::VisionQuota::new(
            v.max_in_flight_per_device,
            v.per_device_per_minute,
            v.per_device_burst,
        )),
        tokens: shard.vision_signer.clone(),
        client: shard.http.clone(),
        record: Rc::new(move |outcome| counted.stats.borrow_mut().vision.count(outcome)),
    }
}
