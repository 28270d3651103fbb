//! The egress policy of aivmm's user-mode network: which destinations the
//! guest may reach through the NAT gateway.
//!
//! The guest is not trusted, so every outbound TCP connection and UDP flow it
//! starts is checked here, on the host side, before aivmm opens a host socket
//! for it. The network is IPv4 only.
//!
//! - **Default**: the public internet is open; the host's loopback, the
//!   host's own addresses on any interface (a public one included), "this
//!   network", link-local (with the cloud metadata address), the private
//!   ranges, shared address space (carrier-grade NAT, Tailscale), the IETF
//!   protocol assignments, benchmarking, multicast and reserved ranges are
//!   closed.
//! - **`--net-allow SPEC`** opens one destination (`CIDR[:PORT]`, `IP[:PORT]`
//!   or `HOSTNAME[:PORT]`), even in a closed range. A host name is resolved
//!   once, when the policy is built. This is the only way to open a closed
//!   range.
//! - **`--net-allow-only LIST`** makes the policy a strict allowlist of names
//!   (`api.example.com`, `*.example.com`) and addresses, each with an optional
//!   port; `--net-allow` entries still add to it. Names are matched through
//!   the DNS answers aivmm's own DNS server gave the guest ([`EgressPolicy::learn`]),
//!   and names that are not allowed are not resolved at all
//!   ([`EgressPolicy::name_allowed`]), so DNS is no exfiltration channel.
//!   `--net-allow-only` opens only public addresses: an address or range item
//!   inside a closed range is an error, and a DNS answer inside a closed range
//!   is ignored (otherwise a name whose DNS the guest's owner controls could
//!   point at the host's loopback or the metadata address: DNS rebinding).
//!   That also makes [`PolicyConfig::narrowed_by`] sound.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

/// At most this many addresses learned from DNS answers are remembered
/// (in `--net-allow-only` mode); the oldest are forgotten first, so a guest
/// that resolves allowed names without end cannot grow the table.
pub const LEARNED_MAX: usize = 4096;

/// What the policy says about one destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The guest may reach the destination.
    Allow,
    /// The guest may not; the reason (for aivmm's log) names the closed range
    /// or the flag that would open the destination.
    Deny(String),
}

impl Verdict {
    /// Whether this is [`Verdict::Allow`].
    pub fn is_allow(&self) -> bool {
        matches!(self, Verdict::Allow)
    }
}

/// The egress options as the user wrote them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyConfig {
    /// `--net-allow` specs: `CIDR[:PORT]`, `IP[:PORT]` or `HOSTNAME[:PORT]`
    /// (an entry may also hold several, separated by commas).
    pub allow: Vec<String>,
    /// `--net-allow-only` lists, merged: `None` without the flag. Entries may
    /// be single items or comma-separated lists of them. `Some` of an empty
    /// list allows nothing (but the `--net-allow` entries).
    pub allow_only: Option<Vec<String>>,
}

impl PolicyConfig {
    /// The policy of a workdir's own config `other`, bounded by this
    /// (trusted) policy: **a workdir's own config may narrow the policy, never
    /// widen it.**
    ///
    /// - `allow`: only the entries of `other.allow` that are also in
    ///   `self.allow` are kept (an entry must be spelled the same after
    ///   normalising: case, a trailing dot, `1.2.3.4` = `1.2.3.4/32`); a
    ///   workdir cannot add a `--net-allow` of its own, and the trusted
    ///   entries it does not repeat are dropped.
    /// - `allow_only`: if `other` has none, this policy's is kept. If `other`
    ///   has one and this policy has one too, only the items present in both
    ///   are kept (again spelled the same after normalising: a narrower item
    ///   that is not literally in the trusted list, such as `api.example.com`
    ///   under a trusted `*.example.com`, is dropped; an empty intersection
    ///   allows nothing). If this policy has none, `other`'s is taken: that
    ///   narrows the default, since `--net-allow-only` opens only public
    ///   addresses.
    ///
    /// Entries are returned one item each, normalised; an item that does not
    /// parse is kept as written (trimmed) when taken from `other`'s
    /// allow-only list, so that building the policy reports it.
    pub fn narrowed_by(&self, other: &PolicyConfig) -> PolicyConfig {
        let trusted_allow: HashSet<String> = items_of(&self.allow).map(normalised).collect();
        let allow = dedup(
            items_of(&other.allow)
                .map(normalised)
                .filter(|item| trusted_allow.contains(item)),
        );
        let allow_only = match (&self.allow_only, &other.allow_only) {
            (mine, None) => mine
                .as_ref()
                .map(|mine| dedup(items_of(mine).map(normalised))),
            (None, Some(theirs)) => Some(dedup(items_of(theirs).map(normalised))),
            (Some(mine), Some(theirs)) => {
                let mine: HashSet<String> = items_of(mine).map(normalised).collect();
                Some(dedup(
                    items_of(theirs)
                        .map(normalised)
                        .filter(|item| mine.contains(item)),
                ))
            }
        };
        PolicyConfig { allow, allow_only }
    }
}

/// A bad egress option.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// An IPv6 address or range.
    #[error(
        "{spec:?}: IPv6 is not supported by aivmm's user-mode network (it has no IPv6); \
         accepted: CIDR[:PORT], IP[:PORT] or HOSTNAME[:PORT] with an IPv4 address"
    )]
    Ipv6 {
        /// The item as written.
        spec: String,
    },
    /// A spec that is none of the accepted forms.
    #[error("{spec:?}: {why}; accepted: CIDR[:PORT], IP[:PORT] or HOSTNAME[:PORT], e.g. 10.0.0.0/8, 192.168.1.10:5432, api.example.com:443")]
    Syntax {
        /// The item as written.
        spec: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A port that is not a number from 1 to 65535.
    #[error(
        "{spec:?}: bad port {port:?}: a port is a number from 1 to 65535 (e.g. 192.168.1.10:5432)"
    )]
    BadPort {
        /// The item as written.
        spec: String,
        /// The port part.
        port: String,
    },
    /// An address that is not a dotted-quad IPv4 address.
    #[error("{spec:?}: bad IPv4 address {addr:?}: an address is four numbers from 0 to 255 without leading zeros, e.g. 192.168.1.10")]
    BadAddress {
        /// The item as written.
        spec: String,
        /// The address part.
        addr: String,
    },
    /// A CIDR prefix length that is not a number from 0 to 32.
    #[error("{spec:?}: bad prefix length {prefix:?}: a CIDR prefix is a number from 0 to 32 (e.g. 10.0.0.0/8)")]
    BadPrefix {
        /// The item as written.
        spec: String,
        /// The prefix part.
        prefix: String,
    },
    /// A CIDR range whose address has bits set after the prefix.
    #[error("{spec:?}: {addr}/{prefix} has host bits set: a CIDR range is written with its network address, here {network}/{prefix} (or write {addr} alone for the one address)")]
    HostBits {
        /// The item as written.
        spec: String,
        /// The address as written.
        addr: Ipv4Addr,
        /// The prefix length.
        prefix: u8,
        /// The network address of `addr/prefix`.
        network: Ipv4Addr,
    },
    /// A host name that is not a valid one.
    #[error("{spec:?}: bad host name {name:?}: {why} (a host name has dot-separated labels of 1 to 63 letters, digits and '-', not starting or ending with '-', at most 253 characters in all; `*.` is accepted only as the first label, in --net-allow-only)")]
    BadName {
        /// The item as written.
        spec: String,
        /// The name part.
        name: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A `*.` name in `--net-allow`.
    #[error("--net-allow {spec:?}: a wildcard name is accepted only in --net-allow-only (--net-allow resolves its host names once, when aivmm starts, and a wildcard cannot be resolved)")]
    WildcardInAllow {
        /// The item as written.
        spec: String,
    },
    /// A `--net-allow` host name that resolves to no IPv4 address.
    #[error("--net-allow {spec:?}: {name:?} does not resolve to any IPv4 address (--net-allow resolves its host names once, when aivmm starts)")]
    Unresolved {
        /// The item as written.
        spec: String,
        /// The name that did not resolve.
        name: String,
    },
    /// A `--net-allow-only` address or range inside a closed range.
    #[error("--net-allow-only {spec:?}: {net} is {range}, which --net-allow-only never opens (it opens only public addresses); open it with --net-allow {spec}")]
    AllowOnlyClosedRange {
        /// The item as written.
        spec: String,
        /// The address or range.
        net: String,
        /// The closed range it is in.
        range: &'static str,
    },
}

