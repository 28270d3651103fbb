//! aivmm: a single-process VMM for running an AI coding agent in a real VM.

pub mod arch;
