//! Running the real datapath programs on crafted frames with BPF_PROG_TEST_RUN.
//!
//! The object is the one the agent embeds; maps are pinned in a per-test bpffs directory so
//! tests can seed and read them exactly as the agent and CLI do.

use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions, Xdp};
use controlplane::datapath::{
    Datapath, LoadOptions, OverlayMaps, PinLayout, PinnedMaps, StatsSnapshot, TraceEvents,
    trace::{self, TraceProgram, TraceRun},
};
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
/// TC return code of a redirect (`TC_ACT_REDIRECT`).
pub const TC_ACT_REDIRECT: u32 = 7;

/// Size of `struct __sk_buff`, the context BPF_PROG_TEST_RUN takes for TC programs.
const SK_BUFF_SIZE: usize = 192;
/// Offset of `ifindex` in `struct __sk_buff`.
const SK_BUFF_IFINDEX: usize = 40;

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
    overlay: OverlayMaps,
    // Dropped last: removes the pins.
    _pins: BpffsDir,
}

impl LoadedDatapath {
    /// Loads the embedded object under a fresh bpffs directory named after `tag`.
    pub fn load(tag: &str) -> Result<Self> {
        Self::load_with(tag, None)
    }

    /// As [`LoadedDatapath::load`], with a conntrack table of `conntrack_max` entries.
    pub fn load_with(tag: &str, conntrack_max: Option<u32>) -> Result<Self> {
        let pins = BpffsDir::new(tag)?;
        let layout = PinLayout::new(pins.path());
        let datapath = Datapath::load(&LoadOptions {
            layout: layout.clone(),
            log_level: 1,
            conntrack_max,
            lb_flows_max: None,
            lb_table_slots: None,
        })
        .context("loading the datapath")?;
        let maps = PinnedMaps::open(&layout)?;
        let overlay = OverlayMaps::open(&layout)?;
        Ok(LoadedDatapath {
            datapath,
            maps,
            overlay,
            _pins: pins,
        })
    }

    /// The pinned maps (counters, filter).
    pub fn maps(&mut self) -> &mut PinnedMaps {
        &mut self.maps
    }

    /// The loaded datapath.
    pub fn datapath(&self) -> &Datapath {
        &self.datapath
    }

    /// Traces `frame` through `program` as if it arrived on device `ifindex` of the calling
    /// thread's namespace (`controlplane::datapath::trace`).
    pub fn trace(&self, program: TraceProgram, ifindex: u32, frame: &[u8]) -> Result<TraceRun> {
        let mut events = TraceEvents::open_trace_events(self.layout())?;
        let prog = trace::program(&self.datapath, program)?;
        Ok(trace::run(prog, &mut events, ifindex, frame)?)
    }

    /// The pin layout.
    pub fn layout(&self) -> &PinLayout {
        self.datapath.layout()
    }

    /// The pinned overlay maps.
    pub fn overlay(&mut self) -> &mut OverlayMaps {
        &mut self.overlay
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
        self.run_on(hook, frame, repeat, None)
    }

    /// As [`LoadedDatapath::run_repeat`], for TC hooks with the skb on device `ifindex` of
    /// the calling thread's network namespace (the port program keys on it).
    pub fn run_on(
        &self,
        hook: Hook,
        frame: &[u8],
        repeat: u32,
        ifindex: Option<u32>,
    ) -> Result<RunResult> {
        // Room for programs that grow the packet (encapsulation).
        let mut out = vec![0u8; frame.len() + 256];
        let mut ctx = [0u8; SK_BUFF_SIZE];
        if let Some(ifindex) = ifindex {
            ctx[SK_BUFF_IFINDEX..SK_BUFF_IFINDEX + 4].copy_from_slice(&ifindex.to_ne_bytes());
        }
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: ifindex.map(|_| &ctx[..]),
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
            Hook::TcIngress | Hook::TcEgress | Hook::Port => {
                let name = match hook {
                    Hook::TcIngress => programs::TC_INGRESS,
                    Hook::TcEgress => programs::TC_EGRESS,
                    _ => programs::PORT,
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
