# The aivmm host binary, callPackage style:
#
#   pkgs.callPackage ./nix/package.nix { }
#
# Built from this repository's Cargo workspace with the committed Cargo.lock, so no
# vendor hash needs updating when dependencies change.
{
  lib,
  stdenv,
  darwin,
  rustPlatform,
}:

let
  cargoToml = lib.importTOML ../Cargo.toml;
in
rustPlatform.buildRustPackage {
  pname = "aivmm";
  inherit (cargoToml.package) version;

  # Only what cargo needs, so editing the Nix files, docs or tests/e2e does not
  # rebuild the binary. `maybeMissing` keeps evaluation working in a checkout where a
  # workspace member is not committed yet; add new members here.
  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions (
      [
        ../Cargo.toml
        ../Cargo.lock
      ]
      ++ map lib.fileset.maybeMissing [
        ../vmm
        ../devices
        ../protocol
        ../guest
        ../benches # Cargo.toml declares [[bench]] targets; cargo wants their files
      ]
    );
  };

  cargoLock.lockFile = ../Cargo.lock;

  # Only the root package's binary: the guest agent is built by ./agent.nix.
  cargoBuildFlags = [
    "--package"
    "aivmm"
    "--bin"
    "aivmm"
  ];

  # On macOS the binary must carry the Hypervisor.framework entitlement
  # (../macos/aivmm.entitlements); sign it ad hoc after the fixup phase, whose
  # own ad hoc signature has no entitlements.
  nativeBuildInputs = lib.optionals stdenv.hostPlatform.isDarwin [ darwin.sigtool ];
  postFixup = lib.optionalString stdenv.hostPlatform.isDarwin ''
    codesign --force --sign - --entitlements ${../macos/aivmm.entitlements} $out/bin/aivmm
  '';

  # The test suite needs /dev/kvm (host KVM tests boot freestanding guests) and the
  # nested QEMU harness in tests/e2e, neither of which exists in the Nix sandbox.
  doCheck = false;

  meta = {
    description = cargoToml.package.description;
    license = lib.licenses.asl20;
    mainProgram = "aivmm";
    # KVM on x86_64 Linux; Hypervisor.framework on Apple silicon (aivmm refuses
    # Intel Macs, so x86_64-darwin is not listed). aarch64-linux evaluates but has no
    # KVM backend yet; aarch64-darwin's backend has not been built on a Mac yet.
    platforms = [
      "x86_64-linux"
      "aarch64-linux"
      "aarch64-darwin"
    ];
  };
}