/// Checks the syntax of one `--net-allow` SPEC or one `--net-allow-only`
/// LIST (its items separated by commas), without resolving anything, so that
/// the command line can reject a bad flag early.
///
/// A wildcard name (`*.example.com`) is valid syntax here since
/// `--net-allow-only` accepts it; [`EgressPolicy::new`] refuses one given to
/// `--net-allow`, and an allow-only address inside a closed range.
pub fn validate_spec(spec: &str) -> Result<(), PolicyError> {
    split_list(spec).try_for_each(|item| parse_item(item).map(|_| ()))
}

/// An IPv4 range: the network address (host bits zero) and the prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Net {
    addr: u32,
    prefix: u8,
}

impl Net {
    const fn new(a: u8, b: u8, c: u8, d: u8, prefix: u8) -> Net {
        Net {
            addr: u32::from_be_bytes([a, b, c, d]),
            prefix,
        }
    }

    fn mask(prefix: u8) -> u32 {
        match prefix {
            0 => 0,
            p => u32::MAX << (32 - u32::from(p)),
        }
    }

    fn contains(self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & Net::mask(self.prefix) == self.addr
    }

    /// Whether all of `self` is inside `outer`.
    fn within(self, outer: Net) -> bool {
        self.prefix >= outer.prefix && outer.contains(Ipv4Addr::from(self.addr))
    }
}

impl fmt::Display for Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.prefix {
            32 => write!(f, "{}", Ipv4Addr::from(self.addr)),
            p => write!(f, "{}/{p}", Ipv4Addr::from(self.addr)),
        }
    }
}

/// The ranges closed by default, most specific first (the first match names
/// the reason).
const CLOSED: &[(Net, &str)] = &[
    (Net::new(0, 0, 0, 0, 8), "\"this network\" 0.0.0.0/8"),
    (Net::new(127, 0, 0, 0, 8), "the host's loopback 127.0.0.0/8"),
    (
        Net::new(169, 254, 169, 254, 32),
        "the cloud metadata address (link-local 169.254.0.0/16)",
    ),
    (Net::new(169, 254, 0, 0, 16), "link-local 169.254.0.0/16"),
    (Net::new(10, 0, 0, 0, 8), "private 10.0.0.0/8"),
    (Net::new(172, 16, 0, 0, 12), "private 172.16.0.0/12"),
    (Net::new(192, 168, 0, 0, 16), "private 192.168.0.0/16"),
    (
        Net::new(100, 64, 0, 0, 10),
        "shared address space 100.64.0.0/10 (carrier-grade NAT, Tailscale)",
    ),
    (
        Net::new(192, 0, 0, 0, 24),
        "IETF protocol assignments 192.0.0.0/24",
    ),
    (Net::new(198, 18, 0, 0, 15), "benchmarking 198.18.0.0/15"),
    (Net::new(224, 0, 0, 0, 4), "multicast 224.0.0.0/4"),
    (
        Net::new(255, 255, 255, 255, 32),
        "the broadcast address (reserved 240.0.0.0/4)",
    ),
    (Net::new(240, 0, 0, 0, 4), "reserved 240.0.0.0/4"),
];

/// The closed range `ip` is in, as words for a log line.
fn closed_range(ip: Ipv4Addr) -> Option<&'static str> {
    CLOSED
        .iter()
        .find(|(net, _)| net.contains(ip))
        .map(|&(_, why)| why)
}

/// The closed range all of `net` is in.
fn closed_range_of(net: Net) -> Option<&'static str> {
    CLOSED
        .iter()
        .find(|(closed, _)| net.within(*closed))
        .map(|&(_, why)| why)
}

/// What an item names.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Target {
    /// An address (`/32`) or range.
    Net(Net),
    /// Exactly this host name (lower case, no trailing dot).
    Name(String),
    /// Any name under this domain (`*.` + it), not the domain itself.
    Wildcard(String),
}

impl Target {
    /// Whether the (normalised) name `name` matches.
    fn matches_name(&self, name: &str) -> bool {
        match self {
            Target::Net(_) => false,
            Target::Name(n) => n == name,
            Target::Wildcard(domain) => name
                .strip_suffix(domain.as_str())
                .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
        }
    }
}

/// One parsed item: a target and a port (`None`: all ports).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Item {
    target: Target,
    port: Option<u16>,
}

impl Item {
    fn port_matches(&self, port: u16) -> bool {
        self.port.is_none_or(|p| p == port)
    }
}

impl fmt::Display for Item {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.target {
            Target::Net(net) => write!(f, "{net}")?,
            Target::Name(name) => write!(f, "{name}")?,
            Target::Wildcard(domain) => write!(f, "*.{domain}")?,
        }
        match self.port {
            Some(port) => write!(f, ":{port}"),
            None => Ok(()),
        }
    }
}

/// The items of a list: split on commas, trimmed, empty ones skipped.
fn split_list(list: &str) -> impl Iterator<Item = &str> {
    list.split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
}

/// The items of several lists.
fn items_of(lists: &[String]) -> impl Iterator<Item = &str> {
    lists.iter().flat_map(|list| split_list(list))
}

/// An item's canonical spelling, or the item as written if it does not parse.
fn normalised(item: &str) -> String {
    parse_item(item).map_or_else(|_| item.to_string(), |item| item.to_string())
}

/// `items` in order, without repeats.
fn dedup(items: impl Iterator<Item = String>) -> Vec<String> {
    let mut seen = HashSet::new();
    items.filter(|item| seen.insert(item.clone())).collect()
}

