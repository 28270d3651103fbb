//! The user-mode network's DNS server: the guest's queries answered from the
//! host's own resolver.
//!
//! Names are looked up with the host's getaddrinfo(3), so the host's
//! `/etc/hosts`, search domains, VPN split DNS and (on macOS) the system
//! resolver all apply, as they would to a program on the host. The network has
//! no IPv6, so only A records are ever answered:
//! - an A query is answered with the name's IPv4 addresses, NOERROR with no
//!   answers (NODATA) when it has only IPv6 ones, NXDOMAIN when it does not
//!   exist, SERVFAIL when the lookup fails otherwise, REFUSED when the name is
//!   not a host name;
//! - an AAAA query gets NODATA when the name resolves (NXDOMAIN, etc., when
//!   not), never an address, so the guest falls back to IPv4 at once;
//! - any other type gets NOTIMP.
//!
//! The caller's flow: [`parse_query`] the guest's UDP payload; if
//! [`Query::needs_lookup`], [`Resolver::submit`] its name with a token (or
//! answer [`Outcome::ServFail`] when that fails), else answer
//! [`Outcome::NotImp`]; when [`Resolver::as_raw_fd`] is readable,
//! [`Resolver::take_results`] and [`answer`] each query with its outcome.
//! [`answer`] applies the type rules itself: it only writes addresses into the
//! answer to an A query.
//!
//! Messages are parsed and built with `simple-dns`. A query of a type
//! `simple-dns` does not know (TLSA, SSHFP, ...) is still answered (NOTIMP):
//! its type is swapped for a known one while parsing and written back into the
//! response. Replies stay within 512 bytes (plain UDP DNS); addresses beyond
//! that are left out. Queries come from the guest, which may be hostile:
//! nothing here panics on malformed input.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::ffi::CString;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use simple_dns::header_buffer;
use simple_dns::rdata::{RData, A};
use simple_dns::{Packet, PacketFlag, ResourceRecord, CLASS, OPCODE, QCLASS, QTYPE, RCODE};

use crate::sys::{EventFd, EFD_NONBLOCK};

/// The A query type (an IPv4 address).
pub const TYPE_A: u16 = 1;
/// The AAAA query type (an IPv6 address).
pub const TYPE_AAAA: u16 = 28;

/// The largest reply: the limit of DNS over UDP without EDNS (RFC 1035 §4.2.1).
const MAX_REPLY_LEN: usize = 512;
/// Where the question starts: after the 12-byte header.
const HEADER_LEN: usize = 12;
/// A type `simple-dns` knows (NULL), standing in for one it does not while parsing.
const STAND_IN_QTYPE: u16 = 10;
/// The longest host name (RFC 1035 §2.3.4's 255 bytes on the wire, as text
/// without the trailing dot).
const MAX_HOSTNAME_LEN: usize = 253;
/// The most bytes in a label.
const MAX_LABEL_LEN: usize = 63;

/// The resolver's worker threads at most.
const MAX_WORKERS: usize = 4;
/// The lookups a [`Resolver`] holds at most: queued, in flight, or with a
/// result not yet taken.
const MAX_OUTSTANDING: usize = 64;
/// How long an idle worker thread waits for work before it exits.
const WORKER_IDLE: Duration = Duration::from_secs(30);

/// The outcome of a lookup, which decides the answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The name's IPv4 addresses (NOERROR with A records; an empty list is NODATA).
    Addresses(Vec<Ipv4Addr>),
    /// The name exists but has no address of the type asked for (NOERROR, no answers).
    NoData,
    /// The name does not exist (NXDOMAIN).
    NxDomain,
    /// The server will not answer this (REFUSED): e.g. not a host name.
    Refused,
    /// The lookup failed (SERVFAIL).
    ServFail,
    /// The query's type is not supported (NOTIMP).
    NotImp,
}

/// A guest's query, as far as the lookup needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    /// The message ID.
    pub id: u16,
    /// The name asked for: lowercase, without the trailing dot. A byte that
    /// cannot be in a host name appears as `\DDD` (its decimal value), so such
    /// a name is refused by [`resolve`].
    pub name: String,
    /// The query type (QTYPE), e.g. [`TYPE_A`].
    pub qtype: u16,
}

impl Query {
    /// Whether answering takes a lookup ([`resolve`]): A and AAAA queries do;
    /// any other type is answered [`Outcome::NotImp`] at once.
    pub fn needs_lookup(&self) -> bool {
        self.qtype == TYPE_A || self.qtype == TYPE_AAAA
    }
}

/// Parses a guest's query: a standard query (QR 0, opcode 0) with exactly one
/// question, of class IN (or ANY). `None` for anything else.
pub fn parse_query(payload: &[u8]) -> Option<Query> {
    let prepared = Prepared::new(payload)?;
    let packet = prepared.parse()?;
    let question = packet.questions.first()?;
    Some(Query {
        id: packet.id(),
        name: presentation_name(question.qname.as_bytes()),
        qtype: prepared.qtype,
    })
}

