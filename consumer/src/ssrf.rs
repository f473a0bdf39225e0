//! The SSRF guard: a hook URL must not make the consumer reach into the network it runs in.
//!
//! It follows GitLab's URL blocker: only `http`/`https`, no CR/LF, ports below 1024 only from
//! an allowed list (80 and 443 by default), and every address the host resolves to must be
//! public and not one of this machine's own interface addresses. The guard is reqwest's DNS
//! resolver, so the connection goes to the very addresses that were checked (a second, different
//! DNS answer cannot slip in between the check and the connect: DNS rebinding), while the
//! hostname stays in the URL for SNI and `Host`. reqwest does not call the resolver for
//! IP-literal URLs, so [`SsrfGuard::check_url`] checks those (and every URL's port) before
//! anything is sent.
//!
//! IPv6 forms that embed an IPv4 address (mapped `::ffff:a.b.c.d`, translated
//! `::ffff:0:a.b.c.d`, compatible `::a.b.c.d`, NAT64 `64:ff9b::/96` and the local-use
//! `64:ff9b:1::/48`, 6to4 `2002::/16`) are judged as that IPv4 address.
//! An allowlist of CIDRs opens exceptions to the address rules (tests and the demo allow
//! `127.0.0.0/8`); the port rule has its own list.
//!
//! Every refusal names the rule that refused ([`Refusal::rule`]), and the dead letter carries it.
//! The machine's addresses are enumerated when the guard is made and again when the list is
//! older than [`OWN_ADDRESSES_REFRESH`], so an address added later (DHCP, a new interface) is
//! refused within that time. Name resolution goes through a [`Lookup`], so tests give the guard
//! their own answers instead of the machine's resolver.

use std::fmt;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::str::FromStr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use reqwest::Url;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// Ports below 1024 the guard allows by default: GitLab's list.
pub const DEFAULT_ALLOWED_PORTS: &[u16] = &[80, 443];

/// How old the list of this machine's addresses may get before it is enumerated again.
pub const OWN_ADDRESSES_REFRESH: Duration = Duration::from_secs(60);

/// Why a URL or an address was refused. The `Display` form is the reason given to operators;
/// it names the rule (see [`Refusal::rule`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The URL cannot be used at all (not http(s), CR/LF, unparsable, no host).
    #[error("invalid hook URL: {0}")]
    InvalidUrl(String),
    /// The host is (or resolves to) an address in a blocked range. For a host name the text
    /// says only that it resolves to a blocked address: naming the address (or its range) would
    /// let whoever may add or test a hook map the internal DNS. The fields, logged on the
    /// server, keep the detail.
    #[error("{}", blocked_text(host, *ip, Some(range)))]
    Blocked {
        host: String,
        ip: IpAddr,
        range: &'static str,
    },
    /// The host is (or resolves to) one of this machine's own interface addresses.
    #[error("{}", blocked_text(host, *ip, None))]
    OwnAddress { host: String, ip: IpAddr },
    /// A port below 1024 that is not in the allowed list.
    #[error(
        "blocked by the SSRF guard (rule: port): port {port} is below 1024 and not allowed (allowed: {allowed}; see --allow-port)"
    )]
    Port { port: u16, allowed: String },
    /// The host name did not resolve; nothing was sent.
    #[error("could not resolve {host}: {reason}")]
    Unresolvable { host: String, reason: String },
}

/// Whether `host` is an IP literal (bracketed or not): its address is no secret to whoever
/// wrote it.
fn is_ip_literal(host: &str) -> bool {
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
        .is_ok()
}

fn blocked_text(host: &str, ip: IpAddr, range: Option<&str>) -> String {
    let rule = if range.is_some() {
        "special-purpose address"
    } else {
        "own address"
    };
    match (is_ip_literal(host), range) {
        (true, Some(range)) => {
            format!("blocked by the SSRF guard (rule: {rule}): {ip} is in the {range} range")
        }
        (true, None) => {
            format!("blocked by the SSRF guard (rule: {rule}): {ip} is an address of this machine")
        }
        (false, _) => format!(
            "blocked by the SSRF guard (rule: {rule}): {host} resolves to a blocked address"
        ),
    }
}

