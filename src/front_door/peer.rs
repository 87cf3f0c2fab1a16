//! Who a device really is when it comes through a load balancer: the trusted-proxy list
//! (CIDRs) and the forwarded headers (`X-Real-IP`, `X-Forwarded-For`).
//!
//! Only a peer in the trusted list may speak for someone else, and only in the one header the
//! operator chose: `X-Real-IP` (the balancer overwrites it), or the right-most
//! `X-Forwarded-For` entry that is not itself a trusted proxy (entries to its left were written
//! by the client and can be forged).

use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// The header a trusted balancer names the device in. One, chosen by the operator: a balancer
/// that sets one header passes the other through from the client untouched (forgeable).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ForwardedHeader {
    /// Headers are ignored.
    Off,
    /// The right-most `X-Forwarded-For` entry that is not a trusted proxy.
    XForwardedFor,
    /// `X-Real-IP` (the balancer must overwrite it).
    XRealIp,
}

/// One `address/prefix` block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `10.0.0.0/8`, `::1/128` or a bare address (a single host). An IPv4-mapped IPv6
    /// block (`::ffff:10.0.0.0/104`) becomes the IPv4 block it maps.
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let s = s.trim();
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let net: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an address or CIDR"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: prefix must be 0..={max}"))?,
            None => max,
        };
        let mapped = canonical(net);
        // Matching compares canonical (IPv4) addresses, so a mapped block is kept as IPv4 with
        // its prefix counted in IPv4 bits; left at 128 it would overflow the IPv4 mask.
        let prefix = match (net, mapped) {
            (IpAddr::V6(_), IpAddr::V4(_)) => prefix
                .checked_sub(96)
                .ok_or_else(|| format!("{s:?}: an IPv4-mapped prefix must be 96..=128"))?,
            _ => prefix,
        };
        Ok(Cidr {
            net: mapped,
            prefix,
        })
    }

    /// True when `ip` is inside the block.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, canonical(ip)) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// Written back the way an operator writes it: a bare address for a single host, else
/// `address/prefix`.
impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = if self.net.is_ipv4() { 32 } else { 128 };
        if self.prefix == host {
            write!(f, "{}", self.net)
        } else {
            write!(f, "{}/{}", self.net, self.prefix)
        }
    }
}

/// IPv4-mapped IPv6 addresses as IPv4, so `::ffff:10.0.0.1` matches `10.0.0.0/8`.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The balancers allowed to speak for a client. Config `server.trusted_proxies` deserialises
/// straight into it (a list of CIDRs or addresses; the first bad entry is the error), so a
/// value of this type is always valid.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "Vec<String>", into = "Vec<String>")]
pub struct TrustedProxies(Vec<Cidr>);

impl TrustedProxies {
    /// Parses every entry; the first bad one is the error.
    pub fn parse(entries: &[String]) -> Result<TrustedProxies, String> {
        entries
            .iter()
            .map(|e| Cidr::parse(e))
            .collect::<Result<Vec<_>, _>>()
            .map(TrustedProxies)
    }

    /// True when no balancer is trusted.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// True when `ip` is a trusted balancer.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|c| c.contains(ip))
    }

    /// The client address a trusted `peer` reports in the operator's chosen `header`: the first
    /// `X-Real-IP` value, or the `X-Forwarded-For` lines joined with commas. `None` when the
    /// peer is not trusted, the header is off, or it names no usable address.
    pub fn forwarded(
        &self,
        header: ForwardedHeader,
        peer: IpAddr,
        x_real_ip: Option<&str>,
        x_forwarded_for: Option<&str>,
    ) -> Option<IpAddr> {
        match header {
            ForwardedHeader::Off => None,
            ForwardedHeader::XRealIp => self.real_ip(peer, x_real_ip),
            ForwardedHeader::XForwardedFor => self.forwarded_for(peer, x_forwarded_for),
        }
    }

    /// The client address a trusted `peer` reports in `X-Real-IP`. `None` when the peer is not
    /// trusted or the header names no usable address.
    pub fn real_ip(&self, peer: IpAddr, x_real_ip: Option<&str>) -> Option<IpAddr> {
        if !self.contains(peer) {
            return None;
        }
        x_real_ip.and_then(parse_ip)
    }

    /// The client address a trusted `peer` reports in `X-Forwarded-For` (all its lines joined
    /// with commas). `None` when the peer is not trusted or the list names no usable address.
    pub fn forwarded_for(&self, peer: IpAddr, x_forwarded_for: Option<&str>) -> Option<IpAddr> {
        if !self.contains(peer) {
            return None;
        }
        let xff = x_forwarded_for?;
        let mut last_trusted = None;
        for entry in xff.rsplit(',') {
            let ip = parse_ip(entry)?;
            if !self.contains(ip) {
                return Some(ip);
            }
            last_trusted = Some(ip);
        }
        // Every hop is a trusted proxy: the left-most one is the closest we know to the client.
        last_trusted
    }
}