/// Builds the response to `query_payload` (which [`parse_query`] accepts, else
/// `None`): its ID, its question, QR and RA set, RD copied, and:
/// - A records (with `ttl`) for [`Outcome::Addresses`] to an A query; NODATA
///   for them to an AAAA query (the network has no IPv6), NOTIMP to any other
///   query type;
/// - NOERROR without answers for [`Outcome::NoData`] (and an empty address list);
/// - the RCODE NXDOMAIN, REFUSED, SERVFAIL or NOTIMP for the rest.
pub fn answer(query_payload: &[u8], outcome: &Outcome, ttl: u32) -> Option<Vec<u8>> {
    let prepared = Prepared::new(query_payload)?;
    let query = prepared.parse()?;
    let question = query.questions.first()?;

    let addresses: &[Ipv4Addr] = match (prepared.qtype, outcome) {
        (TYPE_A, Outcome::Addresses(a)) => a,
        _ => &[],
    };
    let rcode = match (prepared.qtype, outcome) {
        (TYPE_A | TYPE_AAAA, Outcome::Addresses(_)) | (_, Outcome::NoData) => RCODE::NoError,
        (_, Outcome::Addresses(_)) | (_, Outcome::NotImp) => RCODE::NotImplemented,
        (_, Outcome::NxDomain) => RCODE::NameError,
        (_, Outcome::Refused) => RCODE::Refused,
        (_, Outcome::ServFail) => RCODE::ServerFailure,
    };

    let mut reply = Packet::new_reply(query.id());
    reply.set_flags(PacketFlag::RECURSION_AVAILABLE);
    if query.has_flags(PacketFlag::RECURSION_DESIRED) {
        reply.set_flags(PacketFlag::RECURSION_DESIRED);
    }
    *reply.rcode_mut() = rcode;
    reply.questions.push(question.clone());

    // Each answer takes 16 bytes (its name a pointer to the question's):
    // start from the count that fits, and check.
    let base = HEADER_LEN
        + question
            .qname
            .as_bytes()
            .map(|l| l.len() + 1)
            .sum::<usize>()
        + 5;
    let mut count = addresses.len().min(MAX_REPLY_LEN.saturating_sub(base) / 16);
    loop {
        reply.answers = addresses[..count]
            .iter()
            .map(|a| {
                ResourceRecord::new(
                    question.qname.clone(),
                    CLASS::IN,
                    ttl,
                    RData::A(A::from(*a)),
                )
            })
            .collect();
        let mut out = reply.build_bytes_vec_compressed().ok()?;
        if out.len() <= MAX_REPLY_LEN || count == 0 {
            prepared.restore_qtype(&mut out);
            return Some(out);
        }
        count -= 1;
    }
}

/// A query's bytes made parseable by `simple-dns`, with its real type.
struct Prepared<'a> {
    /// The query, its QTYPE replaced by [`STAND_IN_QTYPE`] when `simple-dns`
    /// does not know it.
    bytes: Cow<'a, [u8]>,
    /// The real QTYPE.
    qtype: u16,
    /// Where the QTYPE is (in the query, and in a response that starts with
    /// the same header and question) when it was replaced.
    replaced_at: Option<usize>,
}

impl<'a> Prepared<'a> {
    fn new(payload: &'a [u8]) -> Option<Self> {
        // header_buffer's accessors index without checking the length.
        if payload.len() < HEADER_LEN || header_buffer::questions(payload).ok()? != 1 {
            return None;
        }
        let at = question_name_end(payload)?;
        let raw = payload.get(at..at + 2)?;
        let qtype = u16::from_be_bytes([raw[0], raw[1]]);
        if QTYPE::try_from(qtype).is_ok() {
            return Some(Self {
                bytes: Cow::Borrowed(payload),
                qtype,
                replaced_at: None,
            });
        }
        let mut bytes = payload.to_vec();
        bytes
            .get_mut(at..at + 2)?
            .copy_from_slice(&STAND_IN_QTYPE.to_be_bytes());
        Some(Self {
            bytes: Cow::Owned(bytes),
            qtype,
            replaced_at: Some(at),
        })
    }

    /// The query, if it is one this server answers.
    fn parse(&self) -> Option<Packet<'_>> {
        let packet = Packet::parse(&self.bytes).ok()?;
        if packet.has_flags(PacketFlag::RESPONSE)
            || packet.opcode() != OPCODE::StandardQuery
            || packet.questions.len() != 1
        {
            return None;
        }
        match packet.questions.first()?.qclass {
            QCLASS::CLASS(CLASS::IN) | QCLASS::ANY => Some(packet),
            _ => None,
        }
    }

    /// Writes the real QTYPE back into a response built from the parsed query.
    fn restore_qtype(&self, response: &mut [u8]) {
        if let Some(at) = self.replaced_at {
            if let Some(field) = response.get_mut(at..at + 2) {
                field.copy_from_slice(&self.qtype.to_be_bytes());
            }
        }
    }
}

