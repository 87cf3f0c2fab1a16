//! A shard's UDP audio socket (spec §15.3): the MQTT transport's Opus datagrams, both ways.
//!
//! Every shard binds its own port (`mqtt.udp_port_base` + shard index) and announces that
//! port in the hellos of the MQTT connections it owns, so a session's datagrams arrive on the
//! core that runs the session: no cross-core hop. One receive task per shard reads the socket,
//! routes each datagram by its connection id through the shard's [`UdpPeerTable`] (which
//! checks length, type, sequence and source, decrypts, and counts every drop by reason) and
//! queues the Opus packet for the connection's driver in a small bounded queue; a full queue
//! drops the packet and counts it. The driver seals and sends its downlink itself, through
//! its [`AudioChannel`], to the address the device's latest accepted datagram came from.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{FromRawFd, IntoRawFd};
use std::rc::Rc;

use glommio::channels::local_channel::{self, LocalReceiver, LocalSender};
use glommio::net::UdpSocket;

use crate::mqtt::hello::{fresh_key, random_u32};
use crate::mqtt::udp::{UdpCounters, UdpPeer, UdpPeerTable, HEADER_LEN, MAX_PAYLOAD};

/// Uplink packets queued per connection before the socket drops more (~1.9 s of 60 ms
/// frames: a driver that far behind has a bigger problem than a lost frame).
pub const UPLINK_QUEUE: usize = 32;

/// What the socket counted beyond the peer table's checks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SocketCounters {
    /// Accepted uplink packets dropped because their connection's queue was full.
    pub uplink_queue_full: u64,
    /// Downlink datagrams sent.
    pub sent: u64,
    /// Downlink packets not sent because the device had sent no datagram yet.
    pub no_address: u64,
    /// Downlink sends the socket refused.
    pub send_errors: u64,
}

/// One shard's UDP socket, its peers and the uplink queues of its connections.
pub struct UdpAudio {
    socket: UdpSocket,
    port: u16,
    peers: RefCell<UdpPeerTable>,
    inboxes: RefCell<HashMap<u32, LocalSender<Vec<u8>>>>,
    counters: Cell<SocketCounters>,
}

impl UdpAudio {
    /// Binds `addr` (port 0: an ephemeral one).
    ///
    /// Not with glommio's `UdpSocket::bind`: it sets `SO_REUSEPORT`, which lets any process of
    /// the same user bind the same port and take a share of the devices' datagrams (a second
    /// instance started on the same port would silently split every session's audio), and
    /// lets an ephemeral bind land on a port another reuse-port socket holds. A plain bind
    /// fails with "address in use" instead.
    pub fn bind(addr: SocketAddr) -> std::io::Result<Rc<UdpAudio>> {
        let std_socket = std::net::UdpSocket::bind(addr)?;
        // SAFETY: a freshly bound UDP socket this function owns; glommio takes over its fd.
        let socket = unsafe { UdpSocket::from_raw_fd(std_socket.into_raw_fd()) };
        let port = socket.local_addr()?.port();
        Ok(Rc::new(UdpAudio {
            socket,
            port,
            peers: RefCell::new(UdpPeerTable::new()),
            inboxes: RefCell::new(HashMap::new()),
            counters: Cell::new(SocketCounters::default()),
        }))
    }

    /// The port as bound (what hellos announce).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Uplink totals by outcome (every drop reason) and the socket's own counts.
    pub fn counters(&self) -> (UdpCounters, SocketCounters) {
        (*self.peers.borrow().counters(), self.counters.get())
    }

    /// Connections with a channel on this socket.
    pub fn channels(&self) -> usize {
        self.inboxes.borrow().len()
    }

    /// A channel for one MQTT connection from `device_ip`: a connection id unused on this
    /// socket; datagrams are accepted once a hello gave it a key ([`AudioChannel::rekey`]).
    pub fn open(self: &Rc<Self>, device_ip: Option<IpAddr>) -> Result<AudioChannel, String> {
        let mut failure = None;
        let id = self.peers.borrow().unused_connection_id(|| {
            random_u32().unwrap_or_else(|e| {
                failure = Some(e);
                // Any non-zero id ends the loop; the error is reported below.
                1
            })
        });
        if let Some(e) = failure {
            return Err(format!("no random connection id: {e}"));
        }
        let (tx, rx) = local_channel::new_bounded(UPLINK_QUEUE);
        self.inboxes.borrow_mut().insert(id, tx);
        Ok(AudioChannel {
            udp: self.clone(),
            id,
            device_ip,
            uplink: rx,
            out: Vec::new(),
        })
    }

