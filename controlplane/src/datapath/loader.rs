//! Loading the datapath and attaching it to interfaces.
//!
//! Restart semantics (the datapath never stops forwarding because the agent did):
//! - maps are pinned by name and reused, so counters and entries survive;
//! - each attachment is a bpf_link pinned under the pin tree; a new agent finds the pin and
//!   swaps its freshly loaded program into the existing link with `BPF_LINK_UPDATE`, which
//!   is atomic: there is no moment without a program on the interface;
//! - a pinned link whose interface is gone (the update fails) is replaced by a new
//!   attachment;
//! - pins of the previous maps ABI are migrated on load ([`super::migrate`]): unchanged maps
//!   shared, changed ones converted, every old link moved and given the new program, all
//!   before `load` returns, so old and new programs never run on different tables for
//!   longer than the swap itself.

use std::{io, path::Path};

use aya::{
    Ebpf, EbpfLoader,
    programs::{
        ProgramError, SchedClassifier, TcAttachType, Xdp,
        links::{FdLink, LinkError, PinnedLink},
        tc::SchedClassifierLink,
        xdp::{XdpLink, XdpMode},
    },
    sys::SyscallError,
};
use dataplane_common::maps::{self, programs};

use super::{DatapathError, PinLayout, migrate};
use crate::datapath::object::DATAPLANE_OBJECT;

/// How to attach XDP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum XdpAttachMode {
    /// Native (driver) mode, falling back to generic (skb) mode when the driver refuses.
    #[default]
    Auto,
    /// Native (driver) mode only.
    Native,
    /// Generic (skb) mode: works on any device, slower.
    Generic,
    /// No XDP: TC ingress does the receive-side work. Best on veth receivers of TCP traffic,
    /// where native XDP turns GRO aggregates back into MTU-sized frames (see the README's
    /// performance section).
    Off,
}

/// Options for [`Datapath::load`].
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Pin tree root.
    pub layout: PinLayout,
    /// Most verbose aya-log level the programs emit (`aya_log::Level` as a number: 1 error
    /// .. 5 trace); lower levels cost nothing per packet beyond one branch.
    pub log_level: u8,
    /// Capacity of the conntrack table (`CONNTRACK_MAX_ENTRIES` when `None`). Applies when
    /// the table is created; a table already pinned keeps its size.
    pub conntrack_max: Option<u32>,
    /// Capacity of `LB_FLOWS` and `LB_REVERSE` (`LB_FLOWS_MAX_ENTRIES` when `None`); as
    /// `conntrack_max`, applies when the tables are created.
    pub lb_flows_max: Option<u32>,
    /// Slots of `LB_MAGLEV` (`LB_MAGLEV_SLOTS` when `None`); as `conntrack_max`.
    pub lb_table_slots: Option<u32>,
}

/// What [`Datapath::attach`] did on one hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachOutcome {
    /// A new link was created and pinned.
    Attached,
    /// An existing pinned link got the new program atomically.
    Replaced,
}

/// One program attached to one interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    /// Interface name.
    pub iface: String,
    /// Program name.
    pub program: &'static str,
    /// Whether the link was new or reused.
    pub outcome: AttachOutcome,
    /// Kernel id of the bpf_link (stable across agent restarts when reused).
    pub link_id: u32,
    /// Kernel id of the program now running in the link.
    pub program_id: u32,
    /// For XDP: whether it runs in native (true) or generic mode.
    pub xdp_native: Option<bool>,
}

/// The loaded datapath: programs verified and ready, maps pinned.
#[derive(Debug)]
pub struct Datapath {
    ebpf: Ebpf,
    layout: PinLayout,
    migration: Option<migrate::MigrationReport>,
}

impl Datapath {
    /// Loads the embedded object, reusing maps already pinned under the layout (creating and
    /// pinning the missing ones), and verifies every program.
    pub fn load(options: &LoadOptions) -> Result<Self, DatapathError> {
        Self::load_object(DATAPLANE_OBJECT, options)
    }

