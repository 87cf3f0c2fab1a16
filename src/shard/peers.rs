//! This shard's dealings with the other shards: load announcements, the hand-off target
//! for a connection a full shard cannot admit, the questions it asks them (counters,
//! histograms, the interval log) and its answers to theirs.

use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::time::Duration;

use shards::Control;

use super::{Shard, ShardRequest, ShardSnapshot};
use crate::connection::Upgrade;
use crate::metrics::intervals::IntervalLogCopy;

impl Shard {
    /// Hands a connection this full shard cannot admit to the shard believed to have the most
    /// room; says which one took the message. `None` when no shard is believed to have room or
    /// the message cannot be sent (channel full, shard gone: the duplicate descriptor is closed
    /// with the message); then the caller refuses the connection itself.
    pub fn hand_off(&self, fd: OwnedFd, upgrade: Upgrade) -> Option<usize> {
        let to = roomiest_peer(&self.peer_sessions.borrow(), self.id, self.connection_limit)?;
        self.mesh
            .try_send(to, Control::User(ShardRequest::Adopt { fd, upgrade }))
            .ok()?;
        // Count it against the target until its next announcement, so a burst spreads over the
        // shards with room instead of piling onto the one that looked emptiest.
        if let Some(open) = self.peer_sessions.borrow_mut().get_mut(to) {
            *open += 1;
        }
        self.stats.borrow_mut().handed_off += 1;
        Some(to)
    }

    /// A copy of shard 0's interval log (asked over the control channel from other shards).
    pub async fn interval_log(&self) -> Option<IntervalLogCopy> {
        if let Some(log) = &self.intervals {
            return Some(log.borrow().copy());
        }
        let (tx, rx) = flume::bounded(1);
        self.mesh
            .try_send(0, Control::User(ShardRequest::IntervalLog(tx)))
            .ok()?;
        let answer = async { rx.recv_async().await.ok() };
        let deadline = async {
            glommio::timer::sleep(Duration::from_secs(2)).await;
            None
        };
        futures_lite::future::or(answer, deadline).await
    }

    /// Snapshots of every shard, asked over the control channels.
    pub async fn collect_stats(&self) -> Vec<ShardSnapshot> {
        let (tx, rx) = flume::bounded(self.mesh.len().max(1));
        let mut asked = 0;
        for shard in 0..self.mesh.len() {
            if shard == self.id {
                let _ = tx.try_send(self.snapshot());
                asked += 1;
            } else if self
                .mesh
                .try_send(shard, Control::User(ShardRequest::Stats(tx.clone())))
                .is_ok()
            {
                asked += 1;
            }
        }
        drop(tx);
        let mut all = Vec::with_capacity(asked);
        let deadline = glommio::timer::sleep(Duration::from_secs(2));
        let gather = async {
            while all.len() < asked {
                match rx.recv_async().await {
                    Ok(s) => all.push(s),
                    Err(_) => break,
                }
            }
        };
        futures_lite::future::or(gather, deadline).await;
        all.sort_by_key(|s| s.stats.shard);
        all
    }
}

/// The shard other than `me` with the fewest open sessions in `believed` (so the most room:
/// every shard has the same limit), lowest index on a tie; `None` when all are at `limit`.
fn roomiest_peer(believed: &[usize], me: usize, limit: usize) -> Option<usize> {
    believed
        .iter()
        .enumerate()
        .filter(|&(id, &open)| id != me && open < limit)
        .min_by_key(|&(id, &open)| (open, id))
        .map(|(id, _)| id)
}

/// Tells the other shards this shard's session count every `runtime.tick_ms` when it changed,
/// and at least every [`LOAD_REFRESH_TICKS`] ticks (a lost announcement heals itself).
pub async fn announce_load(shard: Rc<Shard>) {
    let period = Duration::from_millis(shard.config.runtime.tick_ms.max(1));
    let mut last = None;
    let mut quiet_ticks = 0;
    loop {
        glommio::timer::sleep(period).await;
        let sessions = shard.session_count();
        quiet_ticks += 1;
        if last == Some(sessions) && quiet_ticks < LOAD_REFRESH_TICKS {
            continue;
        }
        (last, quiet_ticks) = (Some(sessions), 0);
        for to in (0..shard.mesh.len()).filter(|&to| to != shard.id) {
            let load = ShardRequest::Load {
                shard: shard.id,
                sessions,
            };
            let _ = shard.mesh.try_send(to, Control::User(load));
        }
    }
}

/// Load ticks after which a shard repeats an unchanged session count.
const LOAD_REFRESH_TICKS: u32 = 20;

/// Answers a request from another shard (or the main thread).
pub fn answer(shard: &Rc<Shard>, request: ShardRequest) {
    match request {
        ShardRequest::Stats(reply) => {
            let _ = reply.try_send(shard.snapshot());
        }
        ShardRequest::IntervalLog(reply) => {
            if let Some(log) = &shard.intervals {
                let _ = reply.try_send(log.borrow().copy());
            }
        }
        ShardRequest::Dump => {
            glommio::spawn_local(super::histograms::dump(shard.clone())).detach();
        }
        ShardRequest::Load {
            shard: from,
            sessions,
        } => {
            if let Some(open) = shard.peer_sessions.borrow_mut().get_mut(from) {
                *open = sessions;
            }
        }
        ShardRequest::MqttClientConnected { client_id } => {
            if let Some(mqtt) = shard.mqtt.borrow().as_ref() {
                if mqtt.replace(&client_id) {
                    tracing::info!(shard = shard.id, client_id = ?client_id, "MQTT client id connected on another shard: closed here");
                }
            }
        }
        ShardRequest::AllShardsListening => shard.drain.all_shards_listening(),
        ShardRequest::Adopt { fd, upgrade } => {
            shard.stats.borrow_mut().adopted += 1;
            glommio::spawn_local(crate::connection::accept::adopt(
                fd,
                upgrade,
                shard.connection_context(),
            ))
            .detach();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::roomiest_peer;

    #[test]
    fn hand_off_goes_to_the_emptiest_other_shard_and_never_to_a_full_one() {
        assert_eq!(roomiest_peer(&[4, 3, 1, 1], 0, 4), Some(2));
        assert_eq!(roomiest_peer(&[4, 3, 0, 1], 2, 4), Some(3));
        assert_eq!(roomiest_peer(&[0, 4, 5], 0, 4), None);
        assert_eq!(roomiest_peer(&[0], 0, 4), None);
    }
}
