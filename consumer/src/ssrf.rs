//! The SSRF guard: a hook URL must not make the consumer reach into the network it runs in.
//!
//! It follows GitLab's URL blocker: only `http`/`https`, no CR/LF, and every address the host
//! resolves to must be public. The guard is reqwest's DNS resolver, so the connection goes to the
//! very addresses that were checked (a second, different DNS answer cannot slip in between the
//! check and the connect: DNS rebinding), while the hostname stays in the URL for SNI and `Host`.
//! reqwest does not call the resolver for IP-literal URLs, so [`SsrfGuard::check_url`] checks those
//! before anything is sent.
//!
//! IPv6 forms that embed an IPv4 address (mapped `::ffff:a.b.c.d`, compatible `::a.b.c.d`, NAT64
//! `64:ff9b::/96`, 6to4 `2002::/16`) are converted first and judged as that IPv4 address.
//! An allowlist of CIDRs opens exceptions (tests and the demo allow `127.0.0.0/8`).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use reqwest::Url;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// Why a URL or an address was refused. The `Display` form is the reason given to operators.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The URL cannot be used at all (not http(s), CR/LF, unparsable, no host).
    #[error("invalid hook URL: {0}")]
    InvalidUrl(String),
    /// The host is (or resolves to) an address in a blocked range.
    #[error("blocked by the SSRF guard: {host} is {ip}, a {range} address")]
    Blocked {
        host: String,
        ip: IpAddr,
        range: &'static str,
    },
    /// The host name did not resolve; nothing was sent.
    #[error("could not resolve {host}: {reason}")]
    Unresolvable { host: String, reason: String },
}

impl Refusal {
    /// Whether a later attempt may succeed: only a DNS failure can be transient.
    pub fn is_transient(&self) -> bool {
        matches!(self, Refusal::Unresolvable { .. })
    }
}

/// An IPv4 or IPv6 network, `addr/prefix`; a bare address is a single host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

/// A CIDR that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid CIDR {input:?}: {reason}")]
pub struct CidrError {
    pub input: String,
    pub reason: &'static str,
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                prefix_matches(u32::from(net).into(), u32::from(ip).into(), self.prefix, 32)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                prefix_matches(u128::from(net), u128::from(ip), self.prefix, 128)
            }
            _ => false,
        }
    }
}

fn prefix_matches(net: u128, ip: u128, prefix: u8, bits: u8) -> bool {
    if prefix == 0 {
        return true;
    }
    let shift = u32::from(bits - prefix);
    (net >> shift) == (ip >> shift)
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(input: &str) -> Result<Cidr, CidrError> {
        let error = |reason| CidrError {
            input: input.to_owned(),
            reason,
        };
        let (addr, prefix) = match input.trim().split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (input.trim(), None),
        };
        let network: IpAddr = addr.parse().map_err(|_| error("not an IP address"))?;
        let bits = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => bits,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= bits)
                .ok_or_else(|| error("prefix length out of range"))?,
        };
        Ok(Cidr { network, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// The blocked range an address falls in, or `None` when it is public.
///
/// Embedded IPv4 forms are judged as their IPv4 address (see [`canonical`]).
pub fn blocked_range(ip: IpAddr) -> Option<&'static str> {
    match canonical(ip) {
        IpAddr::V4(v4) => blocked_v4(v4),
        IpAddr::V6(v6) => blocked_v6(v6),
    }
}

/// The address to judge: an IPv6 address that carries an IPv4 address becomes that IPv4 address.
pub fn canonical(ip: IpAddr) -> IpAddr {
    let IpAddr::V6(v6) = ip else { return ip };
    let seg = v6.segments();
    let o = v6.octets();
    let tail = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    // `::` and `::1` are IPv6's own unspecified and loopback, not compatible forms of 0.0.0.x.
    if v6.is_unspecified() || v6.is_loopback() {
        return ip;
    }
    match seg {
        // IPv4-mapped ::ffff:a.b.c.d and (deprecated) IPv4-compatible ::a.b.c.d.
        [0, 0, 0, 0, 0, 0xffff, _, _] | [0, 0, 0, 0, 0, 0, _, _] => IpAddr::V4(tail),
        // NAT64 well-known prefix: a translator would connect to the embedded IPv4 address.
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => IpAddr::V4(tail),
        // 6to4: 2002:AABB:CCDD::/48 routes to a.b.c.d.
        [0x2002, hi, lo, ..] => IpAddr::V4(Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo))),
        _ => ip,
    }
}

