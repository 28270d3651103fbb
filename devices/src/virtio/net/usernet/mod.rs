//! aivmm's own user-mode network: a NAT gateway for one guest, inside aivmm.
//!
//! (in progress)

pub mod dhcp;
pub mod dns;
pub mod policy;
