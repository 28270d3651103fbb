//! The user-mode network's DHCPv4 server: it hands the one guest its fixed
//! address and the network's settings.
//!
//! There is one guest and one address to give ([`DhcpConfig::guest_ip`]), so
//! the server keeps no lease table: every client hardware address is offered
//! that address, and a request for it is acknowledged (RFC 2131 §4.3):
//! - DHCPDISCOVER gets a DHCPOFFER;
//! - DHCPREQUEST gets a DHCPACK when the address it asks for (the requested
//!   IP address option, else `ciaddr`, as in the RENEWING and REBINDING states)
//!   is the guest's, a DHCPNAK otherwise, and no answer when its server
//!   identifier names another server (the client chose that server's offer);
//! - DHCPINFORM gets a DHCPACK with the settings but no address or lease;
//! - DHCPDECLINE, DHCPRELEASE, BOOTREPLY messages, non-Ethernet hardware and
//!   anything that does not parse get no answer.
//!
//! The replies carry the subnet mask, router, DNS server, broadcast address,
//! lease time, renewal (T1) and rebinding (T2) times, the server identifier
//! (the gateway), the interface MTU (option 26, which `udhcpc -O mtu` and
//! systemd-networkd apply) and, per RFC 6842, the client identifier the client
//! sent.
//!
//! Requests are parsed with smoltcp's [`DhcpPacket`] accessors rather than
//! [`DhcpRepr::parse`], which rejects a 7-byte client identifier whose type is
//! not Ethernet; replies are emitted with [`DhcpRepr`]. Requests come from the
//! guest, which may be hostile: every length is checked before use and nothing
//! here panics on malformed input.

use std::net::Ipv4Addr;

use smoltcp::wire::{
    ArpHardware, DhcpMessageType, DhcpOpCode, DhcpOption, DhcpPacket, DhcpRepr, EthernetAddress,
};

/// The DHCP magic cookie (RFC 2131 §3).
const MAGIC_COOKIE: u32 = 0x6382_5363;
/// Option 6: domain name servers.
const OPT_DNS: u8 = 6;
/// Option 26: interface MTU.
const OPT_INTERFACE_MTU: u8 = 26;
/// Option 28: broadcast address.
const OPT_BROADCAST_ADDRESS: u8 = 28;
/// Option 50: requested IP address.
const OPT_REQUESTED_IP: u8 = 50;
/// Option 53: DHCP message type.
const OPT_MESSAGE_TYPE: u8 = 53;
/// Option 54: server identifier.
const OPT_SERVER_ID: u8 = 54;
/// Option 56: message (a reason, in a DHCPNAK).
const OPT_MESSAGE: u8 = 56;
/// Option 58: renewal (T1) time.
const OPT_RENEWAL_TIME: u8 = 58;
/// Option 59: rebinding (T2) time.
const OPT_REBINDING_TIME: u8 = 59;
/// Option 61: client identifier.
const OPT_CLIENT_ID: u8 = 61;
/// The smallest BOOTP message (RFC 1542 §2.1): shorter replies are padded,
/// for old clients that drop anything shorter.
const MIN_MESSAGE_LEN: usize = 300;
/// The lease time meaning "forever" (RFC 2131 §3.3).
const INFINITE_LEASE: u32 = u32::MAX;

/// The network's settings that the server hands out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpConfig {
    /// The one address the guest gets.
    pub guest_ip: Ipv4Addr,
    /// The gateway: the router, and the server's identifier.
    pub gateway: Ipv4Addr,
    /// The network's prefix length (the subnet mask); values above 32 count as 32.
    pub prefix_len: u8,
    /// The DNS server the guest should use.
    pub dns: Ipv4Addr,
    /// The interface MTU (option 26).
    pub mtu: u16,
    /// The lease time in seconds; `u32::MAX` is an infinite lease.
    pub lease_secs: u32,
}

