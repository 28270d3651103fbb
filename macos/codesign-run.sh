#!/bin/sh
# Cargo runner for macOS targets (see .cargo/config.toml): signs the binary with
# macos/aivmm.entitlements, so Hypervisor.framework lets it create VMs, then runs
# it. `cargo test`, `cargo run` and `cargo bench` all go through it.
#
# The signature is ad hoc (`-`) unless AIVMM_CODESIGN_IDENTITY names a keychain
# identity. Signing rewrites the file in place, which is fine for cargo's
# freshly linked outputs.
set -eu
if [ "$#" -lt 1 ]; then
    echo "usage: $0 BINARY [ARGS...]" >&2
    exit 2
fi
bin="$1"
shift
here="$(cd "$(dirname "$0")" && pwd)"
if ! out="$(codesign --force --sign "${AIVMM_CODESIGN_IDENTITY:--}" \
    --entitlements "$here/aivmm.entitlements" "$bin" 2>&1)"; then
    echo "aivmm: error: codesign of $bin failed: $out" >&2
    exit 1
fi
exec "$bin" "$@"
