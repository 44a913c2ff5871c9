//! Packet traces: the loaded programs run on a synthetic frame (BPF_PROG_TEST_RUN) against
//! the live maps, marked as a trace (`skb->mark = TRACE_MARK`), so they change no state and
//! describe each stage in `TRACE_EVENTS` (`dataplane_common::trace`).
//!
//! Runs must be serialized (one `TRACE_EVENTS` consumer; events of overlapping runs would
//! mix): the caller holds the [`TraceEvents`] handle mutably for the run. The calling
//! thread must be in the network namespace of the ports (the kernel resolves `ifindex`
//! there).

use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use dataplane_common::{
    maps::programs,
    trace::{TRACE_MARK, TraceEvent, TraceStage},
};

use super::{Datapath, DatapathError, flow_maps::TraceEvents};

/// Size of `struct __sk_buff`, the context BPF_PROG_TEST_RUN takes for TC programs.
const SK_BUFF_SIZE: usize = 192;
/// Offset of `mark` in `struct __sk_buff`.
const SK_BUFF_MARK: usize = 8;
/// Offset of `ifindex` in `struct __sk_buff`.
const SK_BUFF_IFINDEX: usize = 40;
/// Room for programs that grow the frame (VXLAN encapsulation adds 50 bytes).
const GROWTH: usize = 256;
/// Stages one run reports at most (a bound on draining; a run writes about a dozen).
const MAX_EVENTS: usize = 64;

/// Which TC program a trace runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TraceProgram {
    /// `vpc_port`: a frame an instance sends (ifindex: its host-side port).
    Port,
    /// `vpc_tc_ingress`: a frame arriving on the underlay (ifindex: the underlay device),
    /// e.g. the encapsulated output of a `Port` trace on the sending host.
    UnderlayIngress,
}

impl TraceProgram {
    /// The program's name in the object.
    pub fn name(self) -> &'static str {
        match self {
            TraceProgram::Port => programs::PORT,
            TraceProgram::UnderlayIngress => programs::TC_INGRESS,
        }
    }
}

/// The outcome of one trace run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceRun {
    /// The program's return code (`TC_ACT_*`; 7 is a redirect).
    pub retval: u32,
    /// The frame as the program left it (rewritten, encapsulated: feed an encapsulated one
    /// to the destination host's [`TraceProgram::UnderlayIngress`]).
    pub data_out: Vec<u8>,
    /// The stages, in order.
    pub events: Vec<TraceEvent>,
}

impl TraceRun {
    /// The final verdict's (action number, drop reason number), if the run reported one.
    pub fn verdict(&self) -> Option<(u32, u32)> {
        self.events
            .iter()
            .rev()
            .find(|e| e.stage == TraceStage::Verdict as u32)
            .map(|e| (e.a, e.b))
    }

    /// The events of `stage`.
    pub fn stage(&self, stage: TraceStage) -> impl Iterator<Item = &TraceEvent> {
        self.events.iter().filter(move |e| e.stage == stage as u32)
    }
}

/// The `__sk_buff` context of a trace run on device `ifindex`.
pub fn trace_context(ifindex: u32) -> [u8; SK_BUFF_SIZE] {
    let mut ctx = [0u8; SK_BUFF_SIZE];
    ctx[SK_BUFF_MARK..SK_BUFF_MARK + 4].copy_from_slice(&TRACE_MARK.to_ne_bytes());
    ctx[SK_BUFF_IFINDEX..SK_BUFF_IFINDEX + 4].copy_from_slice(&ifindex.to_ne_bytes());
    ctx
}

/// The loaded program `which` of `datapath`.
pub fn program(
    datapath: &Datapath,
    which: TraceProgram,
) -> Result<&SchedClassifier, DatapathError> {
    let name = which.name();
    datapath
        .ebpf()
        .program(name)
        .ok_or(DatapathError::MissingProgram(name))?
        .try_into()
        .map_err(|source| DatapathError::Program {
            program: name,
            source,
        })
}

/// Runs `prog` once on `frame` as if it arrived on device `ifindex`, in trace mode; returns
/// the verdict, the output frame and the stages. Events left over from an earlier run are
/// discarded first.
pub fn run(
    prog: &SchedClassifier,
    events: &mut TraceEvents,
    ifindex: u32,
    frame: &[u8],
) -> Result<TraceRun, DatapathError> {
    let mut stale = Vec::new();
    while events.drain_into(&mut stale, MAX_EVENTS) > 0 {
        stale.clear();
    }
    let ctx = trace_context(ifindex);
    let mut out = vec![0u8; frame.len() + GROWTH];
    let opts = TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        ctx_in: Some(&ctx[..]),
        repeat: 1,
        ..TestRunOptions::new()
    };
    let result = prog
        .test_run(opts)
        .map_err(|source| DatapathError::Program {
            program: "trace run",
            source,
        })?;
    out.truncate(result.data_size_out as usize);
    let mut got = Vec::new();
    events.drain_into(&mut got, MAX_EVENTS);
    Ok(TraceRun {
        retval: result.return_value,
        data_out: out,
        events: got,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_context_carries_the_mark_and_the_device() {
        let ctx = trace_context(7);
        assert_eq!(ctx[8..12], TRACE_MARK.to_ne_bytes());
        assert_eq!(ctx[40..44], 7u32.to_ne_bytes());
        let run = TraceRun {
            retval: 2,
            data_out: vec![],
            events: vec![
                TraceEvent {
                    stage: TraceStage::Endpoint as u32,
                    ..TraceEvent::default()
                },
                TraceEvent {
                    stage: TraceStage::Verdict as u32,
                    a: 2,
                    b: 5,
                    ..TraceEvent::default()
                },
            ],
        };
        assert_eq!(run.verdict(), Some((2, 5)));
        assert_eq!(run.stage(TraceStage::Endpoint).count(), 1);
    }
}
