//! The encrypted UDP audio channel of the MQTT transport (spec §15.2, §15.3, §15.6).
//!
//! Every datagram, both ways, is a 16-byte big-endian header followed by one Opus packet
//! encrypted with AES-128-CTR:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 1 | type = `0x01` |
//! | 1 | 1 | flags = 0 |
//! | 2 | 2 | payload length |
//! | 4 | 4 | connection id (ssrc; from the hello nonce) |
//! | 8 | 4 | timestamp, ms (AEC reference or 0) |
//! | 12 | 4 | sequence |
//!
//! The whole header of each datagram is the initial CTR counter block (128-bit big-endian
//! increment), under the per-hello key. The device builds its header from the hello nonce
//! (`01 00 0000 <connection id> 00000000 00000000`), so the connection id demultiplexes uplink
//! datagrams on a shard's one UDP socket.
//!
//! Checks, cheaper first, each drop counted by reason and never a panic: shorter than the header,
//! type ≠ 1, length ≠ 16 + payload length (the device's rules), unknown connection id, then the
//! sequence: `seq ≤ last` is a replay or duplicate and dropped (the device's rule; the gateway
//! only drops `seq < last`), a jump past `last + 1` is accepted and counted as a gap. CTR has no
//! integrity check, so the sequence is the only replay defence, and the device's address is
//! learned only from an *accepted* datagram — the gateway learns it from any datagram, which
//! lets a replay from another port steal the downlink (§15.6). Learning it from the latest one
//! keeps NAT rebinding working; downlink is possible only after the first uplink.

use aes::cipher::{InnerIvInit, KeyInit, StreamCipher};
use aes::Aes128;
use ctr::flavors::Ctr128BE;
use ctr::CtrCore;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

type Aes128Ctr = ctr::Ctr128BE<Aes128>;

/// Header length; also the length of the key and the nonce.
pub const HEADER_LEN: usize = 16;
/// The only datagram type (Opus audio).
pub const TYPE_AUDIO: u8 = 0x01;
/// Largest payload a header can describe.
pub const MAX_PAYLOAD: usize = u16::MAX as usize;

/// The decoded 16-byte datagram header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DatagramHeader {
    /// `0x01` for audio.
    pub packet_type: u8,
    /// 0 (copied from the nonce; not interpreted).
    pub flags: u8,
    /// Bytes of ciphertext after the header.
    pub payload_len: u16,
    /// The connection id (ssrc) from the hello nonce.
    pub connection_id: u32,
    /// Milliseconds (AEC reference) or 0.
    pub timestamp: u32,
    /// Per-direction sequence, starting at 1.
    pub sequence: u32,
}

impl DatagramHeader {
    /// Reads the header of `datagram` and checks type and exact length.
    pub fn parse(datagram: &[u8]) -> Result<DatagramHeader, DropReason> {
        let Some((head, payload)) = datagram.split_first_chunk::<HEADER_LEN>() else {
            return Err(DropReason::TooShort);
        };
        let be32 =
            |at: usize| u32::from_be_bytes([head[at], head[at + 1], head[at + 2], head[at + 3]]);
        let header = DatagramHeader {
            packet_type: head[0],
            flags: head[1],
            payload_len: u16::from_be_bytes([head[2], head[3]]),
            connection_id: be32(4),
            timestamp: be32(8),
            sequence: be32(12),
        };
        if header.packet_type != TYPE_AUDIO {
            return Err(DropReason::BadType);
        }
        if payload.len() != usize::from(header.payload_len) {
            return Err(DropReason::BadLength);
        }
        Ok(header)
    }

    /// The 16 header bytes (also the CTR IV).
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0] = self.packet_type;
        out[1] = self.flags;
        out[2..4].copy_from_slice(&self.payload_len.to_be_bytes());
        out[4..8].copy_from_slice(&self.connection_id.to_be_bytes());
        out[8..12].copy_from_slice(&self.timestamp.to_be_bytes());
        out[12..16].copy_from_slice(&self.sequence.to_be_bytes());
        out
    }
}