impl Refusal {
    /// Whether a later attempt may succeed: only a DNS failure can be transient.
    pub fn is_transient(&self) -> bool {
        matches!(self, Refusal::Unresolvable { .. })
    }

    /// The rule that refused, as a short stable name.
    pub fn rule(&self) -> &'static str {
        match self {
            Refusal::InvalidUrl(_) => "invalid_url",
            Refusal::Blocked { .. } => "special_purpose_address",
            Refusal::OwnAddress { .. } => "own_address",
            Refusal::Port { .. } => "port",
            Refusal::Unresolvable { .. } => "unresolvable",
        }
    }
}

/// The addresses a host name resolves to.
pub type LookupFuture = Pin<Box<dyn Future<Output = std::io::Result<Vec<IpAddr>>> + Send>>;

/// Name resolution for the guard: the system resolver in service, fixed answers in tests.
pub trait Lookup: Send + Sync + fmt::Debug {
    fn lookup(&self, host: &str) -> LookupFuture;
}

/// The system resolver (`getaddrinfo`, through tokio).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemLookup;

impl Lookup for SystemLookup {
    fn lookup(&self, host: &str) -> LookupFuture {
        let host = host.to_owned();
        Box::pin(async move {
            Ok(tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .map(|a| a.ip())
                .collect())
        })
    }
}

/// This machine's interface addresses.
pub type Enumerate = fn() -> Vec<IpAddr>;

/// The addresses of this machine's interfaces, loopback left out (the loopback rule covers it).
/// An enumeration that fails gives none: the special-purpose ranges still hold.
pub fn interface_addresses() -> Vec<IpAddr> {
    match if_addrs::get_if_addrs() {
        Ok(interfaces) => interfaces
            .into_iter()
            .map(|i| i.ip())
            .filter(|ip| !ip.is_loopback())
            .collect(),
        Err(error) => {
            tracing::warn!(%error, "cannot enumerate this machine's addresses; the own-address rule holds none");
            Vec::new()
        }
    }
}

/// The machine's own addresses and when they were enumerated.
#[derive(Debug)]
struct OwnAddresses {
    enumerate: Enumerate,
    current: RwLock<(Instant, Arc<Vec<IpAddr>>)>,
}

impl OwnAddresses {
    fn new(enumerate: Enumerate) -> Self {
        Self {
            enumerate,
            current: RwLock::new((Instant::now(), Arc::new(enumerate()))),
        }
    }

    fn get(&self) -> Arc<Vec<IpAddr>> {
        {
            let current = self.current.read().unwrap_or_else(|e| e.into_inner());
            if current.0.elapsed() < OWN_ADDRESSES_REFRESH {
                return current.1.clone();
            }
        }
        // Enumerating is one system call; doing it inline on the rare refresh needs no task.
        let fresh = Arc::new((self.enumerate)());
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = (Instant::now(), fresh.clone());
        fresh
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
/// Embedded IPv4 forms are judged as their IPv4 address (each of them, when the layout is
/// ambiguous; see [`canonical`]).
pub fn blocked_range(ip: IpAddr) -> Option<&'static str> {
    let embedded = embedded(ip);
    if embedded.is_empty() {
        return judge(ip);
    }
    embedded.into_iter().find_map(judge)
}

fn judge(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => blocked_v4(v4),
        IpAddr::V6(v6) => blocked_v6(v6),
    }
}

/// The address to judge: an IPv6 address that carries an IPv4 address becomes that IPv4 address.
pub fn canonical(ip: IpAddr) -> IpAddr {
    embedded(ip).first().copied().unwrap_or(ip)
}