    /// Reads the socket until the task is dropped: each datagram checked, decrypted and
    /// queued for its connection, or dropped and counted.
    pub async fn receive(self: Rc<Self>) {
        let mut buf = vec![0u8; HEADER_LEN + MAX_PAYLOAD];
        loop {
            let (n, from) = match self.socket.recv_from(&mut buf).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "UDP receive failed");
                    glommio::timer::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            };
            let Some(datagram) = buf.get_mut(..n) else {
                continue;
            };
            let accepted = match self.peers.borrow_mut().receive(datagram, from) {
                Ok((id, uplink)) => Some((id, uplink.opus.to_vec())),
                Err(_) => None,
            };
            if let Some((id, opus)) = accepted {
                let full = match self.inboxes.borrow().get(&id) {
                    Some(tx) => tx.try_send(opus).is_err(),
                    None => false,
                };
                if full {
                    self.count(|c| c.uplink_queue_full += 1);
                }
            }
        }
    }

    fn count(&self, f: impl FnOnce(&mut SocketCounters)) {
        let mut c = self.counters.get();
        f(&mut c);
        self.counters.set(c);
    }
}

/// One MQTT connection's audio on its shard's socket; dropping it forgets the connection.
pub struct AudioChannel {
    udp: Rc<UdpAudio>,
    id: u32,
    device_ip: Option<IpAddr>,
    uplink: LocalReceiver<Vec<u8>>,
    out: Vec<u8>,
}

impl AudioChannel {
    /// A hello: a fresh key, both sequences back to 0, the device's address forgotten, and a
    /// fresh uplink queue (packets of the previous hello are not this one's). Returns the key
    /// and the nonce for the hello reply.
    pub fn rekey(&mut self) -> Result<([u8; HEADER_LEN], [u8; HEADER_LEN]), String> {
        let key = fresh_key().map_err(|e| format!("no random key: {e}"))?;
        let mut peer = UdpPeer::new(key, self.id);
        if let Some(ip) = self.device_ip {
            peer.pin_source_ip(ip);
        }
        let nonce = peer.nonce();
        self.udp.peers.borrow_mut().insert(peer);
        let (tx, rx) = local_channel::new_bounded(UPLINK_QUEUE);
        self.udp.inboxes.borrow_mut().insert(self.id, tx);
        self.uplink = rx;
        Ok((key, nonce))
    }

    /// The next uplink Opus packet (waits; cancel-safe).
    pub async fn recv(&self) -> Option<Vec<u8>> {
        self.uplink.recv().await
    }

    /// Seals `opus` and sends it to the device's latest address; nothing is sent before the
    /// device's first datagram (it is counted), nor before a hello.
    pub async fn send(&mut self, opus: &[u8], timestamp_ms: u32) -> Result<(), ()> {
        let to = {
            let mut peers = self.udp.peers.borrow_mut();
            let Some(peer) = peers.get_mut(self.id) else {
                return Ok(());
            };
            match peer.seal(opus, timestamp_ms, &mut self.out) {
                Ok(to) => to,
                Err(e) => {
                    tracing::debug!(error = %e, "downlink packet not sealed");
                    return Ok(());
                }
            }
        };
        let Some(to) = to else {
            self.udp.count(|c| c.no_address += 1);
            return Ok(());
        };
        match self.udp.socket.send_to(&self.out, to).await {
            Ok(_) => {
                self.udp.count(|c| c.sent += 1);
                Ok(())
            }
            Err(e) => {
                tracing::debug!(error = %e, %to, "downlink datagram not sent");
                self.udp.count(|c| c.send_errors += 1);
                Err(())
            }
        }
    }
}

impl Drop for AudioChannel {
    fn drop(&mut self) {
        self.udp.peers.borrow_mut().remove(self.id);
        self.udp.inboxes.borrow_mut().remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_bind_on_a_taken_port_fails_instead_of_sharing_the_devices_datagrams() {
        glommio::LocalExecutor::default().run(async {
            let first = UdpAudio::bind(SocketAddr::from(([127, 0, 0, 1], 0))).expect("bind");
            let taken = SocketAddr::from(([127, 0, 0, 1], first.port()));
            // With SO_REUSEPORT (glommio's own bind) this second bind succeeded and the kernel
            // split the port's datagrams between the two sockets.
            let err = UdpAudio::bind(taken).err().expect("the port is taken");
            assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
        });
    }
}