/// Parses one item: `CIDR[:PORT]`, `IP[:PORT]`, `HOSTNAME[:PORT]` or
/// `*.DOMAIN[:PORT]`.
fn parse_item(spec: &str) -> Result<Item, PolicyError> {
    let spec = spec.trim();
    let syntax = |why| PolicyError::Syntax {
        spec: spec.to_string(),
        why,
    };
    if spec.is_empty() {
        return Err(syntax("empty"));
    }
    if spec.starts_with('[') || spec.matches(':').count() > 1 {
        // An address, `[address]:port`, `address/prefix` or `address%zone`.
        let core = spec
            .trim_start_matches('[')
            .split(['/', '%', ']'])
            .next()
            .unwrap_or("");
        return Err(
            if spec.starts_with('[') || core.parse::<Ipv6Addr>().is_ok() {
                PolicyError::Ipv6 {
                    spec: spec.to_string(),
                }
            } else {
                syntax("more than one ':'")
            },
        );
    }
    let (host, port) = match spec.rsplit_once(':') {
        Some((host, port)) => (host, Some(parse_port(spec, port)?)),
        None => (spec, None),
    };
    if host.is_empty() {
        return Err(syntax("no address or name before the ':'"));
    }
    let target = if let Some((addr, prefix)) = host.split_once('/') {
        Target::Net(parse_cidr(spec, addr, prefix)?)
    } else if let Ok(ip) = host.parse::<Ipv4Addr>() {
        Target::Net(Net {
            addr: u32::from(ip),
            prefix: 32,
        })
    } else if looks_numeric(host) {
        return Err(PolicyError::BadAddress {
            spec: spec.to_string(),
            addr: host.to_string(),
        });
    } else {
        parse_name(spec, host)?
    };
    Ok(Item { target, port })
}

fn parse_port(spec: &str, port: &str) -> Result<u16, PolicyError> {
    let bad = || PolicyError::BadPort {
        spec: spec.to_string(),
        port: port.to_string(),
    };
    if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    match port.parse::<u16>() {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(bad()),
    }
}

fn parse_cidr(spec: &str, addr: &str, prefix: &str) -> Result<Net, PolicyError> {
    let ip = addr
        .parse::<Ipv4Addr>()
        .map_err(|_| PolicyError::BadAddress {
            spec: spec.to_string(),
            addr: addr.to_string(),
        })?;
    let bits = match prefix.parse::<u8>() {
        Ok(bits) if bits <= 32 && prefix.bytes().all(|b| b.is_ascii_digit()) => bits,
        _ => {
            return Err(PolicyError::BadPrefix {
                spec: spec.to_string(),
                prefix: prefix.to_string(),
            })
        }
    };
    let network = u32::from(ip) & Net::mask(bits);
    if network != u32::from(ip) {
        return Err(PolicyError::HostBits {
            spec: spec.to_string(),
            addr: ip,
            prefix: bits,
            network: Ipv4Addr::from(network),
        });
    }
    Ok(Net {
        addr: network,
        prefix: bits,
    })
}

/// Whether `host` is meant as an address rather than a name: only digits and
/// dots, or a last label of digits only (no top-level domain is numeric).
fn looks_numeric(host: &str) -> bool {
    let last = host.trim_end_matches('.').rsplit('.').next().unwrap_or("");
    host.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        || (!last.is_empty() && last.bytes().all(|b| b.is_ascii_digit()))
}

/// Parses a host name or `*.DOMAIN` (case-insensitive, a trailing dot
/// ignored).
fn parse_name(spec: &str, host: &str) -> Result<Target, PolicyError> {
    let bad = |why| PolicyError::BadName {
        spec: spec.to_string(),
        name: host.to_string(),
        why,
    };
    let name = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    let (wildcard, domain) = match name.strip_prefix("*.") {
        Some(domain) => (true, domain),
        None => (false, name.as_str()),
    };
    if name.len() > 253 {
        return Err(bad("longer than 253 characters"));
    }
    if let Err(why) = check_name(domain) {
        return Err(bad(why));
    }
    Ok(if wildcard {
        Target::Wildcard(domain.to_string())
    } else {
        Target::Name(domain.to_string())
    })
}

/// Checks a lower-case host name without a trailing dot.
fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("empty");
    }
    if name.len() > 253 {
        return Err("longer than 253 characters");
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err("empty label");
        }
        if label.len() > 63 {
            return Err("a label longer than 63 characters");
        }
        if label.contains('*') {
            return Err("'*' is accepted only as a whole first label (`*.example.com`)");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err("a character other than a letter, digit, '-' or '.'");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("a label starting or ending with '-'");
        }
    }
    Ok(())
}

/// A host name as the DNS server passes it: lower case, no trailing dot,
/// `None` if it is not a valid host name.
fn normalise_name(name: &str) -> Option<String> {
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    check_name(&name).ok().map(|()| name)
}

/// A `--net-allow` entry: the ranges it opens (a host name's addresses) on
/// its port, and how to show it.
#[derive(Debug)]
struct Opened {
    nets: Vec<Net>,
    port: Option<u16>,
    label: String,
}

/// The addresses learned from DNS answers, each with the allow-only name
/// items it was learned for; bounded, oldest forgotten first.
#[derive(Debug)]
struct Learned {
    max: usize,
    next: u64,
    /// Address -> (when learned, indices into `AllowOnly::names`).
    by_addr: HashMap<Ipv4Addr, (u64, Vec<usize>)>,
    /// When learned -> address, oldest first.
    order: BTreeMap<u64, Ipv4Addr>,
}

impl Learned {
    fn new(max: usize) -> Learned {
        Learned {
            max,
            next: 0,
            by_addr: HashMap::new(),
            order: BTreeMap::new(),
        }
    }

    fn insert(&mut self, addr: Ipv4Addr, items: &[usize]) {
        let now = self.next;
        self.next += 1;
        match self.by_addr.get_mut(&addr) {
            Some((when, known)) => {
                self.order.remove(when);
                *when = now;
                for &item in items {
                    if !known.contains(&item) {
                        known.push(item);
                    }
                }
            }
            None => {
                self.by_addr.insert(addr, (now, items.to_vec()));
            }
        }
        self.order.insert(now, addr);
        while self.by_addr.len() > self.max {
            match self.order.pop_first() {
                Some((_, oldest)) => {
                    self.by_addr.remove(&oldest);
                }
                None => break,
            }
        }
    }

    fn get(&self, addr: Ipv4Addr) -> Option<&[usize]> {
        self.by_addr.get(&addr).map(|(_, items)| items.as_slice())
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.by_addr.len()
    }
}

/// The `--net-allow-only` part of a policy.
#[derive(Debug)]
struct AllowOnly {
    /// Address and range items.
    nets: Vec<Item>,
    /// Name and wildcard items.
    names: Vec<Item>,
    /// All items, as given (normalised), for [`EgressPolicy::describe`].
    labels: Vec<String>,
    learned: Learned,
}

/// The egress policy of one guest: built once from the options, then asked
/// about every connection or flow the guest starts.
#[derive(Debug)]
pub struct EgressPolicy {
    /// `--net-allow` entries (open even closed ranges).
    allow: Vec<Opened>,
    /// The host names of `--net-allow` entries (the guest may resolve them
    /// even under `--net-allow-only`).
    allow_names: Vec<String>,
    /// `--net-allow-only`, if given.
    only: Option<AllowOnly>,
    /// The host's own addresses (on any interface): the host itself, closed
    /// whatever range they are in (see [`EgressPolicy::set_host_addresses`]).
    host: Vec<Ipv4Addr>,
}