/// Where the first question's name ends (its QTYPE starts), for a name
/// written in full (a query's first name has nothing earlier to point to).
fn question_name_end(payload: &[u8]) -> Option<usize> {
    let mut at = HEADER_LEN;
    loop {
        let len = usize::from(*payload.get(at)?);
        at += 1;
        if len == 0 {
            return Some(at);
        }
        if len > MAX_LABEL_LEN {
            // A compression pointer or a reserved label type.
            return None;
        }
        at += len;
    }
}

/// A name's labels as text: lowercase, dot-separated, no trailing dot; any
/// byte but a letter, digit, `-` or `_` as `\DDD`.
fn presentation_name<'b>(labels: impl Iterator<Item = &'b [u8]>) -> String {
    let mut name = String::new();
    for (i, label) in labels.enumerate() {
        if i > 0 {
            name.push('.');
        }
        for &b in label {
            if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
                name.push(char::from(b.to_ascii_lowercase()));
            } else {
                name.push_str(&format!("\\{b:03}"));
            }
        }
    }
    name
}

/// Whether `name` is a host name worth a lookup: 1 to 253 bytes of labels of
/// 1 to 63 letters, digits, `-` (not first or last) and `_`, separated by
/// single dots, the last not all digits (which would be an address literal).
fn is_hostname(name: &str) -> bool {
    if name.is_empty() || name.len() > MAX_HOSTNAME_LEN {
        return false;
    }
    let labels_ok = name.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= MAX_LABEL_LEN
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    });
    let last_numeric = name
        .rsplit('.')
        .next()
        .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()));
    labels_ok && !last_numeric
}

/// Looks `name` up with the host's getaddrinfo(3) and blocks until it is done:
/// its IPv4 addresses in the resolver's order without repeats, `NoData` when
/// it has only IPv6 addresses (or the lookup says it has none), `NxDomain`
/// when it does not exist, `ServFail` when the lookup fails otherwise, and
/// `Refused` (without a lookup) when `name` is not a host name.
pub fn resolve(name: &str) -> Outcome {
    if !is_hostname(name) {
        return Outcome::Refused;
    }
    let Ok(c_name) = CString::new(name) else {
        return Outcome::Refused;
    };
    let hints = libc::addrinfo {
        ai_flags: 0,
        ai_family: libc::AF_UNSPEC,
        // One entry per address rather than one per socket type.
        ai_socktype: libc::SOCK_STREAM,
        ai_protocol: 0,
        ai_addrlen: 0,
        ai_addr: std::ptr::null_mut(),
        ai_canonname: std::ptr::null_mut(),
        ai_next: std::ptr::null_mut(),
    };
    let mut list: *mut libc::addrinfo = std::ptr::null_mut();
    // SAFETY: `c_name` is a NUL-terminated string and `hints` an initialized
    // addrinfo, both alive for the call; `list` is a valid place for the result.
    let rc = unsafe { libc::getaddrinfo(c_name.as_ptr(), std::ptr::null(), &hints, &mut list) };
    if rc != 0 {
        return gai_error_outcome(rc);
    }
    let mut addresses = Vec::new();
    let mut entry = list.cast_const();
    while !entry.is_null() {
        // SAFETY: `entry` is a non-null node of the list getaddrinfo returned,
        // which stays valid until freeaddrinfo below.
        let ai = unsafe { &*entry };
        let len_ok = usize::try_from(ai.ai_addrlen)
            .is_ok_and(|l| l >= std::mem::size_of::<libc::sockaddr_in>());
        if ai.ai_family == libc::AF_INET && !ai.ai_addr.is_null() && len_ok {
            // SAFETY: an AF_INET entry's ai_addr points to a sockaddr_in of
            // ai_addrlen bytes (checked above); read_unaligned needs no alignment.
            let sin = unsafe { std::ptr::read_unaligned(ai.ai_addr.cast::<libc::sockaddr_in>()) };
            let address = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            if !addresses.contains(&address) {
                addresses.push(address);
            }
        }
        entry = ai.ai_next.cast_const();
    }
    // SAFETY: `list` came from a successful getaddrinfo and is freed once;
    // `ai` (borrowed from it) is not used after this.
    unsafe { libc::freeaddrinfo(list) };
    if addresses.is_empty() {
        Outcome::NoData
    } else {
        Outcome::Addresses(addresses)
    }
}

/// The outcome of a getaddrinfo(3) error.
fn gai_error_outcome(code: libc::c_int) -> Outcome {
    match code {
        libc::EAI_NONAME => Outcome::NxDomain,
        libc::EAI_NODATA => Outcome::NoData,
        _ => Outcome::ServFail,
    }
}