/// The hello `nonce` for a connection id: `01 00 0000 <id> 00000000 00000000` (§15.2).
pub fn nonce_for(connection_id: u32) -> [u8; HEADER_LEN] {
    DatagramHeader {
        packet_type: TYPE_AUDIO,
        flags: 0,
        payload_len: 0,
        connection_id,
        timestamp: 0,
        sequence: 0,
    }
    .to_bytes()
}

/// Why a datagram was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DropReason {
    /// Shorter than the 16-byte header.
    #[error("datagram shorter than its header")]
    TooShort,
    /// Type byte other than `0x01`.
    #[error("datagram type is not audio")]
    BadType,
    /// Length ≠ 16 + the header's payload length.
    #[error("datagram length does not match its header")]
    BadLength,
    /// No connection on this socket has that id.
    #[error("unknown connection id")]
    UnknownConnection,
    /// Sequence not above the last accepted one (replay or duplicate).
    #[error("replayed or duplicate sequence")]
    Replay,
    /// From an IP address other than the device's (see [`UdpPeer::pin_source_ip`]).
    #[error("datagram from another address than the device's")]
    ForgedSource,
}

/// Why a downlink datagram could not be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// The Opus packet does not fit the 16-bit length field.
    #[error("payload of {0} bytes does not fit a datagram")]
    PayloadTooLarge(usize),
    /// The 32-bit downlink sequence is used up; the device needs a new hello (new key).
    #[error("downlink sequence exhausted")]
    SequenceExhausted,
}

/// Counts of what the UDP channel saw, by outcome (per peer, and per socket in [`UdpPeerTable`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UdpCounters {
    /// Uplink datagrams accepted.
    pub accepted: u64,
    /// Accepted datagrams whose sequence skipped ahead (`seq > last + 1`).
    pub gaps: u64,
    /// Sequence numbers skipped by those gaps (datagrams lost or reordered away).
    pub lost: u64,
    /// Dropped: shorter than the header.
    pub too_short: u64,
    /// Dropped: type ≠ 1.
    pub bad_type: u64,
    /// Dropped: length ≠ 16 + payload length.
    pub bad_length: u64,
    /// Dropped: no connection with that id.
    pub unknown_connection: u64,
    /// Dropped: `seq ≤ last` (replay or duplicate).
    pub replays: u64,
    /// Dropped: from an IP address other than the device's.
    pub forged_source: u64,
    /// Accepted datagrams that came from a new source address (NAT rebinding or first one).
    pub address_changes: u64,
    /// Downlink datagrams built.
    pub sent: u64,
}

impl UdpCounters {
    /// Counts one dropped datagram under its reason.
    pub fn count_drop(&mut self, reason: DropReason) {
        let slot = match reason {
            DropReason::TooShort => &mut self.too_short,
            DropReason::BadType => &mut self.bad_type,
            DropReason::BadLength => &mut self.bad_length,
            DropReason::UnknownConnection => &mut self.unknown_connection,
            DropReason::Replay => &mut self.replays,
            DropReason::ForgedSource => &mut self.forged_source,
        };
        *slot += 1;
    }

    /// Total datagrams dropped, every reason.
    pub fn dropped(&self) -> u64 {
        self.too_short
            + self.bad_type
            + self.bad_length
            + self.unknown_connection
            + self.replays
            + self.forged_source
    }
}

/// One accepted uplink datagram, decrypted in place.
#[derive(Debug, PartialEq, Eq)]
pub struct Uplink<'a> {
    /// The Opus packet (borrowed from the receive buffer).
    pub opus: &'a [u8],
    /// The header's timestamp, ms (AEC reference or 0).
    pub timestamp: u32,
    /// The header's sequence.
    pub sequence: u32,
    /// Sequence numbers skipped just before this one (0 = in order).
    pub skipped: u32,
}