impl EgressPolicy {
    /// Builds the policy. `resolve` resolves the host names of `--net-allow`
    /// entries (once, here); a name it resolves to nothing is an error, as is
    /// any bad spec, a wildcard in `--net-allow` and a `--net-allow-only`
    /// address or range inside a closed range.
    pub fn new(
        cfg: &PolicyConfig,
        resolve: impl Fn(&str) -> Vec<Ipv4Addr>,
    ) -> Result<Self, PolicyError> {
        let mut allow = Vec::new();
        let mut allow_names = Vec::new();
        for spec in items_of(&cfg.allow) {
            let item = parse_item(spec)?;
            match &item.target {
                Target::Net(net) => allow.push(Opened {
                    nets: vec![*net],
                    port: item.port,
                    label: item.to_string(),
                }),
                Target::Name(name) => {
                    let mut addrs = resolve(name);
                    addrs.sort();
                    addrs.dedup();
                    if addrs.is_empty() {
                        return Err(PolicyError::Unresolved {
                            spec: spec.to_string(),
                            name: name.clone(),
                        });
                    }
                    let shown: Vec<String> = addrs.iter().map(Ipv4Addr::to_string).collect();
                    allow.push(Opened {
                        nets: addrs
                            .iter()
                            .map(|&a| Net {
                                addr: u32::from(a),
                                prefix: 32,
                            })
                            .collect(),
                        port: item.port,
                        label: format!("{item} ({})", shown.join(", ")),
                    });
                    allow_names.push(name.clone());
                }
                Target::Wildcard(_) => {
                    return Err(PolicyError::WildcardInAllow {
                        spec: spec.to_string(),
                    })
                }
            }
        }
        let only = match &cfg.allow_only {
            None => None,
            Some(lists) => {
                let mut only = AllowOnly {
                    nets: Vec::new(),
                    names: Vec::new(),
                    labels: Vec::new(),
                    learned: Learned::new(LEARNED_MAX),
                };
                for spec in items_of(lists) {
                    let item = parse_item(spec)?;
                    let label = item.to_string();
                    if only.labels.contains(&label) {
                        continue;
                    }
                    if let Target::Net(net) = item.target {
                        if let Some(range) = closed_range_of(net) {
                            return Err(PolicyError::AllowOnlyClosedRange {
                                spec: spec.to_string(),
                                net: net.to_string(),
                                range,
                            });
                        }
                        only.nets.push(item);
                    } else {
                        only.names.push(item);
                    }
                    only.labels.push(label);
                }
                Some(only)
            }
        };
        Ok(EgressPolicy {
            allow,
            allow_names,
            only,
            host: Vec::new(),
        })
    }

    /// Whether the guest may reach `dst:port` (the caller has already mapped
    /// the gateway's address to 127.0.0.1: the host's loopback).
    pub fn check(&self, dst: Ipv4Addr, port: u16) -> Verdict {
        let opened = self
            .allow
            .iter()
            .any(|o| o.port.is_none_or(|p| p == port) && o.nets.iter().any(|n| n.contains(dst)));
        if opened {
            return Verdict::Allow;
        }
        if self.host.contains(&dst) && closed_range(dst).is_none() {
            return Verdict::Deny(format!(
                "{dst}:{port} is an address of this host (open it with --net-allow {dst}:{port})"
            ));
        }
        if let Some(range) = closed_range(dst) {
            return Verdict::Deny(format!(
                "{dst}:{port} is {range} (open it with --net-allow {dst}:{port})"
            ));
        }
        let Some(only) = &self.only else {
            return Verdict::Allow;
        };
        let in_range = only.nets.iter().any(|item| {
            item.port_matches(port) && matches!(item.target, Target::Net(n) if n.contains(dst))
        });
        if in_range {
            return Verdict::Allow;
        }
        match only.learned.get(dst) {
            Some(items) if items.iter().any(|&i| only.names[i].port_matches(port)) => {
                Verdict::Allow
            }
            Some(items) => {
                let names: Vec<String> = items.iter().map(|&i| only.names[i].to_string()).collect();
                Verdict::Deny(format!(
                    "{dst}:{port} is not in --net-allow-only ({dst} was resolved for {}, on other ports)",
                    names.join(", ")
                ))
            }
            None => Verdict::Deny(format!("{dst}:{port} is not in --net-allow-only")),
        }
    }

    /// Tells the policy the host's own addresses. A service that listens on all
    /// addresses (0.0.0.0) is reachable through each of them, and a host with
    /// a public address on an interface would otherwise open every such
    /// service to the guest as "the public internet". They are closed like
    /// the host's loopback: only `--net-allow` opens one.
    pub fn set_host_addresses(&mut self, addrs: &[Ipv4Addr]) {
        self.host.clear();
        self.host.extend_from_slice(addrs);
        self.host.sort();
        self.host.dedup();
    }

    /// Whether aivmm's DNS server may resolve `name` for the guest. Without
    /// `--net-allow-only` every name may be; with it only the allowed names,
    /// wildcards and the host names of `--net-allow` entries (other names are
    /// refused without asking the host's resolver, so the guest cannot use
    /// lookups to carry data out).
    pub fn name_allowed(&self, name: &str) -> bool {
        let Some(only) = &self.only else {
            return true;
        };
        let Some(name) = normalise_name(name) else {
            return false;
        };
        only.names
            .iter()
            .any(|item| item.target.matches_name(&name))
            || self.allow_names.contains(&name)
    }

    /// Records that aivmm's DNS server answered the guest's query for `name`
    /// (the name the guest asked for, not a CNAME target) with `addrs`, so
    /// that connections to them are allowed under `--net-allow-only` (on the
    /// ports of the items `name` matches). Ignored without `--net-allow-only`
    /// and for names no allow-only item matches; addresses in closed ranges
    /// are ignored too (no DNS rebinding to the host or the local network).
    /// At most [`LEARNED_MAX`] addresses are kept, the oldest forgotten first.
    pub fn learn(&mut self, name: &str, addrs: &[Ipv4Addr]) {
        let Some(only) = &mut self.only else {
            return;
        };
        let Some(name) = normalise_name(name) else {
            return;
        };
        let items: Vec<usize> = only
            .names
            .iter()
            .enumerate()
            .filter(|(_, item)| item.target.matches_name(&name))
            .map(|(i, _)| i)
            .collect();
        if items.is_empty() {
            return;
        }
        for &addr in addrs {
            match closed_range(addr) {
                Some(range) => log::debug!(
                    "usernet: {name} resolved to {addr}, {range}: not opened by --net-allow-only"
                ),
                None => only.learned.insert(addr, &items),
            }
        }
    }