/// Runs [`resolve`] off the caller's thread, on up to 4 worker threads
/// started as lookups come and ended after 30 s without any.
///
/// Results are collected with [`Resolver::take_results`] when the notifier
/// ([`Resolver::as_raw_fd`]) is readable. On drop, queued lookups are
/// discarded and the workers exit; one in the middle of a getaddrinfo call
/// finishes it first (it cannot be interrupted), then exits.
pub struct Resolver {
    shared: Arc<Shared>,
}

/// What the [`Resolver`] and its workers share.
struct Shared {
    state: Mutex<State>,
    /// Signalled when work is queued or the resolver is dropped.
    work: Condvar,
    results: Mutex<Vec<(u64, Outcome)>>,
    /// Written when a result is added; read (reset) when results are taken.
    notify: EventFd,
}

/// The work queue and the workers' bookkeeping.
#[derive(Default)]
struct State {
    queue: VecDeque<(u64, String)>,
    /// Lookups queued, in flight or with a result not yet taken.
    outstanding: usize,
    /// Worker threads running.
    workers: usize,
    /// Workers waiting for work.
    idle: usize,
    /// The resolver was dropped: workers exit.
    closed: bool,
}

/// Locks `m`, also after a panic elsewhere while it was locked (the data
/// stays consistent: every update is a single step).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Resolver {
    /// A resolver with no lookups (and no threads yet).
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                work: Condvar::new(),
                results: Mutex::new(Vec::new()),
                notify: EventFd::new(EFD_NONBLOCK)?,
            }),
        })
    }

    /// Queues a lookup of `name` whose result comes back with `token`. False,
    /// and nothing queued, when 64 lookups are already queued, in flight or
    /// waiting to be taken (or no worker thread could be started): the caller
    /// answers SERVFAIL.
    pub fn submit(&self, token: u64, name: String) -> bool {
        let mut st = lock(&self.shared.state);
        if st.closed || st.outstanding >= MAX_OUTSTANDING {
            return false;
        }
        st.queue.push_back((token, name));
        if st.queue.len() > st.idle && st.workers < MAX_WORKERS {
            let shared = Arc::clone(&self.shared);
            let spawned = std::thread::Builder::new()
                .name("aivmm-dns".into())
                .spawn(move || worker(&shared));
            match spawned {
                Ok(_) => st.workers += 1,
                Err(e) if st.workers == 0 => {
                    log::warn!("usernet DNS: cannot start a resolver thread: {e}");
                    st.queue.pop_back();
                    return false;
                }
                // The running workers will get to it.
                Err(_) => {}
            }
        }
        st.outstanding += 1;
        drop(st);
        self.shared.work.notify_one();
        true
    }

    /// The notifier: readable while results are waiting. Taking them
    /// ([`Resolver::take_results`]) resets it; reading it (`read()` on the
    /// [`EventFd`]) does too, before taking them, never after.
    pub fn as_raw_fd(&self) -> RawFd {
        self.shared.notify.as_raw_fd()
    }

    /// The lookups finished since the last call: `(token, outcome)` in the
    /// order they finished. Resets the notifier.
    pub fn take_results(&self) -> Vec<(u64, Outcome)> {
        let taken = {
            let mut results = lock(&self.shared.results);
            // Under the lock, so no result's notification is lost: nothing
            // pending is the non-blocking read's WouldBlock.
            let _ = self.shared.notify.read();
            std::mem::take(&mut *results)
        };
        if !taken.is_empty() {
            let mut st = lock(&self.shared.state);
            st.outstanding = st.outstanding.saturating_sub(taken.len());
        }
        taken
    }
}

impl Drop for Resolver {
    fn drop(&mut self) {
        let mut st = lock(&self.shared.state);
        st.closed = true;
        st.queue.clear();
        drop(st);
        self.shared.work.notify_all();
    }
}

/// A worker thread: takes lookups off the queue until the resolver is
/// dropped or none comes for [`WORKER_IDLE`].
fn worker(shared: &Shared) {
    let mut st = lock(&shared.state);
    loop {
        if st.closed {
            break;
        }
        if let Some((token, name)) = st.queue.pop_front() {
            drop(st);
            let outcome = resolve(&name);
            {
                let mut results = lock(&shared.results);
                results.push((token, outcome));
                if let Err(e) = shared.notify.write(1) {
                    log::warn!("usernet DNS: cannot signal a result: {e}");
                }
            }
            st = lock(&shared.state);
            continue;
        }
        st.idle += 1;
        let (guard, timeout) = shared
            .work
            .wait_timeout(st, WORKER_IDLE)
            .unwrap_or_else(|e| e.into_inner());
        st = guard;
        st.idle -= 1;
        if timeout.timed_out() && st.queue.is_empty() {
            break;
        }
    }
    st.workers -= 1;
}

#[cfg(test)]
mod tests {
    use super::*;
    use simple_dns::{Name, Question, TYPE};
    use std::time::Instant;