/// XORs the AES-128-CTR keystream for `iv` (a datagram header) over `data`.
fn apply_ctr(cipher: &Aes128, iv: &[u8; HEADER_LEN], data: &mut [u8]) {
    let core = CtrCore::<Aes128, Ctr128BE>::inner_iv_init(cipher.clone(), iv.into());
    Aes128Ctr::from_core(core).apply_keystream(data);
}

/// The UDP state of one device connection: key, connection id, both sequences and the address
/// learned from its uplink. Replaced state on every hello (the device resets its sequences).
pub struct UdpPeer {
    key: [u8; HEADER_LEN],
    /// Expanded once per hello, cloned per datagram.
    cipher: Aes128,
    connection_id: u32,
    /// Last accepted uplink sequence (0 = none yet; the first accepted must be ≥ 1).
    last_uplink_seq: u32,
    /// Last downlink sequence sent (pre-incremented: the first datagram carries 1).
    last_downlink_seq: u32,
    address: Option<SocketAddr>,
    /// The only IP uplink is accepted from, when pinned.
    source_ip: Option<IpAddr>,
    counters: UdpCounters,
}

impl std::fmt::Debug for UdpPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("UdpPeer")
            .field("connection_id", &self.connection_id)
            .field("last_uplink_seq", &self.last_uplink_seq)
            .field("last_downlink_seq", &self.last_downlink_seq)
            .field("address", &self.address)
            .field("counters", &self.counters)
            .finish()
    }
}

impl UdpPeer {
    /// A peer for a fresh hello: this key, this connection id, no address yet.
    pub fn new(key: [u8; HEADER_LEN], connection_id: u32) -> UdpPeer {
        UdpPeer {
            key,
            cipher: Aes128::new(&key.into()),
            connection_id,
            last_uplink_seq: 0,
            last_downlink_seq: 0,
            address: None,
            source_ip: None,
            counters: UdpCounters::default(),
        }
    }

    /// Accepts uplink only from `ip` (the address the device's MQTT connection came from):
    /// a datagram from elsewhere is dropped before it can move the sequence or the downlink.
    /// AES-CTR has no integrity check, so without this anyone who saw one datagram could send
    /// a higher sequence from their own address and take the downlink over. NAT rebinding
    /// changes the port, which stays free.
    pub fn pin_source_ip(&mut self, ip: IpAddr) {
        self.source_ip = Some(ip.to_canonical());
    }

    /// A repeated hello: new key, both sequences back to 0, the address forgotten (the device
    /// opens a new UDP socket). The connection id and the counters stay.
    pub fn rekey(&mut self, key: [u8; HEADER_LEN]) {
        let (counters, source_ip) = (self.counters, self.source_ip);
        *self = UdpPeer::new(key, self.connection_id);
        self.counters = counters;
        self.source_ip = source_ip;
    }

    /// The AES-128 key (for the hello's `udp.key`).
    pub fn key(&self) -> &[u8; HEADER_LEN] {
        &self.key
    }

    /// The hello's `udp.nonce` for this connection.
    pub fn nonce(&self) -> [u8; HEADER_LEN] {
        nonce_for(self.connection_id)
    }

    /// The connection id (ssrc) this peer's datagrams carry.
    pub fn connection_id(&self) -> u32 {
        self.connection_id
    }

    /// Where downlink goes: the source of the latest accepted uplink datagram, if any yet.
    pub fn address(&self) -> Option<SocketAddr> {
        self.address
    }

    /// What this peer's channel has seen.
    pub fn counters(&self) -> &UdpCounters {
        &self.counters
    }

