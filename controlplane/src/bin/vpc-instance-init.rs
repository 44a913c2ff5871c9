//! `vpc-instance-init`: an instance's first process, started by the compute agent's runtime.
//! It sets up the instance's namespaces, cgroups and root file system and becomes (through a
//! fork) PID 1 of the instance; see `controlplane::compute::runtime::init`.

fn main() {
    std::process::exit(controlplane::compute::runtime::init::main());
}
