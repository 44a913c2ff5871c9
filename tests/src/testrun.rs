//! Running the real datapath programs on crafted frames with BPF_PROG_TEST_RUN.
//!
//! The object is the one the agent embeds; maps are pinned in a per-test bpffs directory so
//! tests can seed and read them exactly as the agent and CLI do.

use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions, Xdp};
use controlplane::datapath::{Datapath, LoadOptions, PinLayout, PinnedMaps, StatsSnapshot};
use dataplane_common::{Hook, maps::programs};

use crate::netns::BpffsDir;

/// XDP return codes.
pub const XDP_DROP: u32 = 1;
/// XDP return codes.
pub const XDP_PASS: u32 = 2;
/// TC return codes (`TC_ACT_OK`, `TC_ACT_SHOT`).
pub const TC_ACT_OK: u32 = 0;
/// TC return codes (`TC_ACT_OK`, `TC_ACT_SHOT`).
pub const TC_ACT_SHOT: u32 = 2;

/// The outcome of one BPF_PROG_TEST_RUN call.
#[derive(Debug, Clone)]
pub struct RunResult {
    /// The program's return code.
    pub retval: u32,
    /// The packet after the program ran.
    pub output: Vec<u8>,
    /// Kernel-measured average time of one run.
    pub per_run: Duration,
}

/// The datapath loaded (not attached) with its maps pinned in a private bpffs directory.
#[derive(Debug)]
pub struct LoadedDatapath {
    datapath: Datapath,
    maps: PinnedMaps,
    // Dropped last: removes the pins.
    _pins: BpffsDir,
}

impl LoadedDatapath {
    /// Loads the embedded object under a fresh bpffs directory named after `tag`.
    pub fn load(tag: &str) -> Result<Self> {
        let pins = BpffsDir::new(tag)?;
        let layout = PinLayout::new(pins.path());
        let datapath = Datapath::load(&LoadOptions {
            layout: layout.clone(),
            log_level: 1,
        })
        .context("loading the datapath")?;
        let maps = PinnedMaps::open(&layout)?;
        Ok(LoadedDatapath {
            datapath,
            maps,
            _pins: pins,
        })
    }

    /// The pinned maps (counters, filter).
    pub fn maps(&mut self) -> &mut PinnedMaps {
        &mut self.maps
    }

    /// Current counters.
    pub fn stats(&self) -> Result<StatsSnapshot> {
        Ok(self.maps.stats()?)
    }

    /// Runs the program of `hook` once on `frame`.
    pub fn run(&self, hook: Hook, frame: &[u8]) -> Result<RunResult> {
        self.run_repeat(hook, frame, 1)
    }

    /// Runs the program of `hook` `repeat` times on `frame` (the kernel re-runs it in a loop
    /// and reports the average time per run).
    pub fn run_repeat(&self, hook: Hook, frame: &[u8], repeat: u32) -> Result<RunResult> {
        // Room for programs that grow the packet (encapsulation) in later datapath stages.
        let mut out = vec![0u8; frame.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat,
            ..TestRunOptions::new()
        };
        let ebpf = self.datapath.ebpf();
        let program = |name: &str| {
            ebpf.program(name)
                .ok_or_else(|| anyhow!("program {name} missing"))
        };
        let result = match hook {
            Hook::Xdp => {
                let prog: &Xdp = program(programs::XDP)?.try_into()?;
                prog.test_run(opts)
            }
            Hook::TcIngress | Hook::TcEgress => {
                let name = if hook == Hook::TcIngress {
                    programs::TC_INGRESS
                } else {
                    programs::TC_EGRESS
                };
                let prog: &SchedClassifier = program(name)?.try_into()?;
                prog.test_run(opts)
            }
        }
        .with_context(|| {
            format!(
                "BPF_PROG_TEST_RUN of {} on {} bytes",
                hook.name(),
                frame.len()
            )
        })?;
        out.truncate(result.data_size_out as usize);
        Ok(RunResult {
            retval: result.return_value,
            output: out,
            per_run: result.duration,
        })
    }
}