/// The IPv4 addresses an IPv6 address may lead to; empty when none.
///
/// The local-use NAT64 prefix `64:ff9b:1::/48` (RFC 8215) is carved up by each site, and the
/// IPv4 address sits where the site's translator prefix length puts it (RFC 6052): the last 32
/// bits with a /96, or around the reserved octet 8 with a /48, /56 or /64. Every layout the
/// address fits (reserved octet and suffix zero) is a candidate, and the address is refused if
/// any candidate is: the guard cannot know the site's prefix length, so it fails closed.
fn embedded(ip: IpAddr) -> Vec<IpAddr> {
    let IpAddr::V6(v6) = ip else {
        return Vec::new();
    };
    let seg = v6.segments();
    let o = v6.octets();
    let tail = IpAddr::V4(Ipv4Addr::new(o[12], o[13], o[14], o[15]));
    // `::` and `::1` are IPv6's own unspecified and loopback, not compatible forms of 0.0.0.x.
    if v6.is_unspecified() || v6.is_loopback() {
        return Vec::new();
    }
    match seg {
        // IPv4-mapped ::ffff:a.b.c.d, IPv4-translated ::ffff:0:a.b.c.d (SIIT) and (deprecated)
        // IPv4-compatible ::a.b.c.d.
        [0, 0, 0, 0, 0, 0xffff, _, _]
        | [0, 0, 0, 0, 0xffff, 0, _, _]
        | [0, 0, 0, 0, 0, 0, _, _] => {
            vec![tail]
        }
        // NAT64 well-known prefix: a translator would connect to the embedded IPv4 address.
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => vec![tail],
        // Local-use NAT64: every RFC 6052 layout the address fits, the /96 one last.
        [0x64, 0xff9b, 1, ..] => {
            let zero = |range: std::ops::RangeInclusive<usize>| o[range].iter().all(|b| *b == 0);
            let mut candidates = Vec::new();
            if o[8] == 0 && zero(11..=15) {
                candidates.push(IpAddr::V4(Ipv4Addr::new(o[6], o[7], o[9], o[10])));
            }
            if o[8] == 0 && zero(12..=15) {
                candidates.push(IpAddr::V4(Ipv4Addr::new(o[7], o[9], o[10], o[11])));
            }
            if o[8] == 0 && zero(13..=15) {
                candidates.push(IpAddr::V4(Ipv4Addr::new(o[9], o[10], o[11], o[12])));
            }
            candidates.push(tail);
            candidates
        }
        // 6to4: 2002:AABB:CCDD::/48 routes to a.b.c.d.
        [0x2002, hi, lo, ..] => vec![IpAddr::V4(Ipv4Addr::from(
            (u32::from(hi) << 16) | u32::from(lo),
        ))],
        _ => Vec::new(),
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
    (
        "192.88.99.0/24",
        "6to4 relay anycast (deprecated, RFC 7526)",
    ),
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
    // Teredo tunnels to an IPv4 address hidden (obfuscated) in the IPv6 one.
    ("2001::/32", "Teredo"),
    ("2001:2::/48", "benchmarking"),
    ("2001:db8::/32", "documentation"),
    ("3fff::/20", "documentation"),
    ("5f00::/16", "segment routing (SRv6)"),
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

/// Single addresses that are public (or ULA) in form but serve only the host they run on: cloud
/// platforms' metadata and platform services. Checked before the ranges so the refusal names
/// the service.
const CLOUD_SERVICES: &[(&str, &str)] = &[
    (
        "168.63.129.16/32",
        "cloud platform service (Azure WireServer)",
    ),
    ("fd00:ec2::254/128", "cloud metadata (AWS IMDS over IPv6)"),
    (
        "fd00:ec2::23/128",
        "cloud platform service (AWS DNS over IPv6)",
    ),
    (
        "fd00:ec2::123/128",
        "cloud platform service (AWS time sync over IPv6)",
    ),
];

fn blocked_v4(ip: Ipv4Addr) -> Option<&'static str> {
    find_range(IpAddr::V4(ip), CLOUD_SERVICES).or_else(|| find_range(IpAddr::V4(ip), V4_BLOCKED))
}

fn blocked_v6(ip: Ipv6Addr) -> Option<&'static str> {
    find_range(IpAddr::V6(ip), CLOUD_SERVICES).or_else(|| find_range(IpAddr::V6(ip), V6_BLOCKED))
}