    fn query(id: u16, name: &str, qtype: TYPE, rd: bool) -> Vec<u8> {
        let mut q = Packet::new_query(id);
        if rd {
            q.set_flags(PacketFlag::RECURSION_DESIRED);
        }
        q.questions.push(Question::new(
            Name::new_unchecked(name),
            qtype.into(),
            CLASS::IN.into(),
            false,
        ));
        q.build_bytes_vec().expect("build query")
    }

    fn a_records<'a>(answers: &'a [ResourceRecord<'a>]) -> Vec<Ipv4Addr> {
        answers
            .iter()
            .map(|rr| match &rr.rdata {
                RData::A(a) => Ipv4Addr::from(a.address),
                other => panic!("not an A record: {other:?}"),
            })
            .collect()
    }

    #[test]
    fn parses_a_query() {
        let q = query(0xbeef, "Example.COM", TYPE::A, true);
        let parsed = parse_query(&q).expect("query");
        assert_eq!(
            parsed,
            Query {
                id: 0xbeef,
                name: "example.com".into(),
                qtype: TYPE_A
            }
        );
        assert!(parsed.needs_lookup());
        let aaaa = parse_query(&query(1, "x.org", TYPE::AAAA, true)).expect("query");
        assert_eq!(aaaa.qtype, TYPE_AAAA);
        assert!(aaaa.needs_lookup());
        let mx = parse_query(&query(1, "x.org", TYPE::MX, true)).expect("query");
        assert_eq!(mx.qtype, 15);
        assert!(!mx.needs_lookup());
    }

    #[test]
    fn rejects_what_is_not_one_standard_query() {
        // A response.
        let mut r = Packet::new_reply(5);
        r.questions.push(Question::new(
            Name::new_unchecked("a.b"),
            TYPE::A.into(),
            CLASS::IN.into(),
            false,
        ));
        let r = r.build_bytes_vec().expect("build");
        assert_eq!(parse_query(&r), None);
        assert_eq!(answer(&r, &Outcome::NxDomain, 0), None);
        // Two questions, and none.
        let mut q = Packet::new_query(5);
        for _ in 0..2 {
            q.questions.push(Question::new(
                Name::new_unchecked("a.b"),
                TYPE::A.into(),
                CLASS::IN.into(),
                false,
            ));
        }
        assert_eq!(parse_query(&q.build_bytes_vec().expect("build")), None);
        assert_eq!(
            parse_query(&Packet::new_query(5).build_bytes_vec().expect("build")),
            None
        );
        // Another opcode (STATUS).
        let mut q = Packet::new_query(5);
        *q.opcode_mut() = OPCODE::ServerStatusRequest;
        q.questions.push(Question::new(
            Name::new_unchecked("a.b"),
            TYPE::A.into(),
            CLASS::IN.into(),
            false,
        ));
        assert_eq!(parse_query(&q.build_bytes_vec().expect("build")), None);
        // Class CH.
        let mut q = Packet::new_query(5);
        q.questions.push(Question::new(
            Name::new_unchecked("version.bind"),
            TYPE::TXT.into(),
            CLASS::CH.into(),
            false,
        ));
        assert_eq!(parse_query(&q.build_bytes_vec().expect("build")), None);
    }

    #[test]
    fn odd_bytes_in_names_are_escaped() {
        let mut q = query(1, "axb.cd", TYPE::A, true);
        q[HEADER_LEN + 2] = b'.'; // "a.b" as one label
        q[HEADER_LEN + 5] = 0xc3; // "\195d"
        let parsed = parse_query(&q).expect("query");
        assert_eq!(parsed.name, "a\\046b.\\195d");
        assert_eq!(resolve(&parsed.name), Outcome::Refused);
        // The root.
        let root = parse_query(&query(1, "", TYPE::A, true)).expect("query");
        assert_eq!(root.name, "");
        assert_eq!(resolve(&root.name), Outcome::Refused);
    }

    #[test]
    fn answers_a_query_with_addresses() {
        let q = query(0x4242, "Host.Example", TYPE::A, true);
        let addrs = vec![Ipv4Addr::new(192, 0, 2, 1), Ipv4Addr::new(192, 0, 2, 2)];
        let out = answer(&q, &Outcome::Addresses(addrs.clone()), 300).expect("answer");
        let p = Packet::parse(&out).expect("response parses");
        assert_eq!(p.id(), 0x4242);
        assert!(p.has_flags(
            PacketFlag::RESPONSE | PacketFlag::RECURSION_AVAILABLE | PacketFlag::RECURSION_DESIRED
        ));
        assert!(!p.has_flags(PacketFlag::TRUNCATION));
        assert_eq!(p.opcode(), OPCODE::StandardQuery);
        assert_eq!(p.rcode(), RCODE::NoError);
        assert_eq!(p.questions.len(), 1);
        // The question is echoed as asked, case included.
        assert_eq!(p.questions[0].qname.to_string(), "Host.Example");
        assert_eq!(p.questions[0].qtype, QTYPE::TYPE(TYPE::A));
        assert_eq!(p.questions[0].qclass, QCLASS::CLASS(CLASS::IN));
        assert_eq!(a_records(&p.answers), addrs);
        for rr in &p.answers {
            assert_eq!(rr.name.to_string(), "Host.Example");
            assert_eq!(rr.ttl, 300);
            assert_eq!(rr.class, CLASS::IN);
        }
        assert!(p.name_servers.is_empty() && p.additional_records.is_empty());
        // Exact layout: the answers point at the question's name.
        let question_end = HEADER_LEN + "Host.Example".len() + 2 + 4;
        assert_eq!(out.len(), question_end + 2 * 16);
        assert_eq!(&out[question_end..question_end + 2], &[0xc0, 12]);
    }

