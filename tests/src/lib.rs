//! Root-only test support: network namespaces, BPF_PROG_TEST_RUN on the real programs, the
//! real agent and CLI binaries as processes, and a private etcd for the store's etcd backend.
//!
//! Tests using this need root, a kernel with BPF, and bpffs (mounted on demand). `cargo
//! xtask test` runs them; names are unique per test, so they run in parallel.

pub mod api_bench;
pub mod cluster;
pub mod compute_bench;
pub mod etcd;
pub mod flowlog_bench;
pub mod flowlog_path_bench;
pub mod lb_baseline;
pub mod lb_bench;
pub mod netns;
pub mod overlay_fixture;
pub mod procs;
pub mod security_bench;
pub mod testrun;
pub mod topology;