    /// Checks, decrypts (in place) and accepts one uplink datagram from `from`; a drop is
    /// counted here under its reason.
    pub fn open<'a>(
        &mut self,
        datagram: &'a mut [u8],
        from: SocketAddr,
    ) -> Result<Uplink<'a>, DropReason> {
        let result = self.open_inner(datagram, from);
        if let Err(reason) = result {
            self.counters.count_drop(reason);
        }
        result
    }

    fn open_inner<'a>(
        &mut self,
        datagram: &'a mut [u8],
        from: SocketAddr,
    ) -> Result<Uplink<'a>, DropReason> {
        let header = DatagramHeader::parse(datagram)?;
        if header.connection_id != self.connection_id {
            return Err(DropReason::UnknownConnection);
        }
        if self
            .source_ip
            .is_some_and(|ip| ip != from.ip().to_canonical())
        {
            return Err(DropReason::ForgedSource);
        }
        if header.sequence <= self.last_uplink_seq {
            return Err(DropReason::Replay);
        }
        let skipped = header.sequence - self.last_uplink_seq - 1;
        let Some((iv, payload)) = datagram.split_first_chunk_mut::<HEADER_LEN>() else {
            return Err(DropReason::TooShort);
        };
        apply_ctr(&self.cipher, iv, payload);
        self.last_uplink_seq = header.sequence;
        self.counters.accepted += 1;
        if skipped > 0 {
            self.counters.gaps += 1;
            self.counters.lost += u64::from(skipped);
        }
        if self.address != Some(from) {
            self.address = Some(from);
            self.counters.address_changes += 1;
        }
        Ok(Uplink {
            opus: payload,
            timestamp: header.timestamp,
            sequence: header.sequence,
            skipped,
        })
    }

    /// Builds one downlink datagram for `opus` into `out` (cleared first) and returns where to
    /// send it: `None` until the device's first uplink datagram told us its address (the
    /// datagram is still built and the sequence used, as the gateway does).
    pub fn seal(
        &mut self,
        opus: &[u8],
        timestamp: u32,
        out: &mut Vec<u8>,
    ) -> Result<Option<SocketAddr>, SealError> {
        let payload_len =
            u16::try_from(opus.len()).map_err(|_| SealError::PayloadTooLarge(opus.len()))?;
        let sequence = self
            .last_downlink_seq
            .checked_add(1)
            .ok_or(SealError::SequenceExhausted)?;
        self.last_downlink_seq = sequence;
        let header = DatagramHeader {
            packet_type: TYPE_AUDIO,
            flags: 0,
            payload_len,
            connection_id: self.connection_id,
            timestamp,
            sequence,
        }
        .to_bytes();
        out.clear();
        out.reserve(HEADER_LEN + opus.len());
        out.extend_from_slice(&header);
        out.extend_from_slice(opus);
        apply_ctr(&self.cipher, &header, &mut out[HEADER_LEN..]);
        self.counters.sent += 1;
        Ok(self.address)
    }
}

/// The peers of one shard's UDP socket, keyed by connection id, and the socket's counters.
#[derive(Debug, Default)]
pub struct UdpPeerTable {
    peers: HashMap<u32, UdpPeer>,
    counters: UdpCounters,
}

impl UdpPeerTable {
    /// An empty table.
    pub fn new() -> UdpPeerTable {
        UdpPeerTable::default()
    }

    /// A connection id not in use (never 0), drawn from `random` until one is free.
    pub fn unused_connection_id(&self, mut random: impl FnMut() -> u32) -> u32 {
        loop {
            let id = random();
            if id != 0 && !self.peers.contains_key(&id) {
                return id;
            }
        }
    }

    /// Adds (or replaces) the peer under its connection id.
    pub fn insert(&mut self, peer: UdpPeer) {
        self.peers.insert(peer.connection_id(), peer);
    }

    /// Removes a connection's peer (at disconnect), returning it.
    pub fn remove(&mut self, connection_id: u32) -> Option<UdpPeer> {
        self.peers.remove(&connection_id)
    }

    /// The peer for a connection id.
    pub fn get(&self, connection_id: u32) -> Option<&UdpPeer> {
        self.peers.get(&connection_id)
    }

    /// The peer for a connection id, mutably (to seal downlink or rekey).
    pub fn get_mut(&mut self, connection_id: u32) -> Option<&mut UdpPeer> {
        self.peers.get_mut(&connection_id)
    }

