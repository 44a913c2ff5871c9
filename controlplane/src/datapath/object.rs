//! The eBPF object, compiled by `build.rs` and embedded in the binary.
//!
//! Embedding (rather than loading a file at run time) means an agent binary always carries
//! the datapath it was built and tested with.

/// The ELF object holding every datapath program and map.
pub static DATAPLANE_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("DATAPLANE_EBPF_OBJECT"));