const V4_BLOCKED: &[(&str, &str)] = &[
    ("0.0.0.0/8", "unspecified (\"this network\")"),
    ("10.0.0.0/8", "private (RFC 1918)"),
    ("100.64.0.0/10", "carrier-grade NAT (RFC 6598)"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"),
    ("172.16.0.0/12", "private (RFC 1918)"),
    ("192.0.0.0/24", "IETF protocol assignment"),
    ("192.0.2.0/24", "documentation"),
    ("192.168.0.0/16", "private (RFC 1918)"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("224.0.0.0/4", "multicast"),
    ("255.255.255.255/32", "broadcast"),
    ("240.0.0.0/4", "reserved"),
];

const V6_BLOCKED: &[(&str, &str)] = &[
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("100::/64", "discard-only"),
    ("2001:db8::/32", "documentation"),
    ("fc00::/7", "unique local (ULA)"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local"),
    ("ff00::/8", "multicast"),
];

fn find_range(ip: IpAddr, table: &'static [(&'static str, &'static str)]) -> Option<&'static str> {
    table.iter().find_map(|(cidr, name)| {
        // The table is constant and covered by the tests, so a parse failure cannot happen; if it
        // did, skipping the entry would be wrong in the permissive direction, so block instead.
        match cidr.parse::<Cidr>() {
            Ok(c) if c.contains(ip) => Some(*name),
            Ok(_) => None,
            Err(_) => Some("unparsable guard range"),
        }
    })
}

fn blocked_v4(ip: Ipv4Addr) -> Option<&'static str> {
    find_range(IpAddr::V4(ip), V4_BLOCKED)
}

fn blocked_v6(ip: Ipv6Addr) -> Option<&'static str> {
    find_range(IpAddr::V6(ip), V6_BLOCKED)
}

/// The guard: the blocked ranges minus the allowlist.
#[derive(Debug, Clone, Default)]
pub struct SsrfGuard {
    allow: Vec<Cidr>,
}

impl SsrfGuard {
    /// A guard that lets these CIDRs through (`"127.0.0.0/8"`, `"::1"`, ...).
    pub fn new<S: AsRef<str>>(allow: &[S]) -> Result<SsrfGuard, CidrError> {
        let allow = allow
            .iter()
            .map(|s| s.as_ref().parse())
            .collect::<Result<_, _>>()?;
        Ok(SsrfGuard { allow })
    }

    /// `Ok` when the guard lets a connection to `ip` through.
    pub fn check_ip(&self, host: &str, ip: IpAddr) -> Result<(), Refusal> {
        let judged = canonical(ip);
        if self
            .allow
            .iter()
            .any(|c| c.contains(judged) || c.contains(ip))
        {
            return Ok(());
        }
        match blocked_range(ip) {
            None => Ok(()),
            Some(range) => Err(Refusal::Blocked {
                host: host.to_owned(),
                ip,
                range,
            }),
        }
    }

    /// Parses and checks a hook URL before sending: scheme, CR/LF, and an IP-literal host
    /// (reqwest connects to those without asking the resolver). Host names are checked later, by
    /// the resolver, on the addresses actually used.
    pub fn check_url(&self, raw: &str) -> Result<Url, Refusal> {
        let url = parse_hook_url(raw)?;
        let host = url
            .host_str()
            .ok_or_else(|| Refusal::InvalidUrl("no host".into()))?;
        // The parser has already normalised IPv4 spellings (`2130706433`, `0x7f.1`) to dotted
        // form and brackets IPv6 literals, so an IP literal parses here and a domain does not.
        if let Ok(ip) = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        {
            self.check_ip(host, ip)?;
        }
        Ok(url)
    }

    /// Resolves `host` and checks every address; refuses the host if any address is blocked, as
    /// GitLab does (a name that points at both a public and an internal address is not trusted).
    pub async fn resolve_checked(&self, host: &str) -> Result<Vec<SocketAddr>, Refusal> {
        // A bracketed or bare IP literal needs no DNS (reqwest never passes one, but be total).
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = bare.parse::<IpAddr>() {
            self.check_ip(host, ip)?;
            return Ok(vec![SocketAddr::new(ip, 0)]);
        }
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, 0))
            .await
            .map_err(|e| Refusal::Unresolvable {
                host: host.to_owned(),
                reason: e.to_string(),
            })?
            .collect();
        if addrs.is_empty() {
            return Err(Refusal::Unresolvable {
                host: host.to_owned(),
                reason: "no addresses".into(),
            });
        }
        for addr in &addrs {
            self.check_ip(host, addr.ip())?;
        }
        Ok(addrs)
    }
}

