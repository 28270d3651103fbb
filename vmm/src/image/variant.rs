//! Image variants: the same Debian base ([`super::PACKAGES`], stage 1, the
//! configured root) for different jobs. A variant adds packages and static files
//! (which may replace the base's, e.g. `usr/lib/aivmm/init2`) and gets its own
//! image name, so the variants live side by side in the cache.

/// What a guest image is for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Variant {
    /// `aivmm run --workdir`: stage 2 runs the guest agent, which runs the command.
    #[default]
    Agent,
    /// `aivmm builder serve`: a Nix remote builder, sshd reached over vsock
    /// (`guest-image/builder/`).
    Builder,
}

/// The builder's packages beyond the base list.
pub const BUILDER_PACKAGES: &str = include_str!("../../../guest-image/builder/packages.txt");

/// The builder's files: path, contents, mode. Its `init2` replaces the agent's.
pub const BUILDER_FILES: &[(&str, &str, u32)] = &[
    (
        "usr/lib/aivmm/init2",
        include_str!("../../../guest-image/builder/init2"),
        0o755,
    ),
    (
        "usr/lib/aivmm/builder-control",
        include_str!("../../../guest-image/builder/builder-control"),
        0o755,
    ),
    (
        "etc/ssh/sshd_config",
        include_str!("../../../guest-image/builder/sshd_config"),
        0o644,
    ),
    (
        "etc/nix/nix.conf",
        include_str!("../../../guest-image/builder/nix.conf"),
        0o644,
    ),
];

impl Variant {
    /// The variant's name, part of the image's directory name.
    pub fn name(self) -> &'static str {
        match self {
            Variant::Agent => "agent",
            Variant::Builder => "builder",
        }
    }

    /// Package names to add to the base list.
    pub fn packages(self) -> Vec<String> {
        match self {
            Variant::Agent => Vec::new(),
            Variant::Builder => super::packages::parse_list(BUILDER_PACKAGES),
        }
    }

    /// Files to write over the base's static files.
    pub fn files(self) -> &'static [(&'static str, &'static str, u32)] {
        match self {
            Variant::Agent => &[],
            Variant::Builder => BUILDER_FILES,
        }
    }

    /// Whether Claude Code belongs in this variant at all.
    pub fn wants_claude(self) -> bool {
        self == Variant::Agent
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_builder_adds_sshd_nix_and_its_own_stage_2() {
        // The base list and the builder's together (sshd is in the base already).
        let mut p = super::super::packages::parse_list(super::super::PACKAGES);
        p.extend(Variant::Builder.packages());
        for want in ["openssh-server", "nix-bin", "socat"] {
            assert!(p.iter().any(|x| x == want), "{want} missing: {p:?}");
        }
        assert!(Variant::Agent.packages().is_empty());
        let init2 = Variant::Builder
            .files()
            .iter()
            .find(|(p, _, _)| *p == "usr/lib/aivmm/init2")
            .map(|(_, d, m)| (*d, *m));
        let (data, mode) = init2.expect("the builder replaces init2");
        assert_eq!(mode, 0o755);
        // The guest side of the protocol the host's builder speaks.
        assert!(data.contains("VSOCK-LISTEN:22"), "no vsock bridge to sshd");
        assert!(data.contains(&format!("CONTROL_PORT={}", crate::builder::CONTROL_PORT)));
        assert!(data.contains("aivmm-builder"), "no key share tag");
        assert!(data.contains(crate::builder::KEY_TAG));
        let sshd = Variant::Builder
            .files()
            .iter()
            .find(|(p, _, _)| *p == "etc/ssh/sshd_config")
            .map(|(_, d, _)| *d)
            .unwrap_or_default();
        assert!(sshd.lines().any(|l| l == "ListenAddress 127.0.0.1"));
        assert!(sshd.lines().any(|l| l == "PasswordAuthentication no"));
        assert!(!Variant::Builder.wants_claude());
    }
}