    #[test]
    fn rd_is_copied_only_when_set() {
        let q = query(7, "a.example", TYPE::A, false);
        let out = answer(&q, &Outcome::NxDomain, 0).expect("answer");
        let p = Packet::parse(&out).expect("parses");
        assert!(p.has_flags(PacketFlag::RESPONSE | PacketFlag::RECURSION_AVAILABLE));
        assert!(!p.has_flags(PacketFlag::RECURSION_DESIRED));
        assert_eq!(p.rcode(), RCODE::NameError);
    }

    #[test]
    fn rcodes() {
        let q = query(9, "a.example", TYPE::A, true);
        for (outcome, rcode) in [
            (Outcome::NoData, RCODE::NoError),
            (Outcome::Addresses(vec![]), RCODE::NoError),
            (Outcome::NxDomain, RCODE::NameError),
            (Outcome::Refused, RCODE::Refused),
            (Outcome::ServFail, RCODE::ServerFailure),
            (Outcome::NotImp, RCODE::NotImplemented),
        ] {
            let out = answer(&q, &outcome, 60).expect("answer");
            let p = Packet::parse(&out).expect("parses");
            assert_eq!(p.rcode(), rcode, "{outcome:?}");
            assert!(p.answers.is_empty());
            assert_eq!(p.questions.len(), 1);
            assert_eq!(p.id(), 9);
        }
    }

    #[test]
    fn aaaa_never_gets_an_address() {
        let q = query(3, "a.example", TYPE::AAAA, true);
        let out = answer(&q, &Outcome::Addresses(vec![Ipv4Addr::LOCALHOST]), 60).expect("answer");
        let p = Packet::parse(&out).expect("parses");
        assert_eq!(p.rcode(), RCODE::NoError);
        assert!(p.answers.is_empty());
        assert_eq!(p.questions[0].qtype, QTYPE::TYPE(TYPE::AAAA));
        let out = answer(&q, &Outcome::NxDomain, 60).expect("answer");
        assert_eq!(
            Packet::parse(&out).expect("parses").rcode(),
            RCODE::NameError
        );
        // Any other type with addresses is NOTIMP.
        let q = query(3, "a.example", TYPE::MX, true);
        let out = answer(&q, &Outcome::Addresses(vec![Ipv4Addr::LOCALHOST]), 60).expect("answer");
        let p = Packet::parse(&out).expect("parses");
        assert_eq!(p.rcode(), RCODE::NotImplemented);
        assert!(p.answers.is_empty());
    }

    #[test]
    fn unknown_query_type_is_answered_notimp_with_its_type() {
        // TLSA (52), which simple-dns does not know.
        let mut q = query(11, "_443._tcp.a.example", TYPE::NULL, true);
        let at = question_name_end(&q).expect("name end");
        q[at..at + 2].copy_from_slice(&52u16.to_be_bytes());
        let parsed = parse_query(&q).expect("query");
        assert_eq!(parsed.qtype, 52);
        assert!(!parsed.needs_lookup());
        let out = answer(&q, &Outcome::NotImp, 0).expect("answer");
        assert_eq!(&out[..2], &11u16.to_be_bytes());
        assert_eq!(
            header_buffer::rcode(&out).expect("rcode"),
            RCODE::NotImplemented
        );
        assert!(header_buffer::has_flags(&out, PacketFlag::RESPONSE).expect("flags"));
        // The question is the query's, byte for byte.
        assert_eq!(&out[HEADER_LEN..], &q[HEADER_LEN..]);
    }

