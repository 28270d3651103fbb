# aivmm-agent, the guest side of aivmm (guest/agent in the Cargo workspace). It runs
# inside the Linux guest, connects to the host over vsock (CID 2, port 1024) and runs
# the command the host sends. callPackage style, built for the guest's platform.
{
  lib,
  rustPlatform,
}:

let
  cargoToml = lib.importTOML ../guest/agent/Cargo.toml;
in
rustPlatform.buildRustPackage {
  pname = "aivmm-agent";
  inherit (cargoToml.package) version;

  # The whole workspace is needed: cargo reads every member's manifest.
  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions (
      [
        ../Cargo.toml
        ../Cargo.lock
        ../guest
      ]
      ++ map lib.fileset.maybeMissing [
        ../vmm
        ../devices
        ../protocol
        ../benches
      ]
    );
  };

  cargoLock.lockFile = ../Cargo.lock;

  cargoBuildFlags = [
    "--package"
    "aivmm-agent"
  ];

  # Its tests drive the agent through the aivmm host crate, which needs /dev/kvm for
  # some of them; the workspace tests run in CI instead.
  doCheck = false;

  meta = {
    description = cargoToml.package.description;
    license = lib.licenses.asl20;
    mainProgram = "aivmm-agent";
    platforms = lib.platforms.linux;
  };
}