    /// Peers in the table.
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// Whether the table has no peers.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// Uplink totals for the whole socket: accepted, gaps and every drop, including those before
    /// a peer was found (`address_changes` and `sent` are kept per peer only).
    pub fn counters(&self) -> &UdpCounters {
        &self.counters
    }

    /// Routes one received datagram to its peer and opens it: the connection id and the
    /// decrypted uplink, or the reason it was dropped (counted).
    pub fn receive<'a>(
        &mut self,
        datagram: &'a mut [u8],
        from: SocketAddr,
    ) -> Result<(u32, Uplink<'a>), DropReason> {
        let result = match DatagramHeader::parse(datagram) {
            Err(reason) => Err(reason),
            Ok(header) => match self.peers.get_mut(&header.connection_id) {
                None => Err(DropReason::UnknownConnection),
                Some(peer) => peer
                    .open(datagram, from)
                    .map(|uplink| (header.connection_id, uplink)),
            },
        };
        match &result {
            Err(reason) => self.counters.count_drop(*reason),
            Ok((_, uplink)) => {
                self.counters.accepted += 1;
                if uplink.skipped > 0 {
                    self.counters.gaps += 1;
                    self.counters.lost += u64::from(uplink.skipped);
                }
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: [u8; 16] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15];
    const ID: u32 = 0x1234_5678;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, 1], port))
    }

    /// An uplink datagram as the device builds it (same code path as downlink: seal).
    fn device_datagram(seq: u32, opus: &[u8]) -> Vec<u8> {
        let mut device = UdpPeer::new(KEY, ID);
        device.last_downlink_seq = seq - 1;
        let mut out = Vec::new();
        device.seal(opus, 1000, &mut out).unwrap();
        out
    }

    // Ciphertexts computed independently with Python's `cryptography` (AES-128, CTR mode, the
    // header as the initial counter block) in a one-off command:
    //   Cipher(algorithms.AES(bytes(range(16))), modes.CTR(header)).encryptor().update(pt)
    #[test]
    fn ciphertext_matches_python_cryptography() {
        let mut peer = UdpPeer::new(KEY, ID);
        peer.last_downlink_seq = 0;
        let mut out = Vec::new();
        peer.seal(b"hello", 1000, &mut out).unwrap();
        assert_eq!(out[..16], hex("0100000512345678000003e800000001")[..]);
        assert_eq!(out[16..], hex("b19ddf08d3")[..]);

        // 40 bytes from a header whose sequence is 0xffffffff: the counter for the second and
        // third blocks carries into the timestamp bytes (full 128-bit increment).
        peer.last_downlink_seq = 0xffff_fffe;
        let plain: Vec<u8> = (0..40).collect();
        peer.seal(&plain, 1000, &mut out).unwrap();
        assert_eq!(out[..16], hex("0100002812345678000003e8ffffffff")[..]);
        assert_eq!(
            out[16..],
            hex("b6d399e81be7039c42270f5dbd75bce6ea12af90137849fc14646b401fc50122756a3b1511e54496")
                [..]
        );
    }

    #[test]
    fn sealed_datagram_opens_to_the_same_opus() {
        let mut server = UdpPeer::new(KEY, ID);
        let mut datagram = device_datagram(1, b"\x78opus-frame");
        let uplink = server.open(&mut datagram, addr(4000)).unwrap();
        assert_eq!(uplink.opus, b"\x78opus-frame");
        assert_eq!(
            (uplink.timestamp, uplink.sequence, uplink.skipped),
            (1000, 1, 0)
        );
        assert_eq!(server.address(), Some(addr(4000)));
        // An empty (DTX) payload is a valid datagram too.
        let mut empty = device_datagram(2, b"");
        assert_eq!(server.open(&mut empty, addr(4000)).unwrap().opus, b"");
    }

    #[test]
    fn replayed_and_duplicate_sequences_are_dropped() {
        let mut server = UdpPeer::new(KEY, ID);
        let first = device_datagram(5, b"a");
        server.open(&mut first.clone(), addr(4000)).unwrap();
        assert_eq!(
            server.open(&mut first.clone(), addr(4000)),
            Err(DropReason::Replay)
        );
        let mut older = device_datagram(3, b"b");
        assert_eq!(server.open(&mut older, addr(4000)), Err(DropReason::Replay));
        // Sequence 0 is never valid (the device pre-increments from 0).
        let mut fresh = UdpPeer::new(KEY, ID);
        let mut zero = nonce_for(ID).to_vec();
        assert_eq!(fresh.open(&mut zero, addr(4000)), Err(DropReason::Replay));
        assert_eq!(server.counters().replays, 2);
        assert_eq!(server.counters().accepted, 1);
    }

    #[test]
    fn replay_from_another_port_does_not_steal_the_downlink() {
        let mut server = UdpPeer::new(KEY, ID);
        let datagram = device_datagram(1, b"a");
        server.open(&mut datagram.clone(), addr(4000)).unwrap();
        assert!(server.open(&mut datagram.clone(), addr(6666)).is_err());
        assert_eq!(server.address(), Some(addr(4000)));
    }

    #[test]
    fn a_pinned_peer_drops_datagrams_from_other_addresses_without_moving_its_sequence() {
        let mut peer = UdpPeer::new(KEY, ID);
        peer.pin_source_ip("::ffff:192.0.2.1".parse().unwrap());
        let mut forged = device_datagram(5, b"forged");
        let elsewhere = SocketAddr::from(([198, 51, 100, 7], 4000));
        assert_eq!(
            peer.open(&mut forged, elsewhere).unwrap_err(),
            DropReason::ForgedSource
        );
        assert_eq!(peer.counters().forged_source, 1);
        assert_eq!(peer.address(), None);
        // The device's own datagram with a lower sequence is still taken, from a new port too.
        let mut own = device_datagram(1, b"own");
        assert_eq!(peer.open(&mut own, addr(9)).unwrap().opus, b"own");
        assert_eq!(peer.address(), Some(addr(9)));
        peer.rekey(KEY);
        let mut again = device_datagram(1, b"x");
        assert_eq!(
            peer.open(&mut again, elsewhere).unwrap_err(),
            DropReason::ForgedSource,
            "the pin survives a new hello"
        );
    }

    #[test]
    fn gap_is_accepted_and_counted() {
        let mut server = UdpPeer::new(KEY, ID);
        server
            .open(&mut device_datagram(1, b"a"), addr(4000))
            .unwrap();
        let mut datagram = device_datagram(5, b"b");
        let uplink = server.open(&mut datagram, addr(4000)).unwrap();
        assert_eq!(uplink.skipped, 3);
        assert_eq!(server.counters().gaps, 1);
        assert_eq!(server.counters().lost, 3);
        assert_eq!(server.counters().accepted, 2);
    }

    #[test]
    fn wrong_length_type_and_short_datagrams_are_dropped() {
        let mut server = UdpPeer::new(KEY, ID);
        let good = device_datagram(1, b"abc");
        let mut longer = good.clone();
        longer.push(0);
        assert_eq!(
            server.open(&mut longer, addr(1)),
            Err(DropReason::BadLength)
        );
        let mut shorter = good[..good.len() - 1].to_vec();
        assert_eq!(
            server.open(&mut shorter, addr(1)),
            Err(DropReason::BadLength)
        );
        let mut typed = good.clone();
        typed[0] = 2;
        assert_eq!(server.open(&mut typed, addr(1)), Err(DropReason::BadType));
        assert_eq!(
            server.open(&mut [1u8; 15], addr(1)),
            Err(DropReason::TooShort)
        );
        assert_eq!(server.open(&mut [], addr(1)), Err(DropReason::TooShort));
        let c = server.counters();
        assert_eq!(
            (c.bad_length, c.bad_type, c.too_short, c.accepted),
            (2, 1, 2, 0)
        );
        // None of these moved the sequence: the genuine datagram is still accepted.
        assert!(server.open(&mut good.clone(), addr(1)).is_ok());
    }

    #[test]
    fn nat_rebinding_moves_the_downlink_to_the_latest_accepted_address() {
        let mut server = UdpPeer::new(KEY, ID);
        let mut out = Vec::new();
        assert_eq!(server.seal(b"x", 0, &mut out), Ok(None));
        server
            .open(&mut device_datagram(1, b"a"), addr(4000))
            .unwrap();
        assert_eq!(server.seal(b"x", 0, &mut out), Ok(Some(addr(4000))));
        server
            .open(&mut device_datagram(2, b"a"), addr(5000))
            .unwrap();
        assert_eq!(server.seal(b"x", 0, &mut out), Ok(Some(addr(5000))));
        assert_eq!(server.counters().address_changes, 2);
        // Downlink sequences are 1, 2, 3 in order.
        assert_eq!(DatagramHeader::parse(&out).unwrap().sequence, 3);
    }

    #[test]
    fn rekey_resets_sequences_and_address() {
        let mut server = UdpPeer::new(KEY, ID);
        server
            .open(&mut device_datagram(7, b"a"), addr(4000))
            .unwrap();
        server.rekey([9; 16]);
        assert_eq!(server.address(), None);
        assert_eq!(server.key(), &[9; 16]);
        assert_eq!(server.counters().accepted, 1);
        let mut device = UdpPeer::new([9; 16], ID);
        let mut out = Vec::new();
        device.seal(b"after", 0, &mut out).unwrap();
        assert_eq!(server.open(&mut out, addr(4001)).unwrap().opus, b"after");
    }

    #[test]
    fn nonce_carries_the_connection_id() {
        assert_eq!(
            nonce_for(ID).to_vec(),
            hex("01000000123456780000000000000000")
        );
        assert_eq!(UdpPeer::new(KEY, ID).nonce(), nonce_for(ID));
    }

    #[test]
    fn table_routes_by_connection_id_and_counts_unknown_ids() {
        let mut table = UdpPeerTable::new();
        table.insert(UdpPeer::new(KEY, ID));
        let mut other = device_datagram(1, b"a");
        other[4..8].copy_from_slice(&7u32.to_be_bytes());
        assert_eq!(
            table.receive(&mut other, addr(1)),
            Err(DropReason::UnknownConnection)
        );
        let mut datagram = device_datagram(1, b"a");
        let (id, uplink) = table.receive(&mut datagram, addr(1)).unwrap();
        assert_eq!((id, uplink.opus), (ID, &b"a"[..]));
        assert_eq!(
            table.receive(&mut device_datagram(1, b"a"), addr(1)),
            Err(DropReason::Replay)
        );
        let c = table.counters();
        assert_eq!((c.unknown_connection, c.replays, c.accepted), (1, 1, 1));
        let mut draws = [0, ID, 42].into_iter();
        assert_eq!(table.unused_connection_id(|| draws.next().unwrap_or(1)), 42);
        assert!(table.remove(ID).is_some());
        assert!(table.is_empty());
    }

    #[test]
    fn oversized_payload_is_refused_when_sealing() {
        let mut server = UdpPeer::new(KEY, ID);
        let big = vec![0u8; MAX_PAYLOAD + 1];
        assert_eq!(
            server.seal(&big, 0, &mut Vec::new()),
            Err(SealError::PayloadTooLarge(MAX_PAYLOAD + 1))
        );
        server.last_downlink_seq = u32::MAX;
        assert_eq!(
            server.seal(b"x", 0, &mut Vec::new()),
            Err(SealError::SequenceExhausted)
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(4000))]

        #[test]
        fn random_datagrams_never_panic(
            mut bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
            known_id: bool,
        ) {
            let mut table = UdpPeerTable::new();
            table.insert(UdpPeer::new(KEY, ID));
            if known_id && bytes.len() >= 8 {
                bytes[4..8].copy_from_slice(&ID.to_be_bytes());
            }
            let _ = table.receive(&mut bytes, addr(1));
            let c = *table.counters();
            proptest::prop_assert_eq!(c.accepted + c.dropped(), 1);
        }
    }
}