    /// The policy in one line, for aivmm's log.
    pub fn describe(&self) -> String {
        let plus = if self.allow.is_empty() {
            String::new()
        } else {
            let labels: Vec<&str> = self.allow.iter().map(|o| o.label.as_str()).collect();
            format!(" plus {}", labels.join(", "))
        };
        match &self.only {
            None => {
                format!(
                    "default (public internet; no loopback, link-local or private ranges){plus}"
                )
            }
            Some(only) if only.labels.is_empty() => format!("allow-only nothing{plus}"),
            Some(only) => format!("allow-only {}{plus}", only.labels.join(", ")),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn no_dns(_: &str) -> Vec<Ipv4Addr> {
        Vec::new()
    }

    fn fake_dns(name: &str) -> Vec<Ipv4Addr> {
        match name {
            "db.corp" => vec![ip("10.1.2.4"), ip("10.1.2.3"), ip("10.1.2.3")],
            "mirror.example.org" => vec![ip("203.0.113.7")],
            "localhost" => vec![ip("127.0.0.1")],
            _ => Vec::new(),
        }
    }

    fn allow(specs: &[&str]) -> PolicyConfig {
        PolicyConfig {
            allow: specs.iter().map(|s| s.to_string()).collect(),
            allow_only: None,
        }
    }

    fn only(allow: &[&str], only: &[&str]) -> PolicyConfig {
        PolicyConfig {
            allow: allow.iter().map(|s| s.to_string()).collect(),
            allow_only: Some(only.iter().map(|s| s.to_string()).collect()),
        }
    }

    fn policy(cfg: &PolicyConfig) -> EgressPolicy {
        EgressPolicy::new(cfg, fake_dns).unwrap()
    }

    fn allowed(p: &EgressPolicy, dst: &str, port: u16) -> bool {
        p.check(ip(dst), port).is_allow()
    }

    fn deny_reason(p: &EgressPolicy, dst: &str, port: u16) -> String {
        match p.check(ip(dst), port) {
            Verdict::Deny(why) => why,
            Verdict::Allow => panic!("{dst}:{port} allowed"),
        }
    }

    /// A sample of every closed range (first, inside, last) with the words
    /// its reason must contain.
    const CLOSED_SAMPLES: &[(&str, &str)] = &[
        ("0.0.0.0", "0.0.0.0/8"),
        ("0.255.255.255", "0.0.0.0/8"),
        ("127.0.0.1", "127.0.0.0/8"),
        ("127.255.255.255", "127.0.0.0/8"),
        ("169.254.169.254", "metadata"),
        ("169.254.0.1", "169.254.0.0/16"),
        ("169.254.255.255", "169.254.0.0/16"),
        ("10.0.0.0", "10.0.0.0/8"),
        ("10.255.255.255", "10.0.0.0/8"),
        ("172.16.0.1", "172.16.0.0/12"),
        ("172.31.255.255", "172.16.0.0/12"),
        ("192.168.0.1", "192.168.0.0/16"),
        ("192.168.255.255", "192.168.0.0/16"),
        ("100.64.0.1", "100.64.0.0/10"),
        ("100.100.100.100", "Tailscale"),
        ("100.127.255.255", "100.64.0.0/10"),
        ("192.0.0.1", "192.0.0.0/24"),
        ("192.0.0.255", "192.0.0.0/24"),
        ("198.18.0.1", "198.18.0.0/15"),
        ("198.19.255.255", "198.18.0.0/15"),
        ("224.0.0.1", "224.0.0.0/4"),
        ("239.255.255.250", "224.0.0.0/4"),
        ("240.0.0.1", "240.0.0.0/4"),
        ("254.255.255.255", "240.0.0.0/4"),
        ("255.255.255.255", "broadcast"),
    ];

    /// Public addresses, many just outside a closed range.
    const PUBLIC_SAMPLES: &[&str] = &[
        "1.1.1.1",
        "8.8.8.8",
        "93.184.216.34",
        "1.0.0.0",
        "9.255.255.255",
        "11.0.0.0",
        "126.255.255.255",
        "128.0.0.0",
        "169.253.255.255",
        "169.255.0.0",
        "172.15.255.255",
        "172.32.0.0",
        "192.167.255.255",
        "192.169.0.0",
        "100.63.255.255",
        "100.128.0.0",
        "191.255.255.255",
        "192.0.1.0",
        "198.17.255.255",
        "198.20.0.0",
        "223.255.255.255",
    ];

    #[test]
    fn default_denies_every_closed_range() {
        let p = policy(&PolicyConfig::default());
        for &(dst, words) in CLOSED_SAMPLES {
            for port in [1, 22, 53, 443, 65535] {
                let why = deny_reason(&p, dst, port);
                assert!(why.contains(words), "{dst}: {why}");
                assert!(why.starts_with(&format!("{dst}:{port} is ")), "{why}");
                assert!(why.contains(&format!("--net-allow {dst}:{port}")), "{why}");
            }
        }
    }

    #[test]
    fn the_hosts_own_addresses_are_closed_unless_allowed() {
        let mut p = policy(&PolicyConfig::default());
        assert!(allowed(&p, "203.0.113.9", 22));
        p.set_host_addresses(&[ip("203.0.113.9"), ip("192.168.1.5"), ip("203.0.113.9")]);
        assert_eq!(
            deny_reason(&p, "203.0.113.9", 22),
            "203.0.113.9:22 is an address of this host (open it with --net-allow 203.0.113.9:22)"
        );
        // A private one keeps its range's reason.
        assert!(deny_reason(&p, "192.168.1.5", 80).contains("private 192.168.0.0/16"));
        assert!(allowed(&p, "203.0.113.10", 22), "its neighbours are the internet");
        // --net-allow opens exactly what it names.
        let mut p = policy(&allow(&["203.0.113.9:8080"]));
        p.set_host_addresses(&[ip("203.0.113.9")]);
        assert!(allowed(&p, "203.0.113.9", 8080));
        assert!(!allowed(&p, "203.0.113.9", 22));
        // Under --net-allow-only a DNS answer naming the host does not open it.
        let mut p = policy(&only(&[], &["api.example.com"]));
        p.set_host_addresses(&[ip("203.0.113.9")]);
        p.learn("api.example.com", &[ip("203.0.113.9"), ip("203.0.113.20")]);
        assert!(!allowed(&p, "203.0.113.9", 443));
        assert!(allowed(&p, "203.0.113.20", 443));
        // The list follows the host: an address it no longer has is the internet again.
        p.set_host_addresses(&[]);
        assert!(allowed(&p, "203.0.113.9", 443));
    }

    #[test]
    fn default_allows_the_public_internet() {
        let p = policy(&PolicyConfig::default());
        for &dst in PUBLIC_SAMPLES {
            for port in [1, 80, 443, 65535] {
                assert_eq!(p.check(ip(dst), port), Verdict::Allow, "{dst}:{port}");
            }
        }
        assert!(p.name_allowed("anything.example.com"));
        assert!(p.name_allowed("not a name!"));
    }

    #[test]
    fn deny_reason_wording() {
        let p = policy(&PolicyConfig::default());
        assert_eq!(
            deny_reason(&p, "127.0.0.1", 22),
            "127.0.0.1:22 is the host's loopback 127.0.0.0/8 (open it with --net-allow 127.0.0.1:22)"
        );
        let p = policy(&only(&[], &["api.anthropic.com"]));
        assert_eq!(
            deny_reason(&p, "93.184.216.34", 443),
            "93.184.216.34:443 is not in --net-allow-only"
        );
    }

    #[test]
    fn net_allow_ip_and_port_opens_exactly_that() {
        let p = policy(&allow(&["192.168.1.10:5432"]));
        assert!(allowed(&p, "192.168.1.10", 5432));
        assert!(!allowed(&p, "192.168.1.10", 22));
        assert!(!allowed(&p, "192.168.1.11", 5432));
        assert!(!allowed(&p, "10.0.0.1", 5432));
        assert!(allowed(&p, "1.1.1.1", 443));

        let p = policy(&allow(&["127.0.0.1:11434"]));
        assert!(allowed(&p, "127.0.0.1", 11434));
        assert!(!allowed(&p, "127.0.0.1", 11435));
        assert!(!allowed(&p, "127.0.0.2", 11434));

        let p = policy(&allow(&["169.254.169.254"]));
        assert!(allowed(&p, "169.254.169.254", 80));
        assert!(allowed(&p, "169.254.169.254", 1));
        assert!(!allowed(&p, "169.254.169.253", 80));
    }

    #[test]
    fn net_allow_cidr_opens_the_range() {
        let p = policy(&allow(&["10.0.0.0/8", "172.16.0.0/16:22"]));
        for dst in ["10.0.0.0", "10.1.2.3", "10.255.255.255"] {
            assert!(allowed(&p, dst, 80), "{dst}");
        }
        assert!(allowed(&p, "172.16.9.9", 22));
        assert!(!allowed(&p, "172.16.9.9", 23));
        assert!(!allowed(&p, "172.17.0.1", 22));
        assert!(!allowed(&p, "192.168.0.1", 80));
        assert!(!allowed(&p, "127.0.0.1", 80));
        assert!(allowed(&p, "93.184.216.34", 443));

        let p = policy(&allow(&["0.0.0.0/0:8080"]));
        assert!(allowed(&p, "127.0.0.1", 8080));
        assert!(!allowed(&p, "127.0.0.1", 8081));
    }

    #[test]
    fn net_allow_hostname_opens_its_addresses_once_resolved() {
        let asked = std::cell::RefCell::new(Vec::new());
        let cfg = allow(&["DB.Corp.:5432"]);
        let p = EgressPolicy::new(&cfg, |name| {
            asked.borrow_mut().push(name.to_string());
            fake_dns(name)
        })
        .unwrap();
        assert_eq!(*asked.borrow(), ["db.corp"]);
        assert!(allowed(&p, "10.1.2.3", 5432));
        assert!(allowed(&p, "10.1.2.4", 5432));
        assert!(!allowed(&p, "10.1.2.3", 22));
        assert!(!allowed(&p, "10.1.2.5", 5432));
        assert_eq!(
            p.describe(),
            "default (public internet; no loopback, link-local or private ranges) \
             plus db.corp:5432 (10.1.2.3, 10.1.2.4)"
        );

        let err = EgressPolicy::new(&allow(&["nowhere.example"]), fake_dns).unwrap_err();
        assert_eq!(
            err,
            PolicyError::Unresolved {
                spec: "nowhere.example".into(),
                name: "nowhere.example".into()
            }
        );
        assert!(err.to_string().contains("\"nowhere.example\""), "{err}");
    }

    #[test]
    fn net_allow_entries_may_hold_comma_lists() {
        let p = policy(&allow(&["10.0.0.1:1, 10.0.0.2:2,"]));
        assert!(allowed(&p, "10.0.0.1", 1));
        assert!(allowed(&p, "10.0.0.2", 2));
        assert!(!allowed(&p, "10.0.0.1", 2));
    }

    #[test]
    fn net_allow_refuses_wildcards() {
        let err = EgressPolicy::new(&allow(&["*.example.com"]), fake_dns).unwrap_err();
        assert!(matches!(err, PolicyError::WildcardInAllow { .. }));
        assert!(err.to_string().contains("--net-allow-only"), "{err}");
    }

    #[test]
    fn allow_only_names_are_allowed_once_learned() {
        let mut p = policy(&only(&[], &["api.anthropic.com"]));
        assert!(p.name_allowed("api.anthropic.com"));
        assert!(p.name_allowed("API.Anthropic.COM."));
        assert!(!p.name_allowed("anthropic.com"));
        assert!(!p.name_allowed("x.api.anthropic.com"));
        assert!(!p.name_allowed("example.com"));
        assert!(!p.name_allowed("bad_name"));

        let api = ip("160.79.104.10");
        assert!(!p.check(api, 443).is_allow());
        assert!(!allowed(&p, "1.1.1.1", 443));
        p.learn("Api.Anthropic.com.", &[api]);
        assert!(p.check(api, 443).is_allow());
        assert!(p.check(api, 80).is_allow());
        assert!(!allowed(&p, "160.79.104.11", 443));
        assert!(!allowed(&p, "1.1.1.1", 443));
        // Closed ranges keep their own reason.
        assert!(deny_reason(&p, "127.0.0.1", 22).contains("loopback"));
    }

    #[test]
    fn allow_only_learn_ignores_names_not_allowed() {
        let mut p = policy(&only(&[], &["api.anthropic.com"]));
        p.learn("evil.example.com", &[ip("93.184.216.34")]);
        p.learn("anthropic.com", &[ip("93.184.216.35")]);
        p.learn("not a name", &[ip("93.184.216.36")]);
        for dst in ["93.184.216.34", "93.184.216.35", "93.184.216.36"] {
            assert!(!allowed(&p, dst, 443), "{dst}");
        }
        assert_eq!(p.only.as_ref().unwrap().learned.len(), 0);

        // Without --net-allow-only nothing is learned (nothing needs to be).
        let mut p = policy(&PolicyConfig::default());
        p.learn("example.com", &[ip("93.184.216.34")]);
        assert!(p.only.is_none());
    }

    #[test]
    fn allow_only_never_learns_closed_ranges() {
        let mut p = policy(&only(&[], &["*.rebind.example"]));
        p.learn(
            "a.rebind.example",
            &[
                ip("127.0.0.1"),
                ip("169.254.169.254"),
                ip("10.0.0.1"),
                ip("8.8.4.4"),
            ],
        );
        assert!(!allowed(&p, "127.0.0.1", 80));
        assert!(!allowed(&p, "169.254.169.254", 80));
        assert!(!allowed(&p, "10.0.0.1", 80));
        assert!(allowed(&p, "8.8.4.4", 80));
    }

    #[test]
    fn allow_only_wildcards_match_subdomains_only() {
        let mut p = policy(&only(&[], &["*.github.com"]));
        for name in ["api.github.com", "a.b.github.com", "API.GitHub.com."] {
            assert!(p.name_allowed(name), "{name}");
        }
        for name in [
            "github.com",
            "evilgithub.com",
            "github.com.evil.org",
            "xgithub.com",
        ] {
            assert!(!p.name_allowed(name), "{name}");
        }
        p.learn("github.com", &[ip("140.82.112.3")]);
        p.learn("evilgithub.com", &[ip("140.82.112.4")]);
        p.learn("codeload.github.com", &[ip("140.82.112.9")]);
        assert!(!allowed(&p, "140.82.112.3", 443));
        assert!(!allowed(&p, "140.82.112.4", 443));
        assert!(allowed(&p, "140.82.112.9", 443));
    }

    #[test]
    fn allow_only_port_restricted_items() {
        let mut p = policy(&only(&[], &["api.example.com:443,*.cdn.example:80"]));
        p.learn("api.example.com", &[ip("93.184.216.34")]);
        assert!(allowed(&p, "93.184.216.34", 443));
        let why = deny_reason(&p, "93.184.216.34", 80);
        assert!(why.contains("not in --net-allow-only"), "{why}");
        assert!(why.contains("api.example.com:443"), "{why}");

        // The same address learned for another item adds that item's port.
        p.learn("x.cdn.example", &[ip("93.184.216.34")]);
        assert!(allowed(&p, "93.184.216.34", 443));
        assert!(allowed(&p, "93.184.216.34", 80));
        assert!(!allowed(&p, "93.184.216.34", 22));
    }

    #[test]
    fn allow_only_addresses_and_ranges() {
        let p = policy(&only(&[], &["1.1.1.1:53", "93.184.216.0/24"]));
        assert!(allowed(&p, "1.1.1.1", 53));
        assert!(!allowed(&p, "1.1.1.1", 443));
        assert!(allowed(&p, "93.184.216.34", 443));
        assert!(!allowed(&p, "93.184.217.1", 443));
        assert!(!allowed(&p, "8.8.8.8", 53));

        // A range across closed ones opens only its public part.
        let p = policy(&only(&[], &["0.0.0.0/0:443"]));
        assert!(allowed(&p, "93.184.216.34", 443));
        assert!(!allowed(&p, "93.184.216.34", 80));
        assert!(!allowed(&p, "127.0.0.1", 443));
        assert!(!allowed(&p, "10.0.0.1", 443));
    }

    #[test]
    fn allow_only_refuses_closed_ranges() {
        for spec in [
            "10.0.0.0/8",
            "127.0.0.1:22",
            "169.254.169.254",
            "192.168.1.0/24:80",
        ] {
            let err = EgressPolicy::new(&only(&[], &[spec]), fake_dns).unwrap_err();
            assert!(
                matches!(err, PolicyError::AllowOnlyClosedRange { .. }),
                "{spec}: {err}"
            );
            assert!(
                err.to_string().contains(&format!("--net-allow {spec}")),
                "{err}"
            );
        }
    }

    #[test]
    fn allow_only_lists_merge_and_net_allow_adds() {
        let cfg = only(
            &["127.0.0.1:11434", "db.corp:5432"],
            &["a.example.com, b.example.com", "1.1.1.1", "c.example.com"],
        );
        let mut p = policy(&cfg);
        for name in ["a.example.com", "b.example.com", "c.example.com", "db.corp"] {
            assert!(p.name_allowed(name), "{name}");
        }
        assert!(!p.name_allowed("d.example.com"));
        p.learn("c.example.com", &[ip("93.184.216.34")]);
        assert!(allowed(&p, "93.184.216.34", 443));
        assert!(allowed(&p, "1.1.1.1", 443));
        assert!(allowed(&p, "127.0.0.1", 11434));
        assert!(allowed(&p, "10.1.2.3", 5432));
        assert!(!allowed(&p, "127.0.0.1", 22));
        assert!(!allowed(&p, "8.8.8.8", 53));
        // learn() does not add addresses for --net-allow names.
        p.learn("db.corp", &[ip("93.184.216.99")]);
        assert!(!allowed(&p, "93.184.216.99", 5432));
        assert_eq!(
            p.describe(),
            "allow-only a.example.com, b.example.com, 1.1.1.1, c.example.com \
             plus 127.0.0.1:11434, db.corp:5432 (10.1.2.3, 10.1.2.4)"
        );
    }

    #[test]
    fn empty_allow_only_allows_nothing() {
        let p = policy(&only(&[], &[""]));
        for &dst in PUBLIC_SAMPLES {
            assert!(!allowed(&p, dst, 443), "{dst}");
        }
        assert!(!p.name_allowed("example.com"));
        assert_eq!(p.describe(), "allow-only nothing");
    }

    #[test]
    fn learned_table_is_bounded() {
        let mut p = policy(&only(&[], &["*.example.com"]));
        let addr = |i: u32| Ipv4Addr::from(u32::from(ip("20.0.0.0")) + i);
        let total = LEARNED_MAX as u32 + 1000;
        for i in 0..total {
            p.learn(&format!("h{i}.example.com"), &[addr(i)]);
            // Keep the first one fresh: re-learning it refreshes it.
            if i % 1000 == 999 {
                p.learn("h0.example.com", &[addr(0)]);
            }
        }
        assert_eq!(p.only.as_ref().unwrap().learned.len(), LEARNED_MAX);
        assert!(p.check(addr(0), 443).is_allow());
        assert!(!p.check(addr(1), 443).is_allow());
        assert!(!p.check(addr(1000), 443).is_allow());
        assert!(p.check(addr(total - 1), 443).is_allow());
        assert!(p
            .check(addr(total - LEARNED_MAX as u32 + 1), 443)
            .is_allow());
        // A single answer with more addresses than the table holds.
        let many: Vec<Ipv4Addr> = (0..2 * LEARNED_MAX as u32)
            .map(|i| addr(100_000 + i))
            .collect();
        p.learn("big.example.com", &many);
        assert_eq!(p.only.as_ref().unwrap().learned.len(), LEARNED_MAX);
        assert!(p.check(*many.last().unwrap(), 443).is_allow());
        assert!(!p.check(many[0], 443).is_allow());
    }

    #[test]
    fn describe_default() {
        assert_eq!(
            policy(&PolicyConfig::default()).describe(),
            "default (public internet; no loopback, link-local or private ranges)"
        );
        assert_eq!(
            policy(&allow(&["10.0.0.0/8", "127.0.0.1:11434"])).describe(),
            "default (public internet; no loopback, link-local or private ranges) \
             plus 10.0.0.0/8, 127.0.0.1:11434"
        );
        assert_eq!(
            policy(&only(
                &[],
                &["API.example.com.:443", "*.Example.org", "1.2.3.0/24"]
            ))
            .describe(),
            "allow-only api.example.com:443, *.example.org, 1.2.3.0/24"
        );
    }

    #[test]
    fn good_specs() {
        for spec in [
            "10.0.0.0/8",
            "10.0.0.0/8:443",
            "0.0.0.0/0",
            "1.2.3.4/32",
            "192.168.1.10:5432",
            "127.0.0.1:11434",
            "1.1.1.1:65535",
            "1.1.1.1:1",
            "localhost",
            "api.anthropic.com:443",
            "Example.COM.",
            "*.example.com",
            "*.com:443",
            "a-b.c0.example",
            "xn--bcher-kva.example",
            "a,b.example, 1.1.1.1:53",
            "",
            &format!("{}.com", "a".repeat(63)),
        ] {
            assert_eq!(validate_spec(spec), Ok(()), "{spec}");
        }
    }

    fn err(spec: &str) -> PolicyError {
        validate_spec(spec).unwrap_err()
    }

    #[test]
    fn ipv6_specs_are_refused() {
        for spec in [
            "::1",
            "[::1]:443",
            "fe80::/10",
            "2001:db8::1",
            "::ffff:127.0.0.1",
            "fe80::1%eth0",
        ] {
            let e = err(spec);
            assert_eq!(e, PolicyError::Ipv6 { spec: spec.into() });
            assert!(
                e.to_string()
                    .contains("IPv6 is not supported by aivmm's user-mode network"),
                "{e}"
            );
            assert!(e.to_string().contains(&format!("{spec:?}")), "{e}");
        }
        assert!(matches!(err("a.com:1:2"), PolicyError::Syntax { .. }));
        assert!(matches!(
            err("1:2:3:4:5:6:7:8:9"),
            PolicyError::Syntax { .. }
        ));
    }

    #[test]
    fn bad_ports() {
        for spec in [
            "1.1.1.1:0",
            "1.1.1.1:65536",
            "1.1.1.1:99999",
            "1.1.1.1:",
            "1.1.1.1:x",
            "a.com:+1",
            "a.com:-1",
            "a.com: 80",
            "10.0.0.0/8:123456",
        ] {
            let e = err(spec);
            assert!(matches!(e, PolicyError::BadPort { .. }), "{spec}: {e}");
            assert!(e.to_string().contains("1 to 65535"), "{e}");
        }
        assert!(matches!(err(":443"), PolicyError::Syntax { .. }));
    }

    #[test]
    fn bad_addresses_and_ranges() {
        for spec in [
            "300.1.1.1",
            "1.2.3",
            "1.2.3.4.5",
            "10.1",
            "2130706433",
            "010.0.0.1",
            "1.2.3.4.com.5",
        ] {
            let e = err(spec);
            assert!(matches!(e, PolicyError::BadAddress { .. }), "{spec}: {e}");
        }
        for spec in [
            "10.0.0.0/33",
            "10.0.0.0/",
            "10.0.0.0/x",
            "10.0.0.0/+8",
            "10.0.0.0/-1",
            "10.0.0.0/8/8",
        ] {
            let e = err(spec);
            assert!(matches!(e, PolicyError::BadPrefix { .. }), "{spec}: {e}");
            assert!(e.to_string().contains("0 to 32"), "{e}");
        }
        assert!(matches!(err("a.com/8"), PolicyError::BadAddress { .. }));
        let e = err("10.0.0.1/8");
        assert_eq!(
            e,
            PolicyError::HostBits {
                spec: "10.0.0.1/8".into(),
                addr: ip("10.0.0.1"),
                prefix: 8,
                network: ip("10.0.0.0"),
            }
        );
        let msg = e.to_string();
        assert!(msg.contains("host bits"), "{msg}");
        assert!(msg.contains("10.0.0.0/8"), "{msg}");
        assert!(matches!(err("192.168.1.1/0"), PolicyError::HostBits { .. }));
    }

    #[test]
    fn bad_names() {
        let long_label = format!("{}.com", "a".repeat(64));
        let long_name = format!("{}.com", vec!["a".repeat(61); 5].join("."));
        assert!(long_name.len() > 253);
        for spec in [
            "-a.com",
            "a-.com",
            "a..com",
            ".a.com",
            "a.com..",
            "a_b.com",
            "a b.com",
            "é.com",
            "*",
            "*.",
            "*.*.com",
            "a.*.com",
            "a*.com",
            "*a.com",
            long_label.as_str(),
            long_name.as_str(),
        ] {
            let e = err(spec);
            assert!(matches!(e, PolicyError::BadName { .. }), "{spec}: {e}");
            assert!(e.to_string().contains(&format!("{spec:?}")), "{e}");
        }
    }

    #[test]
    fn new_reports_bad_specs() {
        for cfg in [
            allow(&["10.0.0.1/8"]),
            only(&[], &["ok.example.com,bad_name"]),
        ] {
            assert!(EgressPolicy::new(&cfg, no_dns).is_err(), "{cfg:?}");
        }
    }

    #[test]
    fn narrowed_by_examples() {
        let trusted = only(
            &["10.0.0.0/8", "127.0.0.1:11434"],
            &["*.example.com", "api.anthropic.com"],
        );
        let workdir = only(
            &["10.0.0.0/8", "192.168.0.0/16", "127.0.0.1/32:11434"],
            &["API.Anthropic.com.", "evil.org", "a.example.com"],
        );
        let n = trusted.narrowed_by(&workdir);
        assert_eq!(n.allow, ["10.0.0.0/8", "127.0.0.1:11434"]);
        assert_eq!(n.allow_only, Some(vec!["api.anthropic.com".to_string()]));

        // No allow-only in the workdir: the trusted one stays.
        let n = trusted.narrowed_by(&PolicyConfig::default());
        assert!(n.allow.is_empty());
        assert_eq!(n.allow_only, trusted.allow_only);

        // No allow-only in the trusted policy: the workdir's is taken.
        let n = allow(&["10.0.0.0/8"]).narrowed_by(&only(&["10.0.0.0/8"], &["a.example.com"]));
        assert_eq!(n.allow, ["10.0.0.0/8"]);
        assert_eq!(n.allow_only, Some(vec!["a.example.com".to_string()]));

        // An empty intersection allows nothing.
        let n = trusted.narrowed_by(&only(&[], &["evil.org"]));
        assert_eq!(n.allow_only, Some(Vec::new()));
        assert_eq!(policy(&n).describe(), "allow-only nothing");
    }

    /// Narrowing never widens: over random trusted/workdir configs from a
    /// pool of items, every destination (after the same DNS answers) and name
    /// the narrowed policy allows, the trusted one allows too.
    #[test]
    fn narrowed_by_never_widens() {
        const POOL: &[&str] = &[
            "10.0.0.0/8",
            "10.1.0.0/16:22",
            "127.0.0.1:11434",
            "127.0.0.1",
            "192.168.1.10:5432",
            "169.254.169.254",
            "1.1.1.1",
            "1.1.1.1:53",
            "93.184.216.0/24",
            "0.0.0.0/0:443",
            "db.corp:5432",
            "mirror.example.org",
            "localhost",
            "a.example.com",
            "A.Example.com.",
            "*.example.com",
            "*.example.com:443",
            "b.example.com:80",
        ];
        const DSTS: &[&str] = &[
            "10.0.0.1",
            "10.1.2.3",
            "10.1.2.4",
            "127.0.0.1",
            "192.168.1.10",
            "169.254.169.254",
            "1.1.1.1",
            "93.184.216.34",
            "203.0.113.7",
            "8.8.8.8",
            "140.82.112.3",
            "140.82.112.4",
        ];
        const PORTS: &[u16] = &[22, 53, 80, 443, 5432, 11434];
        const NAMES: &[(&str, &str)] = &[
            ("a.example.com", "140.82.112.3"),
            ("b.example.com", "140.82.112.4"),
            ("mirror.example.org", "203.0.113.7"),
            ("db.corp", "93.184.216.34"),
            ("example.com", "8.8.8.8"),
        ];
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        fn pick(next: &mut dyn FnMut() -> u64) -> Vec<String> {
            let n = next() % 5;
            (0..n)
                .map(|_| POOL[(next() % POOL.len() as u64) as usize].to_string())
                .collect()
        }
        fn random_cfg(next: &mut dyn FnMut() -> u64) -> PolicyConfig {
            PolicyConfig {
                allow: pick(next),
                allow_only: if next() % 2 == 0 {
                    None
                } else {
                    Some(pick(next))
                },
            }
        }
        let mut compared = 0;
        for _ in 0..2000 {
            let trusted = random_cfg(&mut next);
            let workdir = random_cfg(&mut next);
            let narrowed = trusted.narrowed_by(&workdir);
            // Narrowing is idempotent and narrows the narrowed too.
            assert_eq!(
                trusted.narrowed_by(&narrowed),
                narrowed,
                "{trusted:?} / {workdir:?}"
            );
            let (Ok(mut t), Ok(mut n)) = (
                EgressPolicy::new(&trusted, fake_dns),
                EgressPolicy::new(&narrowed, fake_dns),
            ) else {
                continue;
            };
            compared += 1;
            for &(name, addr) in NAMES {
                if n.name_allowed(name) {
                    assert!(t.name_allowed(name), "{name}: {trusted:?} / {narrowed:?}");
                }
                t.learn(name, &[ip(addr)]);
                n.learn(name, &[ip(addr)]);
            }
            for &dst in DSTS {
                for &port in PORTS {
                    if allowed(&n, dst, port) {
                        assert!(
                            allowed(&t, dst, port),
                            "{dst}:{port}: trusted {trusted:?}, workdir {workdir:?}, narrowed {narrowed:?}"
                        );
                    }
                }
            }
        }
        assert!(compared > 500, "only {compared} configs compared");
    }
}