/// The guard: the blocked ranges and this machine's addresses minus the allowlist, and the
/// port rule.
#[derive(Debug, Clone)]
pub struct SsrfGuard {
    allow: Vec<Cidr>,
    ports: Vec<u16>,
    own: Arc<OwnAddresses>,
    lookup: Arc<dyn Lookup>,
}

impl Default for SsrfGuard {
    fn default() -> Self {
        let none: [&str; 0] = [];
        // An empty allowlist always parses.
        SsrfGuard::new(&none).unwrap_or_else(|_| unreachable!())
    }
}

impl SsrfGuard {
    /// A guard that lets these CIDRs through (`"127.0.0.0/8"`, `"::1"`, ...), with GitLab's
    /// ports, the system resolver, and this machine's interface addresses refused.
    pub fn new<S: AsRef<str>>(allow: &[S]) -> Result<SsrfGuard, CidrError> {
        let allow = allow
            .iter()
            .map(|s| s.as_ref().parse())
            .collect::<Result<_, _>>()?;
        Ok(SsrfGuard {
            allow,
            ports: DEFAULT_ALLOWED_PORTS.to_vec(),
            own: Arc::new(OwnAddresses::new(interface_addresses)),
            lookup: Arc::new(SystemLookup),
        })
    }

    /// The ports below 1024 a hook URL may use (80 and 443 unless changed).
    pub fn with_allowed_ports(mut self, ports: &[u16]) -> Self {
        self.ports = ports.to_vec();
        self
    }

    /// Resolves names with `lookup` instead of the system resolver.
    pub fn with_lookup(mut self, lookup: Arc<dyn Lookup>) -> Self {
        self.lookup = lookup;
        self
    }

    /// Takes this machine's addresses from `enumerate` instead of the interfaces.
    pub fn with_own_addresses(mut self, enumerate: Enumerate) -> Self {
        self.own = Arc::new(OwnAddresses::new(enumerate));
        self
    }

    /// `Ok` when the guard lets a connection to `ip` through.
    ///
    /// This machine's own addresses are refused first, whatever the allowlist says: an
    /// allowlisted network (`10.0.0.0/8` for the receivers next door) that happens to hold this
    /// machine's address must not open the consumer's own ports (its API, metrics, a database
    /// on the same host). Loopback is not an "own address" here (the loopback range rule covers
    /// it, and an allowlist may open it for local receivers).
    pub fn check_ip(&self, host: &str, ip: IpAddr) -> Result<(), Refusal> {
        let embedded = embedded(ip);
        let own = self.own.get();
        if own.contains(&ip) || embedded.iter().any(|a| own.contains(a)) {
            return Err(Refusal::OwnAddress {
                host: host.to_owned(),
                ip,
            });
        }
        let allowed = |a: IpAddr| self.allow.iter().any(|c| c.contains(a));
        if allowed(ip) || (!embedded.is_empty() && embedded.iter().all(|a| allowed(*a))) {
            return Ok(());
        }
        if let Some(range) = blocked_range(ip) {
            return Err(Refusal::Blocked {
                host: host.to_owned(),
                ip,
                range,
            });
        }
        Ok(())
    }

    /// `Ok` when `port` is 1024 or above, or in the allowed list.
    pub fn check_port(&self, port: u16) -> Result<(), Refusal> {
        if port >= 1024 || self.ports.contains(&port) {
            return Ok(());
        }
        let allowed = self
            .ports
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        Err(Refusal::Port {
            port,
            allowed: if allowed.is_empty() {
                "none".into()
            } else {
                allowed
            },
        })
    }