/// A reply to send to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The UDP payload, from the gateway's port 67 to the client's port 68.
    pub payload: Vec<u8>,
    /// Send it to 255.255.255.255 (and the broadcast MAC address); otherwise
    /// unicast it to [`DhcpConfig::guest_ip`] (the client already has that
    /// address: `ciaddr` is the guest's).
    pub broadcast: bool,
}

/// Answers one DHCP message (the UDP payload the client sent to port 67), or
/// returns `None` when there is nothing to answer.
pub fn answer(cfg: &DhcpConfig, request: &[u8]) -> Option<Reply> {
    let req = parse_request(request)?;
    let kind = match req.message_type {
        DhcpMessageType::Discover => ReplyKind::Offer,
        DhcpMessageType::Request => {
            if req.server_id.is_some_and(|id| id != cfg.gateway) {
                // The client took another server's offer.
                return None;
            }
            // SELECTING and INIT-REBOOT name the address in option 50;
            // RENEWING and REBINDING put it in ciaddr.
            let wanted = req.requested_ip.unwrap_or(req.client_ip);
            if wanted == cfg.guest_ip {
                ReplyKind::Ack
            } else {
                ReplyKind::Nak
            }
        }
        DhcpMessageType::Inform => ReplyKind::InformAck,
        _ => return None,
    };
    build_reply(cfg, &req, kind)
}

/// What a client's message says, as far as the server cares.
struct Request {
    message_type: DhcpMessageType,
    transaction_id: u32,
    broadcast: bool,
    client_hardware_address: EthernetAddress,
    client_ip: Ipv4Addr,
    relay_agent_ip: Ipv4Addr,
    requested_ip: Option<Ipv4Addr>,
    server_id: Option<Ipv4Addr>,
    client_id: Option<Vec<u8>>,
}

/// Parses a client's (BOOTREQUEST) message from Ethernet hardware.
fn parse_request(buf: &[u8]) -> Option<Request> {
    let packet = DhcpPacket::new_checked(buf).ok()?;
    if packet.opcode() != DhcpOpCode::Request
        || packet.hardware_type() != ArpHardware::Ethernet
        || packet.hardware_len() != 6
        || packet.magic_number() != MAGIC_COOKIE
    {
        return None;
    }
    let mut message_type = None;
    let mut requested_ip = None;
    let mut server_id = None;
    let mut client_id = None;
    // The first instance of an option counts.
    for option in packet.options() {
        match option.kind {
            OPT_MESSAGE_TYPE if message_type.is_none() => {
                if let [t] = option.data {
                    message_type = Some(DhcpMessageType::from(*t));
                }
            }
            OPT_REQUESTED_IP if requested_ip.is_none() => requested_ip = ipv4(option.data),
            OPT_SERVER_ID if server_id.is_none() => server_id = ipv4(option.data),
            OPT_CLIENT_ID if client_id.is_none() && !option.data.is_empty() => {
                client_id = Some(option.data.to_vec());
            }
            _ => {}
        }
    }
    Some(Request {
        message_type: message_type?,
        transaction_id: packet.transaction_id(),
        broadcast: packet.flags().contains(smoltcp::wire::DhcpFlags::BROADCAST),
        client_hardware_address: packet.client_hardware_address(),
        client_ip: packet.client_ip(),
        relay_agent_ip: packet.relay_agent_ip(),
        requested_ip,
        server_id,
        client_id,
    })
}

/// An option's data as an IPv4 address, if it is 4 bytes long.
fn ipv4(data: &[u8]) -> Option<Ipv4Addr> {
    let octets: [u8; 4] = data.try_into().ok()?;
    Some(Ipv4Addr::from(octets))
}

/// The kinds of reply the server sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReplyKind {
    /// DHCPOFFER, to a DHCPDISCOVER.
    Offer,
    /// DHCPACK with the lease, to a DHCPREQUEST.
    Ack,
    /// DHCPACK without an address or lease, to a DHCPINFORM.
    InformAck,
    /// DHCPNAK, to a DHCPREQUEST for another address.
    Nak,
}