/// The URL rules that hold with or without the guard: http(s) only, no CR/LF, a host.
pub fn parse_hook_url(raw: &str) -> Result<Url, Refusal> {
    // The URL parser silently drops tabs and newlines, so look at the raw text first.
    if raw.contains(['\r', '\n']) {
        return Err(Refusal::InvalidUrl("contains CR or LF".into()));
    }
    let url = Url::parse(raw).map_err(|e| Refusal::InvalidUrl(e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(Refusal::InvalidUrl(format!(
            "scheme {:?} is not http or https",
            url.scheme()
        )));
    }
    if url.host().is_none() {
        return Err(Refusal::InvalidUrl("no host".into()));
    }
    Ok(url)
}

impl Resolve for SsrfGuard {
    fn resolve(&self, name: Name) -> Resolving {
        let guard = self.clone();
        Box::pin(async move {
            let addrs = guard.resolve_checked(name.as_str()).await?;
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn cidrs_parse_and_match() {
        let c: Cidr = "127.0.0.0/8".parse().unwrap();
        assert!(c.contains(ip("127.0.0.1")));
        assert!(c.contains(ip("127.255.255.254")));
        assert!(!c.contains(ip("128.0.0.1")));
        assert!(!c.contains(ip("::1")), "families never match each other");

        let host: Cidr = "10.1.2.3".parse().unwrap();
        assert!(host.contains(ip("10.1.2.3")));
        assert!(!host.contains(ip("10.1.2.4")));

        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("8.8.8.8")));

        let v6: Cidr = "fe80::/10".parse().unwrap();
        assert!(v6.contains(ip("febf::1")));
        assert!(!v6.contains(ip("fec0::1")));

        for bad in [
            "",
            "10.0.0.0/33",
            "::/129",
            "nope/8",
            "10.0.0.0/x",
            "10.0.0/8",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn guard_tables_all_parse() {
        for (cidr, _) in V4_BLOCKED.iter().chain(V6_BLOCKED) {
            assert!(cidr.parse::<Cidr>().is_ok(), "{cidr}");
        }
    }

    #[test]
    fn internal_addresses_are_blocked() {
        let guard = SsrfGuard::default();
        for (addr, range) in [
            ("127.0.0.1", "loopback"),
            ("127.9.9.9", "loopback"),
            ("0.0.0.0", "unspecified"),
            ("10.0.0.1", "private"),
            ("172.16.0.1", "private"),
            ("172.31.255.255", "private"),
            ("192.168.1.1", "private"),
            ("100.64.0.1", "carrier-grade NAT"),
            ("100.127.255.255", "carrier-grade NAT"),
            ("169.254.169.254", "link-local"),
            ("224.0.0.1", "multicast"),
            ("239.255.255.250", "multicast"),
            ("255.255.255.255", "broadcast"),
            ("::", "unspecified"),
            ("::1", "loopback"),
            ("fe80::1", "link-local"),
            ("fc00::1", "unique local"),
            ("fd12:3456::1", "unique local"),
            ("fec0::1", "site-local"),
            ("ff02::1", "multicast"),
            // Embedded IPv4 forms are judged as the IPv4 address.
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:10.0.0.1", "private"),
            ("::ffff:169.254.169.254", "link-local"),
            ("::ffff:0.0.0.0", "unspecified"),
            ("::127.0.0.1", "loopback"),
            ("::192.168.0.1", "private"),
            ("64:ff9b::10.0.0.1", "private"),
            ("2002:a9fe:a9fe::1", "link-local"),
        ] {
            match guard.check_ip("h", ip(addr)) {
                Err(Refusal::Blocked { range: r, .. }) => {
                    assert!(r.contains(range), "{addr}: expected {range}, got {r}")
                }
                other => panic!("{addr} should be blocked as {range}, got {other:?}"),
            }
        }
    }

    #[test]
    fn public_addresses_pass() {
        let guard = SsrfGuard::default();
        for addr in [
            "8.8.8.8",
            "1.1.1.1",
            "172.32.0.1",
            "100.128.0.1",
            "192.169.0.1",
            "2606:4700:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::8.8.8.8",
        ] {
            assert_eq!(guard.check_ip("h", ip(addr)), Ok(()), "{addr}");
        }
    }

    #[test]
    fn allowlist_opens_exceptions_including_mapped_forms() {
        let guard = SsrfGuard::new(&["127.0.0.0/8"]).unwrap();
        assert_eq!(guard.check_ip("h", ip("127.0.0.1")), Ok(()));
        assert_eq!(guard.check_ip("h", ip("::ffff:127.0.0.1")), Ok(()));
        assert!(
            guard.check_ip("h", ip("::1")).is_err(),
            "IPv6 loopback is not in 127/8"
        );
        assert!(guard.check_ip("h", ip("10.0.0.1")).is_err());
        assert!(SsrfGuard::new(&["127.0.0.0/99"]).is_err());
    }

    #[test]
    fn ip_literal_urls_are_checked_before_sending() {
        let guard = SsrfGuard::default();
        for url in [
            "http://10.0.0.1/hook",
            "http://169.254.169.254/latest/meta-data",
            "http://[::ffff:127.0.0.1]:8080/",
            "http://0.0.0.0/",
            "http://[::1]/",
            "https://127.0.0.1:443/",
            // The URL parser normalises these IPv4 spellings to 127.0.0.1.
            "http://2130706433/",
            "http://0x7f.1/",
        ] {
            assert!(
                matches!(guard.check_url(url), Err(Refusal::Blocked { .. })),
                "{url} should be blocked"
            );
        }
        assert!(guard.check_url("http://8.8.8.8/hook").is_ok());
        assert!(guard.check_url("https://example.com/hook").is_ok());
    }

    #[test]
    fn malformed_urls_are_invalid() {
        let guard = SsrfGuard::default();
        for url in [
            "ftp://example.com/",
            "file:///etc/passwd",
            "gopher://example.com/",
            "http://example.com/\r\nX-Injected: 1",
            "http://exam\nple.com/",
            "not a url",
            "http://",
        ] {
            assert!(
                matches!(guard.check_url(url), Err(Refusal::InvalidUrl(_))),
                "{url:?} should be invalid, got {:?}",
                guard.check_url(url)
            );
        }
    }

    #[tokio::test]
    async fn hostnames_are_judged_by_what_they_resolve_to() {
        let guard = SsrfGuard::default();
        let refused = guard.resolve_checked("localhost").await.unwrap_err();
        assert!(
            matches!(
                refused,
                Refusal::Blocked {
                    range: "loopback",
                    ..
                }
            ),
            "{refused:?}"
        );

        let open = SsrfGuard::new(&["127.0.0.0/8", "::1/128"]).unwrap();
        let addrs = open.resolve_checked("localhost").await.unwrap();
        assert!(addrs.iter().all(|a| a.ip().is_loopback()), "{addrs:?}");

        let unknown = guard
            .resolve_checked("no-such-host.invalid")
            .await
            .unwrap_err();
        assert!(unknown.is_transient(), "{unknown:?}");
    }
}