    /// As [`Datapath::load`], for a given object.
    pub fn load_object(object: &[u8], options: &LoadOptions) -> Result<Self, DatapathError> {
        options.layout.prepare()?;
        // Carried maps must be pinned at the new paths before the loader looks for them.
        let pending = migrate::prepare(&options.layout, object)?;
        let mut loader = EbpfLoader::new();
        loader
            .default_map_pin_directory(options.layout.maps_dir())
            .override_global(aya_log::LEVEL, &options.log_level, false);
        if let Some(n) = options.conntrack_max {
            loader.map_max_entries(maps::CONNTRACK, n);
        }
        if let Some(n) = options.lb_flows_max {
            loader.map_max_entries(maps::LB_FLOWS, n);
            loader.map_max_entries(maps::LB_REVERSE, n);
        }
        if let Some(n) = options.lb_table_slots {
            loader.map_max_entries(maps::LB_MAGLEV, n);
        }
        let mut ebpf = loader.load(object)?;
        for name in [programs::TC_INGRESS, programs::TC_EGRESS, programs::PORT] {
            let prog: &mut SchedClassifier = program(&mut ebpf, name)?;
            prog.load().map_err(|source| DatapathError::Program {
                program: name,
                source,
            })?;
        }
        let xdp: &mut Xdp = program(&mut ebpf, programs::XDP)?;
        xdp.load().map_err(|source| DatapathError::Program {
            program: programs::XDP,
            source,
        })?;
        let mut datapath = Datapath {
            ebpf,
            layout: options.layout.clone(),
            migration: None,
        };
        if let Some(pending) = pending {
            datapath.migration = Some(pending.finish(&mut datapath)?);
        }
        Ok(datapath)
    }

    /// What the load migrated from an older maps ABI, if anything.
    pub fn migration(&self) -> Option<&migrate::MigrationReport> {
        self.migration.as_ref()
    }

    /// Swaps this object's `program` into the link pinned for it on `iface` (no new
    /// attachment). `None`: no usable pinned link (the interface is gone; the pin was
    /// removed). Used by the migration, which knows links only by their pins.
    pub(crate) fn replace_pinned(
        &mut self,
        iface: &str,
        program_name: &str,
    ) -> Result<Option<Attachment>, DatapathError> {
        let (name, xdp) = match program_name {
            programs::XDP => (programs::XDP, true),
            programs::TC_INGRESS => (programs::TC_INGRESS, false),
            programs::TC_EGRESS => (programs::TC_EGRESS, false),
            programs::PORT => (programs::PORT, false),
            _ => return Ok(None),
        };
        let pin = self.layout.link(iface, name);
        let link = if xdp {
            let prog: &mut Xdp = program(&mut self.ebpf, name)?;
            swap_into_pinned_link(&pin, |link: XdpLink| {
                let id = prog.attach_to_link(link)?;
                prog.take_link(id)
            })?
        } else {
            let prog: &mut SchedClassifier = program(&mut self.ebpf, name)?;
            swap_into_pinned_link(&pin, |link: SchedClassifierLink| {
                let id = prog.attach_to_link(link)?;
                prog.take_link(id)
            })?
        };
        link.map(|link| attachment(iface, name, AttachOutcome::Replaced, &link, None))
            .transpose()
    }

    /// The aya object (for BPF_PROG_TEST_RUN in tests and benchmarks).
    pub fn ebpf(&self) -> &Ebpf {
        &self.ebpf
    }

    /// The aya object, mutably (the aya-log logger takes its ring buffer from it).
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// The pin layout in use.
    pub fn layout(&self) -> &PinLayout {
        &self.layout
    }

    /// Attaches XDP (receive) and TC ingress and egress to `iface`, reusing pinned links.
    pub fn attach(
        &mut self,
        iface: &str,
        xdp_mode: XdpAttachMode,
    ) -> Result<Vec<Attachment>, DatapathError> {
        self.prepare_links_dir(iface)?;
        let mut out = Vec::with_capacity(3);
        if xdp_mode == XdpAttachMode::Off {
            self.detach_pinned(iface, programs::XDP)?;
        } else {
            out.push(self.attach_xdp(iface, xdp_mode)?);
        }
        for (name, attach_type) in [
            (programs::TC_INGRESS, TcAttachType::Ingress),
            (programs::TC_EGRESS, TcAttachType::Egress),
        ] {
            out.push(self.attach_tc(iface, name, attach_type)?);
        }
        Ok(out)
    }

