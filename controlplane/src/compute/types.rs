//! Instance types: the EC2 names users know, and the cgroup limits each one means here.
//!
//! An instance is a set of namespaces, not a VM: its "vCPUs" are a CPU-time quota (CFS
//! bandwidth: `vcpus` CPUs' worth of time per period, so a 2-vCPU instance on a 2-core host
//! can use the whole host), its memory a hard limit, and it gets a bounded number of tasks so
//! one instance cannot fork-bomb its host. Burstable (t3) CPU credits are not modelled: the
//! quota is the full vCPU count.

/// One instance type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InstanceType {
    /// EC2 name, e.g. `t3.micro`.
    pub name: &'static str,
    /// CPUs' worth of CPU time per scheduling period.
    pub vcpus: u32,
    /// Memory limit in MiB.
    pub memory_mib: u64,
}

/// The default type of RunInstances.
pub const DEFAULT: &str = "t3.micro";

/// Tasks (processes and threads) an instance may have at once, whatever its type.
pub const PIDS_MAX: u32 = 4096;

/// The types RunInstances accepts.
pub const TYPES: &[InstanceType] = &[
    InstanceType {
        name: "t3.nano",
        vcpus: 2,
        memory_mib: 512,
    },
    InstanceType {
        name: "t3.micro",
        vcpus: 2,
        memory_mib: 1024,
    },
    InstanceType {
        name: "t3.small",
        vcpus: 2,
        memory_mib: 2048,
    },
    InstanceType {
        name: "t3.medium",
        vcpus: 2,
        memory_mib: 4096,
    },
    InstanceType {
        name: "t3.large",
        vcpus: 2,
        memory_mib: 8192,
    },
    InstanceType {
        name: "t3.xlarge",
        vcpus: 4,
        memory_mib: 16384,
    },
    InstanceType {
        name: "t3.2xlarge",
        vcpus: 8,
        memory_mib: 32768,
    },
    InstanceType {
        name: "m5.large",
        vcpus: 2,
        memory_mib: 8192,
    },
    InstanceType {
        name: "m5.xlarge",
        vcpus: 4,
        memory_mib: 16384,
    },
    InstanceType {
        name: "m5.2xlarge",
        vcpus: 8,
        memory_mib: 32768,
    },
    InstanceType {
        name: "c5.large",
        vcpus: 2,
        memory_mib: 4096,
    },
    InstanceType {
        name: "c5.xlarge",
        vcpus: 4,
        memory_mib: 8192,
    },
    InstanceType {
        name: "c5.2xlarge",
        vcpus: 8,
        memory_mib: 16384,
    },
];

/// The type called `name`.
pub fn lookup(name: &str) -> Option<&'static InstanceType> {
    TYPES.iter().find(|t| t.name == name)
}

/// The type called `name`, else the default one (a document from a newer control plane may
/// name a type this agent does not know yet).
pub fn lookup_or_default(name: &str) -> &'static InstanceType {
    lookup(name)
        .or_else(|| lookup(DEFAULT))
        .expect("DEFAULT is one of TYPES (tested)")
}

/// The names, comma-separated (for error messages).
pub fn names() -> String {
    TYPES.iter().map(|t| t.name).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_and_default() {
        assert_eq!(lookup("t3.micro").unwrap().memory_mib, 1024);
        assert_eq!(lookup("c5.xlarge").unwrap().vcpus, 4);
        assert!(lookup("t3.huge").is_none());
        assert!(lookup(DEFAULT).is_some());
        assert_eq!(lookup_or_default("t3.huge").name, DEFAULT);
        assert!(names().starts_with("t3.nano, t3.micro"));
    }

    #[test]
    fn names_are_unique() {
        let mut n: Vec<_> = TYPES.iter().map(|t| t.name).collect();
        n.sort_unstable();
        n.dedup();
        assert_eq!(n.len(), TYPES.len());
    }
}