    /// Parses and checks a hook URL before sending: scheme, CR/LF, and an IP-literal host
    /// (reqwest connects to those without asking the resolver). Host names are checked later, by
    /// the resolver, on the addresses actually used.
    pub fn check_url(&self, raw: &str) -> Result<Url, Refusal> {
        let url = parse_hook_url(raw)?;
        let host = url
            .host_str()
            .ok_or_else(|| Refusal::InvalidUrl("no host".into()))?;
        if let Some(port) = url.port_or_known_default() {
            self.check_port(port)?;
        }
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
        let addrs: Vec<SocketAddr> = self
            .lookup
            .lookup(host)
            .await
            .map_err(|e| Refusal::Unresolvable {
                host: host.to_owned(),
                reason: e.to_string(),
            })?
            .into_iter()
            .map(|ip| SocketAddr::new(ip, 0))
            .collect();
        if addrs.is_empty() {
            return Err(Refusal::Unresolvable {
                host: host.to_owned(),
                reason: "no addresses".into(),
            });
        }
        for addr in &addrs {
            if let Err(refusal) = self.check_ip(host, addr.ip()) {
                // The detail stays on the server: the refusal's text does not name the address.
                let range = match &refusal {
                    Refusal::Blocked { range, .. } => range,
                    _ => "own address",
                };
                tracing::warn!(host, ip = %addr.ip(), range, rule = refusal.rule(), "SSRF guard refused a host name");
                return Err(refusal);
            }
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

    /// Fixed answers: `host -> addresses`; any other name does not exist.
    #[derive(Debug)]
    struct FixedLookup(Vec<(String, Vec<IpAddr>)>);

    impl Lookup for FixedLookup {
        fn lookup(&self, host: &str) -> LookupFuture {
            let found = self
                .0
                .iter()
                .find(|(h, _)| h == host)
                .map(|(_, a)| a.clone());
            let host = host.to_owned();
            Box::pin(async move {
                found.ok_or_else(|| {
                    std::io::Error::new(std::io::ErrorKind::NotFound, format!("{host}: NXDOMAIN"))
                })
            })
        }
    }

    fn no_own_addresses() -> Vec<IpAddr> {
        Vec::new()
    }

    /// A guard with no machine addresses of its own and `answers` for DNS.
    fn guard_resolving(answers: &[(&str, &[&str])]) -> SsrfGuard {
        let answers = answers
            .iter()
            .map(|(h, a)| (h.to_string(), a.iter().map(|a| ip(a)).collect()))
            .collect();
        SsrfGuard::default()
            .with_own_addresses(no_own_addresses)
            .with_lookup(Arc::new(FixedLookup(answers)))
    }

    /// Every special-purpose range the guard claims, by an address inside it, in every form a
    /// host name may resolve to: a name per row, resolved through the injected resolver.
    #[tokio::test]
    async fn every_special_purpose_range_is_refused_through_the_resolver() {
        let rows: &[(&str, &str)] = &[
            ("0.1.2.3", "unspecified"),
            ("10.20.30.40", "private (RFC 1918)"),
            ("100.64.0.1", "carrier-grade NAT"),
            ("127.0.0.2", "loopback"),
            ("169.254.169.254", "link-local"),
            ("172.16.0.1", "private (RFC 1918)"),
            ("192.0.0.8", "IETF protocol assignment"),
            ("192.0.2.1", "documentation"),
            ("192.168.0.1", "private (RFC 1918)"),
            ("198.18.0.1", "benchmarking"),
            ("198.19.255.254", "benchmarking"),
            ("198.51.100.7", "documentation"),
            ("203.0.113.9", "documentation"),
            ("224.0.0.251", "multicast"),
            ("240.0.0.1", "reserved"),
            ("255.255.255.254", "reserved"),
            ("255.255.255.255", "broadcast"),
            ("::", "unspecified"),
            ("::1", "loopback"),
            ("100::1", "discard-only"),
            ("100::ffff:ffff:ffff:ffff", "discard-only"),
            ("2001:db8::1", "documentation"),
            ("2001:db8:ffff::1", "documentation"),
            ("fc00::1", "unique local"),
            ("fdff::1", "unique local"),
            ("fe80::1", "link-local"),
            ("fec0::1", "site-local"),
            ("ff02::1", "multicast"),
            // Embedded IPv4, judged as the IPv4 address.
            ("::ffff:10.0.0.1", "private (RFC 1918)"),
            ("::ffff:0:10.0.0.1", "private (RFC 1918)"),
            ("::ffff:0:127.0.0.1", "loopback"),
            ("::169.254.0.1", "link-local"),
            ("64:ff9b::192.168.1.1", "private (RFC 1918)"),
            ("64:ff9b:1::10.0.0.1", "private (RFC 1918)"),
            ("64:ff9b:1::127.0.0.1", "loopback"),
            // The /48 layout of RFC 6052: 169.254 in bits 48-63, 169.254 in bits 72-87.
            ("64:ff9b:1:a9fe:a9:fe00::", "link-local"),
            ("2002:c0a8:0101::1", "private (RFC 1918)"),
        ];
        let names: Vec<(String, Vec<IpAddr>)> = rows
            .iter()
            .enumerate()
            .map(|(i, (addr, _))| (format!("host{i}.test"), vec![ip(addr)]))
            .collect();
        let guard = SsrfGuard::default()
            .with_own_addresses(no_own_addresses)
            .with_lookup(Arc::new(FixedLookup(names)));
        for (i, (addr, range)) in rows.iter().enumerate() {
            let host = format!("host{i}.test");
            match guard.resolve_checked(&host).await {
                Err(Refusal::Blocked {
                    range: r, ip: got, ..
                }) => {
                    assert!(r.contains(range), "{addr}: expected {range}, got {r}");
                    assert_eq!(got, ip(addr));
                }
                other => panic!("{addr} should be refused as {range}, got {other:?}"),
            }
        }
        // Each table entry's first and last address, so a range cannot be only parsed.
        for (cidr, name) in V4_BLOCKED.iter().chain(V6_BLOCKED) {
            let c: Cidr = cidr.parse().unwrap();
            let (first, last) = match c.network {
                IpAddr::V4(n) => {
                    let host_bits = 32 - u32::from(c.prefix);
                    let last = u32::from(n) | ((1u64 << host_bits) - 1) as u32;
                    (IpAddr::V4(n), IpAddr::V4(Ipv4Addr::from(last)))
                }
                IpAddr::V6(n) => {
                    let host_bits = 128 - u32::from(c.prefix);
                    let mask = if host_bits == 128 {
                        u128::MAX
                    } else {
                        (1u128 << host_bits) - 1
                    };
                    (
                        IpAddr::V6(n),
                        IpAddr::V6(Ipv6Addr::from(u128::from(n) | mask)),
                    )
                }
            };
            assert_eq!(
                blocked_range(first),
                Some(*name),
                "{first} (first of {cidr})"
            );
            assert!(
                blocked_range(last).is_some(),
                "{last} (last of {cidr}, {name}) is not refused"
            );
        }
    }

    /// Before RFC 8215 and SIIT forms were handled, both of these passed as public addresses.
    #[test]
    fn local_use_nat64_and_translated_forms_are_judged_as_ipv4() {
        let guard = SsrfGuard::default().with_own_addresses(no_own_addresses);
        for addr in ["64:ff9b:1::a00:1", "::ffff:0:a00:1", "64:ff9b:1::7f00:1"] {
            assert!(
                matches!(guard.check_ip("h", ip(addr)), Err(Refusal::Blocked { .. })),
                "{addr}"
            );
        }
        assert_eq!(guard.check_ip("h", ip("64:ff9b:1::808:808")), Ok(()));
        assert_eq!(guard.check_ip("h", ip("::ffff:0:8.8.8.8")), Ok(()));
        assert_eq!(canonical(ip("::ffff:0:10.1.2.3")), ip("10.1.2.3"));
        // An allowlisted network opens its embedded forms too.
        let open = SsrfGuard::new(&["10.0.0.0/8"])
            .unwrap()
            .with_own_addresses(no_own_addresses);
        assert_eq!(open.check_ip("h", ip("64:ff9b:1::10.0.0.1")), Ok(()));
    }

    #[tokio::test]
    async fn a_name_is_refused_if_any_address_is_blocked_and_unknown_names_are_transient() {
        let guard = guard_resolving(&[
            ("mixed.test", &["8.8.8.8", "10.0.0.1"]),
            ("public.test", &["8.8.8.8", "2606:4700:4700::1111"]),
            ("local.test", &["127.0.0.1", "::1"]),
        ]);
        assert!(matches!(
            guard.resolve_checked("mixed.test").await,
            Err(Refusal::Blocked {
                range: "private (RFC 1918)",
                ..
            })
        ));
        let addrs = guard.resolve_checked("public.test").await.unwrap();
        assert_eq!(addrs.len(), 2);
        let unknown = guard
            .resolve_checked("no-such-host.invalid")
            .await
            .unwrap_err();
        assert!(unknown.is_transient(), "{unknown:?}");
        assert_eq!(unknown.rule(), "unresolvable");

        let open = SsrfGuard::new(&["127.0.0.0/8", "::1/128"])
            .unwrap()
            .with_own_addresses(no_own_addresses)
            .with_lookup(guard.lookup.clone());
        let addrs = open.resolve_checked("local.test").await.unwrap();
        assert!(addrs.iter().all(|a| a.ip().is_loopback()), "{addrs:?}");
    }

    #[test]
    fn ports_below_1024_need_the_allowed_list() {
        let guard = SsrfGuard::default().with_own_addresses(no_own_addresses);
        for url in [
            "http://8.8.8.8/hook",
            "https://8.8.8.8/hook",
            "http://example.com:80/",
            "https://example.com:443/",
            "http://example.com:1024/",
            "http://example.com:8443/",
        ] {
            assert!(guard.check_url(url).is_ok(), "{url}");
        }
        for (url, port) in [
            ("http://example.com:22/", 22),
            ("https://example.com:25/", 25),
            ("http://8.8.8.8:1023/", 1023),
            ("http://example.com:0/", 0),
        ] {
            let refused = guard.check_url(url).unwrap_err();
            assert_eq!(refused.rule(), "port", "{url}");
            assert!(
                refused
                    .to_string()
                    .contains(&format!("port {port} is below 1024")),
                "{refused}"
            );
        }
        let ssh = guard.clone().with_allowed_ports(&[22, 80, 443]);
        assert!(ssh.check_url("http://example.com:22/").is_ok());
        let none = guard.with_allowed_ports(&[]);
        assert!(none.check_url("http://example.com/").is_err());
        assert!(none.check_url("http://example.com:8080/").is_ok());
    }

    #[test]
    fn this_machines_own_addresses_are_refused() {
        fn own() -> Vec<IpAddr> {
            vec![ip("8.8.4.4"), ip("2606:4700::6810:85e5")]
        }
        let guard = SsrfGuard::default().with_own_addresses(own);
        for addr in ["8.8.4.4", "::ffff:8.8.4.4", "2606:4700::6810:85e5"] {
            let refused = guard.check_ip("h", ip(addr)).unwrap_err();
            assert_eq!(refused.rule(), "own_address", "{addr}");
            assert!(refused.to_string().contains("own address"), "{refused}");
        }
        assert_eq!(guard.check_ip("h", ip("8.8.8.8")), Ok(()));
        assert!(matches!(
            guard.check_url("http://8.8.4.4:8080/hook"),
            Err(Refusal::OwnAddress { .. })
        ));
        // The real enumeration works here and leaves loopback to the loopback rule.
        assert!(interface_addresses().iter().all(|a| !a.is_loopback()));
    }

    #[test]
    fn refusals_name_their_rule_in_plain_words() {
        let guard = SsrfGuard::default().with_own_addresses(no_own_addresses);
        let text = guard
            .check_ip("0.0.0.0", ip("0.0.0.0"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            text,
            "blocked by the SSRF guard (rule: special-purpose address): 0.0.0.0 is in the unspecified (\"this network\") range"
        );
        assert!(!text.contains("a unspecified"));
    }

    /// A name's refusal must not tell whoever asked what the name resolves to: otherwise adding
    /// or testing hooks maps the internal DNS, address by address.
    #[tokio::test]
    async fn a_refused_name_does_not_reveal_its_address_or_range() {
        fn own() -> Vec<IpAddr> {
            vec![ip("10.1.2.3")]
        }
        let guard = guard_resolving(&[
            ("db.internal.test", &["10.20.30.40"]),
            ("me.internal.test", &["10.1.2.3"]),
        ])
        .with_own_addresses(own);
        for (host, rule) in [
            ("db.internal.test", "special_purpose_address"),
            ("me.internal.test", "own_address"),
        ] {
            let refusal = guard.resolve_checked(host).await.unwrap_err();
            assert_eq!(refusal.rule(), rule);
            let text = refusal.to_string();
            assert!(
                text.contains(&format!("{host} resolves to a blocked address")),
                "{text}"
            );
            for leak in ["10.20.30.40", "10.1.2.3", "private", "RFC 1918", "machine"] {
                assert!(!text.contains(leak), "{text} reveals {leak}");
            }
        }
    }

    #[test]
    fn tunnels_new_special_ranges_and_cloud_services_are_refused() {
        let guard = SsrfGuard::default().with_own_addresses(no_own_addresses);
        for (addr, range) in [
            ("2001::1", "Teredo"),
            ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "Teredo"),
            ("2001:2::1", "benchmarking"),
            ("3fff::1", "documentation"),
            ("3fff:fff::1", "documentation"),
            ("5f00::1", "segment routing"),
            ("192.88.99.1", "6to4 relay"),
            ("168.63.129.16", "Azure WireServer"),
            ("fd00:ec2::254", "AWS IMDS"),
            ("fd00:ec2::23", "AWS DNS"),
            ("::ffff:168.63.129.16", "Azure WireServer"),
        ] {
            match guard.check_ip(addr, ip(addr)) {
                Err(Refusal::Blocked { range: r, .. }) => {
                    assert!(r.contains(range), "{addr}: expected {range}, got {r}")
                }
                other => panic!("{addr} should be refused as {range}, got {other:?}"),
            }
        }
        // Their neighbours are public.
        for addr in [
            "168.63.129.17",
            "2001:4860::8888",
            "4000::1",
            "192.88.100.1",
        ] {
            assert_eq!(guard.check_ip(addr, ip(addr)), Ok(()), "{addr}");
        }
    }

    #[test]
    fn the_own_address_rule_wins_over_the_allowlist() {
        fn own() -> Vec<IpAddr> {
            vec![ip("10.1.2.3")]
        }
        let guard = SsrfGuard::new(&["10.0.0.0/8"])
            .unwrap()
            .with_own_addresses(own);
        assert_eq!(guard.check_ip("10.9.9.9", ip("10.9.9.9")), Ok(()));
        for addr in ["10.1.2.3", "::ffff:10.1.2.3"] {
            let refused = guard.check_ip(addr, ip(addr)).unwrap_err();
            assert_eq!(refused.rule(), "own_address", "{addr}");
        }
    }
}