impl TryFrom<Vec<String>> for TrustedProxies {
    type Error = String;

    fn try_from(entries: Vec<String>) -> Result<Self, String> {
        TrustedProxies::parse(&entries)
    }
}

impl From<TrustedProxies> for Vec<String> {
    fn from(trusted: TrustedProxies) -> Vec<String> {
        trusted.0.iter().map(Cidr::to_string).collect()
    }
}

/// An address from a header entry: `1.2.3.4`, `1.2.3.4:5`, `[::1]:5` or `::1`.
fn parse_ip(s: &str) -> Option<IpAddr> {
    let s = s.trim();
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    s.parse::<std::net::SocketAddr>()
        .ok()
        .map(|a| canonical(a.ip()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn trusted() -> TrustedProxies {
        TrustedProxies::parse(&[
            "127.0.0.1/32".into(),
            "10.0.0.0/8".into(),
            "fd00::/8".into(),
        ])
        .unwrap()
    }

    #[test]
    fn cidrs_match_their_blocks_and_mapped_addresses() {
        let t = trusted();
        assert!(t.contains(ip("10.200.3.4")));
        assert!(t.contains(ip("::ffff:10.0.0.1")));
        assert!(t.contains(ip("fd12::1")));
        assert!(!t.contains(ip("127.0.0.2")));
        assert!(!t.contains(ip("11.0.0.1")));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains(ip("8.8.8.8")));
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("nonsense").is_err());
    }

    #[test]
    fn mapped_ipv6_blocks_match_as_their_ipv4_block() {
        let host = Cidr::parse("::ffff:10.0.0.1").unwrap();
        assert!(host.contains(ip("10.0.0.1")));
        assert!(!host.contains(ip("10.0.0.2")));
        assert!(!host.contains(ip("8.8.8.8")));
        let block = Cidr::parse("::ffff:10.0.0.0/104").unwrap();
        assert!(block.contains(ip("10.9.9.9")));
        assert!(!block.contains(ip("11.0.0.1")));
        assert!(Cidr::parse("::ffff:10.0.0.0/64").is_err());
    }

    #[test]
    fn entries_are_written_back_as_an_operator_writes_them() {
        let written: Vec<String> = trusted().into();
        assert_eq!(written, ["127.0.0.1", "10.0.0.0/8", "fd00::/8"]);
        assert_eq!(TrustedProxies::try_from(written), Ok(trusted()));
        assert!(TrustedProxies::try_from(vec!["10.0.0.0/40".to_string()]).is_err());
    }

    #[test]
    fn only_trusted_peers_may_forward() {
        let t = trusted();
        assert_eq!(
            t.real_ip(ip("127.0.0.1"), Some("203.0.113.5")),
            Some(ip("203.0.113.5"))
        );
        assert_eq!(t.real_ip(ip("127.0.0.2"), Some("203.0.113.5")), None);
        assert_eq!(t.forwarded_for(ip("127.0.0.2"), Some("203.0.113.5")), None);
    }

    #[test]
    fn only_the_chosen_header_is_read() {
        let t = trusted();
        let (peer, xri, xff) = (ip("10.0.0.1"), Some("203.0.113.5"), Some("198.51.100.7"));
        assert_eq!(t.forwarded(ForwardedHeader::Off, peer, xri, xff), None);
        assert_eq!(
            t.forwarded(ForwardedHeader::XRealIp, peer, xri, xff),
            Some(ip("203.0.113.5"))
        );
        assert_eq!(
            t.forwarded(ForwardedHeader::XForwardedFor, peer, xri, xff),
            Some(ip("198.51.100.7"))
        );
    }

    #[test]
    fn forwarded_for_takes_the_rightmost_untrusted_hop() {
        let t = trusted();
        // The client forged "6.6.6.6"; the balancer appended the real 203.0.113.5, then an inner
        // trusted proxy appended itself.
        assert_eq!(
            t.forwarded_for(ip("127.0.0.1"), Some("6.6.6.6, 203.0.113.5, 10.1.1.1")),
            Some(ip("203.0.113.5"))
        );
        assert_eq!(
            t.forwarded_for(ip("127.0.0.1"), Some("[2001:db8::7]:443")),
            Some(ip("2001:db8::7"))
        );
        assert_eq!(t.forwarded_for(ip("127.0.0.1"), Some("garbage")), None);
        assert_eq!(t.forwarded_for(ip("127.0.0.1"), None), None);
    }
}