/// The subnet mask of a prefix length (clamped to 32).
fn subnet_mask(prefix_len: u8) -> Ipv4Addr {
    let bits = u32::from(prefix_len.min(32));
    let mask = u32::MAX.checked_shl(32 - bits).unwrap_or(0);
    Ipv4Addr::from(mask)
}

/// The renewal (T1) and rebinding (T2) times of a lease: 1/2 and 7/8 of it
/// (RFC 2131 §4.4.5), or infinite for an infinite lease.
fn renew_rebind(lease: u32) -> (u32, u32) {
    if lease == INFINITE_LEASE {
        return (INFINITE_LEASE, INFINITE_LEASE);
    }
    let t2 = u64::from(lease) * 7 / 8;
    (lease / 2, u32::try_from(t2).unwrap_or(INFINITE_LEASE))
}

/// Emits the reply of `kind` to `req`.
fn build_reply(cfg: &DhcpConfig, req: &Request, kind: ReplyKind) -> Option<Reply> {
    let nak = kind == ReplyKind::Nak;
    let with_lease = matches!(kind, ReplyKind::Offer | ReplyKind::Ack);
    let mask = subnet_mask(cfg.prefix_len);
    let broadcast_address = Ipv4Addr::from(u32::from(cfg.guest_ip) | !u32::from(mask));
    let (t1, t2) = renew_rebind(cfg.lease_secs);

    let t1 = t1.to_be_bytes();
    let t2 = t2.to_be_bytes();
    let dns = cfg.dns.octets();
    let mtu = cfg.mtu.to_be_bytes();
    let broadcast_octets = broadcast_address.octets();
    let mut extra = Vec::with_capacity(7);
    if with_lease {
        extra.push(DhcpOption {
            kind: OPT_RENEWAL_TIME,
            data: &t1,
        });
        extra.push(DhcpOption {
            kind: OPT_REBINDING_TIME,
            data: &t2,
        });
    }
    if nak {
        extra.push(DhcpOption {
            kind: OPT_MESSAGE,
            data: b"requested address not available",
        });
    } else {
        extra.push(DhcpOption {
            kind: OPT_DNS,
            data: &dns,
        });
        extra.push(DhcpOption {
            kind: OPT_BROADCAST_ADDRESS,
            data: &broadcast_octets,
        });
        extra.push(DhcpOption {
            kind: OPT_INTERFACE_MTU,
            data: &mtu,
        });
    }
    if let Some(id) = &req.client_id {
        extra.push(DhcpOption {
            kind: OPT_CLIENT_ID,
            data: id,
        });
    }

    let repr = DhcpRepr {
        message_type: match kind {
            ReplyKind::Offer => DhcpMessageType::Offer,
            ReplyKind::Ack | ReplyKind::InformAck => DhcpMessageType::Ack,
            ReplyKind::Nak => DhcpMessageType::Nak,
        },
        transaction_id: req.transaction_id,
        secs: 0,
        client_hardware_address: req.client_hardware_address,
        // RFC 2131 table 3: ciaddr is echoed in a DHCPACK, 0 otherwise.
        client_ip: match kind {
            ReplyKind::Ack | ReplyKind::InformAck => req.client_ip,
            ReplyKind::Offer | ReplyKind::Nak => Ipv4Addr::UNSPECIFIED,
        },
        your_ip: if with_lease {
            cfg.guest_ip
        } else {
            Ipv4Addr::UNSPECIFIED
        },
        server_ip: Ipv4Addr::UNSPECIFIED,
        router: (!nak).then_some(cfg.gateway),
        subnet_mask: (!nak).then_some(mask),
        relay_agent_ip: req.relay_agent_ip,
        broadcast: req.broadcast,
        requested_ip: None,
        client_identifier: None,
        server_identifier: Some(cfg.gateway),
        parameter_request_list: None,
        dns_servers: None,
        max_size: None,
        lease_duration: with_lease.then_some(cfg.lease_secs),
        // smoltcp does not emit these two: they are in `extra`.
        renew_duration: None,
        rebind_duration: None,
        additional_options: &extra,
    };
    let mut payload = vec![0u8; repr.buffer_len().max(MIN_MESSAGE_LEN)];
    repr.emit(&mut DhcpPacket::new_unchecked(&mut payload[..]))
        .ok()?;

    // A client without its address yet (ciaddr 0: INIT, SELECTING,
    // INIT-REBOOT) may not take unicast IP, and a DHCPNAK is always broadcast
    // (RFC 2131 §4.1); otherwise the client is at the guest's address.
    let broadcast = nak || req.broadcast || req.client_ip != cfg.guest_ip;
    Some(Reply { payload, broadcast })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: EthernetAddress = EthernetAddress([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
    /// udhcpc's default parameter request list, plus 26 (`-O mtu`).
    const PARAMS: &[u8] = &[1, 3, 6, 12, 15, 28, 42, 26];

    fn cfg() -> DhcpConfig {
        DhcpConfig {
            guest_ip: Ipv4Addr::new(10, 0, 2, 15),
            gateway: Ipv4Addr::new(10, 0, 2, 2),
            prefix_len: 24,
            dns: Ipv4Addr::new(10, 0, 2, 3),
            mtu: 1500,
            lease_secs: 86400,
        }
    }

    /// A client message as udhcpc builds it (client identifier = type 1 + MAC).
    fn client_msg(
        message_type: DhcpMessageType,
        xid: u32,
        ciaddr: Ipv4Addr,
        requested_ip: Option<Ipv4Addr>,
        server_identifier: Option<Ipv4Addr>,
        broadcast: bool,
    ) -> Vec<u8> {
        let repr = DhcpRepr {
            message_type,
            transaction_id: xid,
            secs: 0,
            client_hardware_address: MAC,
            client_ip: ciaddr,
            your_ip: Ipv4Addr::UNSPECIFIED,
            server_ip: Ipv4Addr::UNSPECIFIED,
            router: None,
            subnet_mask: None,
            relay_agent_ip: Ipv4Addr::UNSPECIFIED,
            broadcast,
            requested_ip,
            client_identifier: Some(MAC),
            server_identifier,
            parameter_request_list: Some(PARAMS),
            dns_servers: None,
            max_size: Some(576),
            lease_duration: None,
            renew_duration: None,
            rebind_duration: None,
            additional_options: &[],
        };
        let mut buf = vec![0u8; repr.buffer_len()];
        repr.emit(&mut DhcpPacket::new_unchecked(&mut buf[..]))
            .expect("emit");
        buf
    }

    fn option(payload: &[u8], kind: u8) -> Option<Vec<u8>> {
        let packet = DhcpPacket::new_checked(payload).expect("reply too short");
        let found = packet.options().find(|o| o.kind == kind);
        found.map(|o| o.data.to_vec())
    }

    /// Checks the settings every OFFER and ACK carries.
    fn check_lease_reply(reply: &Reply, expect: DhcpMessageType, xid: u32) {
        let c = cfg();
        assert!(reply.payload.len() >= MIN_MESSAGE_LEN);
        let packet = DhcpPacket::new_checked(&reply.payload[..]).expect("short reply");
        let repr = DhcpRepr::parse(&packet).expect("reply parses");
        assert_eq!(repr.message_type, expect);
        assert_eq!(repr.transaction_id, xid);
        assert_eq!(repr.client_hardware_address, MAC);
        assert_eq!(repr.your_ip, c.guest_ip);
        assert_eq!(repr.router, Some(c.gateway));
        assert_eq!(repr.subnet_mask, Some(Ipv4Addr::new(255, 255, 255, 0)));
        assert_eq!(repr.server_identifier, Some(c.gateway));
        assert_eq!(repr.lease_duration, Some(86400));
        assert_eq!(repr.renew_duration, Some(43200));
        assert_eq!(repr.rebind_duration, Some(75600));
        let dns = repr.dns_servers.expect("DNS option");
        assert_eq!(dns.as_slice(), &[c.dns]);
        assert_eq!(repr.client_identifier, Some(MAC), "client id echoed");
        assert_eq!(
            option(&reply.payload, OPT_INTERFACE_MTU),
            Some(vec![0x05, 0xdc])
        );
        assert_eq!(
            option(&reply.payload, OPT_BROADCAST_ADDRESS),
            Some(vec![10, 0, 2, 255])
        );
    }

    #[test]
    fn discover_gets_offer() {
        let msg = client_msg(
            DhcpMessageType::Discover,
            0x1234_5678,
            Ipv4Addr::UNSPECIFIED,
            None,
            None,
            false,
        );
        let reply = answer(&cfg(), &msg).expect("offer");
        check_lease_reply(&reply, DhcpMessageType::Offer, 0x1234_5678);
        assert!(reply.broadcast, "the client has no address yet");
        // The flag is echoed as sent.
        let packet = DhcpPacket::new_checked(&reply.payload[..]).expect("short");
        assert!(!packet.flags().contains(smoltcp::wire::DhcpFlags::BROADCAST));
        assert_eq!(packet.client_ip(), Ipv4Addr::UNSPECIFIED);
    }

    #[test]
    fn discover_asking_for_another_address_still_gets_ours() {
        let other = Some(Ipv4Addr::new(192, 168, 1, 7));
        let msg = client_msg(
            DhcpMessageType::Discover,
            7,
            Ipv4Addr::UNSPECIFIED,
            other,
            None,
            true,
        );
        let reply = answer(&cfg(), &msg).expect("offer");
        check_lease_reply(&reply, DhcpMessageType::Offer, 7);
        let packet = DhcpPacket::new_checked(&reply.payload[..]).expect("short");
        assert!(packet.flags().contains(smoltcp::wire::DhcpFlags::BROADCAST));
    }

    #[test]
    fn selecting_request_gets_ack() {
        let c = cfg();
        let msg = client_msg(
            DhcpMessageType::Request,
            42,
            Ipv4Addr::UNSPECIFIED,
            Some(c.guest_ip),
            Some(c.gateway),
            false,
        );
        let reply = answer(&c, &msg).expect("ack");
        check_lease_reply(&reply, DhcpMessageType::Ack, 42);
        assert!(reply.broadcast);
    }

    #[test]
    fn init_reboot_request_gets_ack() {
        let c = cfg();
        let msg = client_msg(
            DhcpMessageType::Request,
            43,
            Ipv4Addr::UNSPECIFIED,
            Some(c.guest_ip),
            None,
            false,
        );
        check_lease_reply(&answer(&c, &msg).expect("ack"), DhcpMessageType::Ack, 43);
    }

    #[test]
    fn renewing_request_gets_unicast_ack() {
        let c = cfg();
        let msg = client_msg(DhcpMessageType::Request, 44, c.guest_ip, None, None, false);
        let reply = answer(&c, &msg).expect("ack");
        check_lease_reply(&reply, DhcpMessageType::Ack, 44);
        assert!(!reply.broadcast, "the client is bound: unicast to it");
        let packet = DhcpPacket::new_checked(&reply.payload[..]).expect("short");
        assert_eq!(packet.client_ip(), c.guest_ip, "ciaddr echoed in an ACK");
    }

    #[test]
    fn request_for_another_address_gets_nak() {
        let c = cfg();
        for (ciaddr, requested) in [
            (Ipv4Addr::UNSPECIFIED, Some(Ipv4Addr::new(10, 0, 2, 16))),
            (Ipv4Addr::new(192, 168, 0, 5), None),
            (Ipv4Addr::UNSPECIFIED, None),
        ] {
            let msg = client_msg(DhcpMessageType::Request, 9, ciaddr, requested, None, false);
            let reply = answer(&c, &msg).expect("nak");
            assert!(reply.broadcast, "a NAK is broadcast");
            let packet = DhcpPacket::new_checked(&reply.payload[..]).expect("short");
            let repr = DhcpRepr::parse(&packet).expect("parses");
            assert_eq!(repr.message_type, DhcpMessageType::Nak);
            assert_eq!(repr.transaction_id, 9);
            assert_eq!(repr.your_ip, Ipv4Addr::UNSPECIFIED);
            assert_eq!(repr.client_ip, Ipv4Addr::UNSPECIFIED);
            assert_eq!(repr.server_identifier, Some(c.gateway));
            assert_eq!(repr.lease_duration, None);
            assert_eq!(repr.router, None);
            assert_eq!(repr.subnet_mask, None);
            assert_eq!(repr.dns_servers, None);
        }
    }

    #[test]
    fn request_to_another_server_is_ignored() {
        let c = cfg();
        let msg = client_msg(
            DhcpMessageType::Request,
            1,
            Ipv4Addr::UNSPECIFIED,
            Some(c.guest_ip),
            Some(Ipv4Addr::new(10, 0, 2, 99)),
            false,
        );
        assert_eq!(answer(&c, &msg), None);
    }

    #[test]
    fn inform_gets_ack_without_lease() {
        let c = cfg();
        let msg = client_msg(DhcpMessageType::Inform, 5, c.guest_ip, None, None, false);
        let reply = answer(&c, &msg).expect("ack");
        assert!(!reply.broadcast);
        let packet = DhcpPacket::new_checked(&reply.payload[..]).expect("short");
        let repr = DhcpRepr::parse(&packet).expect("parses");
        assert_eq!(repr.message_type, DhcpMessageType::Ack);
        assert_eq!(repr.your_ip, Ipv4Addr::UNSPECIFIED);
        assert_eq!(repr.client_ip, c.guest_ip);
        assert_eq!(repr.lease_duration, None);
        assert_eq!(repr.renew_duration, None);
        assert_eq!(repr.router, Some(c.gateway));
        assert_eq!(repr.dns_servers.expect("dns").as_slice(), &[c.dns]);
        assert_eq!(
            option(&reply.payload, OPT_INTERFACE_MTU),
            Some(vec![0x05, 0xdc])
        );
    }

    #[test]
    fn release_decline_and_replies_get_nothing() {
        let c = cfg();
        for t in [
            DhcpMessageType::Release,
            DhcpMessageType::Decline,
            DhcpMessageType::Unknown(99),
        ] {
            let msg = client_msg(t, 1, c.guest_ip, Some(c.guest_ip), Some(c.gateway), false);
            assert_eq!(answer(&c, &msg), None, "{t:?}");
        }
        // A BOOTREPLY (op 2) carrying a DISCOVER type.
        let mut msg = client_msg(
            DhcpMessageType::Discover,
            1,
            Ipv4Addr::UNSPECIFIED,
            None,
            None,
            false,
        );
        msg[0] = 2;
        assert_eq!(answer(&c, &msg), None);
        // Another server's OFFER.
        let offer = answer(
            &c,
            &client_msg(
                DhcpMessageType::Discover,
                1,
                Ipv4Addr::UNSPECIFIED,
                None,
                None,
                false,
            ),
        )
        .expect("offer");
        assert_eq!(answer(&c, &offer.payload), None);
    }

    #[test]
    fn non_ethernet_and_bad_cookie_get_nothing() {
        let c = cfg();
        let good = client_msg(
            DhcpMessageType::Discover,
            1,
            Ipv4Addr::UNSPECIFIED,
            None,
            None,
            false,
        );
        assert!(answer(&c, &good).is_some());
        let mut msg = good.clone();
        msg[1] = 6; // IEEE 802 hardware
        assert_eq!(answer(&c, &msg), None);
        let mut msg = good.clone();
        msg[2] = 16; // hlen
        assert_eq!(answer(&c, &msg), None);
        let mut msg = good.clone();
        msg[236] ^= 0xff; // magic cookie
        assert_eq!(answer(&c, &msg), None);
        // No message type option: plain BOOTP.
        let mut msg = good;
        msg.truncate(240);
        msg.push(255);
        assert_eq!(answer(&c, &msg), None);
    }

    #[test]
    fn non_ethernet_client_id_is_fine_and_echoed() {
        let c = cfg();
        let mut msg = client_msg(
            DhcpMessageType::Discover,
            3,
            Ipv4Addr::UNSPECIFIED,
            None,
            None,
            false,
        );
        // Replace the client identifier's type (1, Ethernet) with 0 (a string).
        let pos = msg
            .windows(3)
            .position(|w| w == [OPT_CLIENT_ID, 7, 1])
            .expect("client id option");
        msg[pos + 2] = 0;
        let reply = answer(&c, &msg).expect("offer");
        let id = option(&reply.payload, OPT_CLIENT_ID).expect("client id echoed");
        assert_eq!(id[0], 0);
        assert_eq!(&id[1..], MAC.as_bytes());
    }

    #[test]
    fn masks_and_lease_times() {
        assert_eq!(subnet_mask(0), Ipv4Addr::UNSPECIFIED);
        assert_eq!(subnet_mask(8), Ipv4Addr::new(255, 0, 0, 0));
        assert_eq!(subnet_mask(30), Ipv4Addr::new(255, 255, 255, 252));
        assert_eq!(subnet_mask(32), Ipv4Addr::BROADCAST);
        assert_eq!(subnet_mask(200), Ipv4Addr::BROADCAST);
        assert_eq!(renew_rebind(3600), (1800, 3150));
        assert_eq!(renew_rebind(u32::MAX), (u32::MAX, u32::MAX));
        assert_eq!(renew_rebind(u32::MAX - 1), (u32::MAX / 2, 3_758_096_382));
    }

    /// xorshift64: deterministic noise without a dependency.
    fn next(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    #[test]
    fn garbage_never_panics() {
        let c = cfg();
        let good = client_msg(
            DhcpMessageType::Request,
            77,
            Ipv4Addr::UNSPECIFIED,
            Some(c.guest_ip),
            Some(c.gateway),
            true,
        );
        // Every truncation of a valid message.
        for len in 0..=good.len() {
            let _ = answer(&c, &good[..len]);
        }
        assert_eq!(answer(&c, &good[..239]), None);
        // Random bytes, and random corruptions of a valid message (keeping
        // the header valid so the option parser sees the noise).
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for round in 0..4000 {
            let r = next(&mut seed);
            let buf: Vec<u8> = if round % 2 == 0 {
                let len = (r % 700) as usize;
                (0..len).map(|_| next(&mut seed) as u8).collect()
            } else {
                let mut b = good.clone();
                let extra = (r % 64) as usize;
                b.extend((0..extra).map(|_| next(&mut seed) as u8));
                let flips = 1 + (r >> 32) % 8;
                for _ in 0..flips {
                    let at = 240 + (next(&mut seed) as usize) % (b.len() - 240);
                    b[at] = next(&mut seed) as u8;
                }
                let cut = 240 + (next(&mut seed) as usize) % (b.len() - 239);
                b.truncate(cut);
                b
            };
            if let Some(reply) = answer(&c, &buf) {
                // Whatever answers is a well-formed reply.
                let packet = DhcpPacket::new_checked(&reply.payload[..]).expect("short reply");
                assert_eq!(packet.opcode(), DhcpOpCode::Reply);
            }
        }
    }
}