    #[test]
    fn long_answers_stay_within_512_bytes() {
        let name = format!(
            "{}.{}.{}.example",
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63)
        );
        let q = query(1, &name, TYPE::A, true);
        let addrs: Vec<Ipv4Addr> = (0..100u8).map(|i| Ipv4Addr::new(10, 1, 0, i)).collect();
        let out = answer(&q, &Outcome::Addresses(addrs.clone()), 5).expect("answer");
        assert!(out.len() <= MAX_REPLY_LEN, "{}", out.len());
        let p = Packet::parse(&out).expect("parses");
        let got = a_records(&p.answers);
        assert!(!got.is_empty() && got.len() < addrs.len());
        assert_eq!(got[..], addrs[..got.len()]);
        assert!(
            out.len() + 16 > MAX_REPLY_LEN,
            "as many as fit: {}",
            got.len()
        );
    }

    #[test]
    fn hostnames() {
        for ok in [
            "localhost",
            "a.b",
            "my_host.example",
            "x-1.y2.com",
            "xn--bcher-kva.example",
            "1.2.3.com",
        ] {
            assert!(is_hostname(ok), "{ok}");
        }
        let long_label = "a".repeat(64);
        let long_name = ["a"; 128].join(".");
        for bad in [
            "",
            ".",
            "a..b",
            "a.",
            ".a",
            "-a.b",
            "a-.b",
            "a b",
            "a\0b",
            "a/b",
            "1.2.3.4",
            "127.1",
            long_label.as_str(),
            long_name.as_str(),
            "a\\046b",
            "\u{e9}.fr",
        ] {
            assert!(!is_hostname(bad), "{bad:?}");
            assert_eq!(resolve(bad), Outcome::Refused, "{bad:?}");
        }
    }

    #[test]
    fn gai_errors() {
        assert_eq!(gai_error_outcome(libc::EAI_NONAME), Outcome::NxDomain);
        assert_eq!(gai_error_outcome(libc::EAI_NODATA), Outcome::NoData);
        assert_eq!(gai_error_outcome(libc::EAI_AGAIN), Outcome::ServFail);
        assert_eq!(gai_error_outcome(libc::EAI_FAIL), Outcome::ServFail);
    }

    #[test]
    fn resolves_localhost() {
        match resolve("localhost") {
            Outcome::Addresses(a) => {
                assert!(a.contains(&Ipv4Addr::LOCALHOST), "{a:?}");
                assert!(
                    a.iter().all(|x| a.iter().filter(|y| *y == x).count() == 1),
                    "deduplicated: {a:?}"
                );
            }
            other => panic!("localhost: {other:?}"),
        }
    }

    #[test]
    fn invalid_tld_is_nxdomain() {
        match resolve("name.invalid") {
            Outcome::NxDomain => {}
            // A host without a reachable DNS server says EAI_AGAIN.
            Outcome::ServFail => {
                eprintln!("name.invalid: SERVFAIL: the host's resolver is unreachable")
            }
            other => panic!("name.invalid: {other:?}"),
        }
    }

    /// Waits for `fd` to be readable, up to `timeout`.
    fn readable(fd: RawFd, timeout: Duration) -> bool {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: one live pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut p, 1, ms) };
        n > 0 && p.revents & libc::POLLIN != 0
    }

    #[test]
    fn resolver_returns_results_by_token() {
        let r = Resolver::new().expect("resolver");
        assert!(!readable(r.as_raw_fd(), Duration::ZERO));
        assert!(r.take_results().is_empty());
        assert!(r.submit(1, "localhost".into()));
        assert!(r.submit(2, "not a name".into()));
        assert!(r.submit(3, "localhost".into()));
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut got = Vec::new();
        while got.len() < 3 && Instant::now() < deadline {
            assert!(
                readable(r.as_raw_fd(), Duration::from_secs(30)),
                "notifier never readable"
            );
            got.extend(r.take_results());
        }
        got.sort_by_key(|(t, _)| *t);
        assert_eq!(got.len(), 3, "{got:?}");
        assert!(
            matches!(&got[0], (1, Outcome::Addresses(a)) if a.contains(&Ipv4Addr::LOCALHOST)),
            "{got:?}"
        );
        assert_eq!(got[1], (2, Outcome::Refused));
        assert!(matches!(&got[2], (3, Outcome::Addresses(_))), "{got:?}");
        assert!(
            !readable(r.as_raw_fd(), Duration::ZERO),
            "taking the results resets it"
        );
        assert_eq!(lock(&r.shared.state).outstanding, 0);
    }

    #[test]
    fn resolver_bounds_outstanding_lookups() {
        let r = Resolver::new().expect("resolver");
        // Refused names take no lookup: they finish at once but count until taken.
        for token in 0..MAX_OUTSTANDING as u64 {
            assert!(r.submit(token, "-".into()), "{token}");
        }
        assert!(!r.submit(999, "-".into()), "65th refused");
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while got.len() < MAX_OUTSTANDING && Instant::now() < deadline {
            readable(r.as_raw_fd(), Duration::from_secs(1));
            got.extend(r.take_results());
        }
        assert_eq!(got.len(), MAX_OUTSTANDING);
        assert!(got.iter().all(|(_, o)| *o == Outcome::Refused));
        assert!(lock(&r.shared.state).workers <= MAX_WORKERS);
        assert!(r.submit(1000, "-".into()), "room again");
    }

    #[test]
    fn resolver_threads_exit_on_drop() {
        let r = Resolver::new().expect("resolver");
        for token in 0..8 {
            assert!(r.submit(token, "localhost".into()));
        }
        let shared = Arc::clone(&r.shared);
        assert!(lock(&shared.state).workers >= 1);
        drop(r);
        // Each worker holds a reference until it exits.
        let deadline = Instant::now() + Duration::from_secs(30);
        while Arc::strong_count(&shared) > 1 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(Arc::strong_count(&shared), 1, "workers still running");
        let st = lock(&shared.state);
        assert_eq!(st.workers, 0);
        assert!(st.queue.is_empty());
    }

    /// A query with an EDNS OPT record carrying a cookie, as dig sends.
    fn edns_query(id: u16, name: &str, qtype: TYPE) -> Vec<u8> {
        let mut q = Packet::new_query(id);
        q.set_flags(PacketFlag::RECURSION_DESIRED);
        q.questions.push(Question::new(
            Name::new_unchecked(name),
            qtype.into(),
            CLASS::IN.into(),
            false,
        ));
        *q.opt_mut() = Some(simple_dns::rdata::OPT {
            opt_codes: vec![simple_dns::rdata::OPTCode {
                code: 10,
                data: Cow::Borrowed(&[7u8; 8]),
            }],
            udp_packet_size: 1232,
            version: 0,
        });
        q.build_bytes_vec().expect("build query")
    }

    #[test]
    fn edns_query_is_answered() {
        let q = edns_query(0x5151, "a.example", TYPE::A);
        let parsed = parse_query(&q).expect("query");
        assert_eq!(parsed.name, "a.example");
        let out = answer(
            &q,
            &Outcome::Addresses(vec![Ipv4Addr::new(192, 0, 2, 9)]),
            30,
        )
        .expect("answer");
        let p = Packet::parse(&out).expect("parses");
        assert_eq!(p.id(), 0x5151);
        assert_eq!(p.rcode(), RCODE::NoError);
        assert_eq!(a_records(&p.answers), vec![Ipv4Addr::new(192, 0, 2, 9)]);
        // Answered as a server without EDNS: no OPT record.
        assert!(p.opt().is_none());
    }

    /// xorshift64: deterministic noise without a dependency.
    fn next(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    #[test]
    fn truncated_and_corrupted_queries_never_panic() {
        let plain = query(0x1111, "www.some-host.example", TYPE::A, true);
        let edns = edns_query(0x2222, "Mixed.Case.example", TYPE::AAAA);
        for good in [&plain, &edns] {
            for len in 0..good.len() {
                assert_eq!(parse_query(&good[..len]), None, "truncated to {len}");
                assert_eq!(answer(&good[..len], &Outcome::NoData, 1), None);
            }
            assert!(parse_query(good).is_some());
        }
        let addrs = Outcome::Addresses(vec![Ipv4Addr::new(10, 0, 0, 1)]);
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for round in 0..30000 {
            let r = next(&mut seed);
            let buf: Vec<u8> = match round % 4 {
                // Noise.
                0 => (0..r % 80).map(|_| next(&mut seed) as u8).collect(),
                // A query header (one question, maybe records) before noise.
                1 => {
                    let mut b = vec![
                        0x12,
                        0x34,
                        0x01,
                        0x00,
                        0,
                        1,
                        0,
                        0,
                        0,
                        0,
                        0,
                        (r >> 8) as u8 % 3,
                    ];
                    b.extend((0..r % 90).map(|_| {
                        let v = next(&mut seed);
                        // Mostly short label lengths and letters.
                        if v % 3 == 0 {
                            (v >> 8) as u8 % 8
                        } else {
                            (v >> 8) as u8
                        }
                    }));
                    b
                }
                // A real query with a few bytes changed, maybe cut short.
                _ => {
                    let mut b = if round % 4 == 2 {
                        plain.clone()
                    } else {
                        edns.clone()
                    };
                    if r % 5 == 0 {
                        b.extend((0..r % 40).map(|_| next(&mut seed) as u8));
                    }
                    for _ in 0..1 + (r >> 40) % 4 {
                        let at = (next(&mut seed) as usize) % b.len();
                        b[at] = next(&mut seed) as u8;
                    }
                    if r % 7 == 0 {
                        let keep = b.len() / 2 + (next(&mut seed) as usize) % (b.len() / 2);
                        b.truncate(keep);
                    }
                    b
                }
            };
            let parsed = parse_query(&buf);
            let out = answer(&buf, &addrs, 1);
            assert_eq!(parsed.is_some(), out.is_some());
            if let (Some(q), Some(out)) = (parsed, out) {
                assert!(out.len() <= MAX_REPLY_LEN);
                assert_eq!(&out[..2], &q.id.to_be_bytes());
                if QTYPE::try_from(q.qtype).is_ok() {
                    let p = Packet::parse(&out).expect("responses parse");
                    assert_eq!(p.id(), q.id);
                    assert!(p.has_flags(PacketFlag::RESPONSE));
                    assert_eq!(p.answers.len(), usize::from(q.qtype == TYPE_A));
                }
            }
        }
    }
}