    /// Attaches the instance-port program to TC ingress of `iface` (the host side of an
    /// instance's veth), reusing a pinned link.
    pub fn attach_port(&mut self, iface: &str) -> Result<Attachment, DatapathError> {
        self.prepare_links_dir(iface)?;
        self.attach_tc(iface, programs::PORT, TcAttachType::Ingress)
    }

    /// Detaches the instance-port program from `iface` and removes its pins. Succeeds when
    /// nothing is attached (the interface may already be gone with its instance).
    pub fn detach_port(&self, iface: &str) -> Result<(), DatapathError> {
        self.detach_pinned(iface, programs::PORT)?;
        let dir = self.layout.links_dir(iface);
        match std::fs::remove_dir(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            // Other links (XDP, TC) still pinned there: the directory stays.
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOTEMPTY) => Ok(()),
            Err(source) => Err(DatapathError::Io {
                action: "removing",
                path: dir,
                source,
            }),
        }
    }

    /// Checks that `iface` exists and creates its link pin directory.
    fn prepare_links_dir(&self, iface: &str) -> Result<(), DatapathError> {
        if nix::net::if_::if_nametoindex(iface).is_err() {
            return Err(DatapathError::NoSuchInterface(iface.to_owned()));
        }
        let dir = self.layout.links_dir(iface);
        std::fs::create_dir_all(&dir).map_err(|source| DatapathError::Io {
            action: "creating",
            path: dir,
            source,
        })
    }

    fn attach_xdp(
        &mut self,
        iface: &str,
        mode: XdpAttachMode,
    ) -> Result<Attachment, DatapathError> {
        let name = programs::XDP;
        let pin = self.layout.link(iface, name);
        let prog: &mut Xdp = program(&mut self.ebpf, name)?;
        let attach_err = |source| DatapathError::Attach {
            program: name,
            iface: iface.to_owned(),
            source,
        };
        let swapped = swap_into_pinned_link(&pin, |link: XdpLink| {
            let id = prog.attach_to_link(link)?;
            prog.take_link(id)
        })?;
        if let Some(link) = swapped {
            return attachment(iface, name, AttachOutcome::Replaced, &link, None);
        }
        // Modes to try, in order; `Off` never gets here (see `attach`).
        let tries: &[XdpMode] = match mode {
            XdpAttachMode::Auto => &[XdpMode::Driver, XdpMode::Skb],
            XdpAttachMode::Native => &[XdpMode::Driver],
            XdpAttachMode::Generic | XdpAttachMode::Off => &[XdpMode::Skb],
        };
        let (&last, first) = tries.split_last().expect("every mode tries at least one");
        let mut native = false;
        let mut id = None;
        for &xdp_mode in first {
            match prog.attach(iface, xdp_mode) {
                Ok(link) => {
                    native = xdp_mode == XdpMode::Driver;
                    id = Some(Ok(link));
                    break;
                }
                Err(e) => {
                    tracing::info!(iface, error = %e, "native XDP refused, trying generic XDP");
                }
            }
        }
        let id = id.unwrap_or_else(|| {
            native = last == XdpMode::Driver;
            prog.attach(iface, last)
        });
        let link = FdLink::try_from(
            prog.take_link(id.map_err(attach_err)?)
                .map_err(attach_err)?,
        )
        .map_err(|e| link_pin_error(&pin, e))?;
        let pinned = link.pin(&pin)?;
        let link = FdLink::from(pinned);
        attachment(iface, name, AttachOutcome::Attached, &link, Some(native))
    }

    fn attach_tc(
        &mut self,
        iface: &str,
        name: &'static str,
        attach_type: TcAttachType,
    ) -> Result<Attachment, DatapathError> {
        let pin = self.layout.link(iface, name);
        let prog: &mut SchedClassifier = program(&mut self.ebpf, name)?;
        let attach_err = |source| DatapathError::Attach {
            program: name,
            iface: iface.to_owned(),
            source,
        };
        let swapped = swap_into_pinned_link(&pin, |link: SchedClassifierLink| {
            let id = prog.attach_to_link(link)?;
            prog.take_link(id)
        })?;
        if let Some(link) = swapped {
            return attachment(iface, name, AttachOutcome::Replaced, &link, None);
        }
        // On kernels >= 6.6 aya attaches through tcx, which gives a bpf_link we can pin; the
        // legacy netlink (cls_bpf) path cannot be pinned and is reported as an error here.
        let id = prog.attach(iface, attach_type).map_err(attach_err)?;
        let link = FdLink::try_from(prog.take_link(id).map_err(attach_err)?)
            .map_err(|e| link_pin_error(&pin, e))?;
        let link = FdLink::from(link.pin(&pin)?);
        attachment(iface, name, AttachOutcome::Attached, &link, None)
    }

    /// Detaches and unpins the link of `program` on `iface`, if there is one (a previous
    /// agent may have attached what this one is configured not to).
    fn detach_pinned(&self, iface: &str, program: &'static str) -> Result<(), DatapathError> {
        self.layout.remove_link(&self.layout.link(iface, program))
    }

    /// Detaches everything pinned under the layout and removes the pin tree (maps included).
    pub fn teardown(layout: &PinLayout) -> Result<(), DatapathError> {
        layout.remove_all()
    }
}

/// The typed program `name` of the object.
fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, DatapathError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(DatapathError::MissingProgram(name))?
        .try_into()
        .map_err(|source| DatapathError::Program {
            program: name,
            source,
        })
}

/// The link pinned at `pin`, or `None` when there is no pin.
fn open_pinned_link(pin: &Path) -> Result<Option<FdLink>, DatapathError> {
    match PinnedLink::from_pin(pin) {
        // Converting keeps the pin file: the link stays attached after our fd closes.
        Ok(link) => Ok(Some(FdLink::from(link))),
        Err(LinkError::SyscallError(SyscallError { io_error, .. }))
            if io_error.kind() == io::ErrorKind::NotFound =>
        {
            Ok(None)
        }
        Err(e) => Err(link_pin_error(pin, e)),
    }
}

/// Swaps a freshly loaded program into the link pinned at `pin`, atomically.
///
/// Returns the link, or `None` when there is no usable pinned link: no pin, a pin of another
/// link type, or a link whose interface is gone (`ENOLINK`). Unusable pins are removed so a
/// fresh attachment can take their place. Any other failure is an error and leaves the pin,
/// and the running datapath, alone.
fn swap_into_pinned_link<L, W>(
    pin: &Path,
    swap: impl FnOnce(L) -> Result<W, ProgramError>,
) -> Result<Option<FdLink>, DatapathError>
where
    L: TryFrom<FdLink, Error = LinkError>,
    FdLink: TryFrom<W, Error = LinkError>,
{
    let Some(old) = open_pinned_link(pin)? else {
        return Ok(None);
    };
    let link = match L::try_from(old) {
        Ok(link) => link,
        Err(e) => {
            remove_stale_pin(pin, &e)?;
            return Ok(None);
        }
    };
    match swap(link) {
        Ok(link) => FdLink::try_from(link)
            .map(Some)
            .map_err(|e| link_pin_error(pin, e)),
        Err(ProgramError::SyscallError(SyscallError { io_error, .. }))
            if io_error.raw_os_error() == Some(nix::libc::ENOLINK) =>
        {
            remove_stale_pin(pin, &io_error)?;
            Ok(None)
        }
        Err(e) => Err(link_pin_error(pin, e)),
    }
}

fn remove_stale_pin(pin: &Path, why: &dyn std::error::Error) -> Result<(), DatapathError> {
    tracing::warn!(pin = %pin.display(), error = %why, "pinned link unusable, re-attaching");
    std::fs::remove_file(pin).map_err(|source| DatapathError::Io {
        action: "removing",
        path: pin.to_owned(),
        source,
    })
}

fn link_pin_error(pin: &Path, e: impl std::fmt::Display) -> DatapathError {
    DatapathError::LinkPin {
        path: pin.to_owned(),
        reason: e.to_string(),
    }
}

fn attachment(
    iface: &str,
    program: &'static str,
    outcome: AttachOutcome,
    link: &FdLink,
    xdp_native: Option<bool>,
) -> Result<Attachment, DatapathError> {
    let info = link
        .info()
        .map_err(|e| link_pin_error(Path::new(iface), e))?;
    Ok(Attachment {
        iface: iface.to_owned(),
        program,
        outcome,
        link_id: info.id(),
        program_id: info.program_id(),
        xdp_native,
    })
}
