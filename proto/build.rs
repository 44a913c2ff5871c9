//! Compiles `proto/**/*.proto` with protox (a protobuf compiler in Rust, so no `protoc`
//! binary is needed on the build machine) and generates prost types and tonic stubs.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/vpc/v1/common.proto",
        "proto/vpc/v1/compute.proto",
        "proto/vpc/v1/datapath.proto",
        "proto/vpc/v1/flowlogs.proto",
        "proto/vpc/v1/host.proto",
        "proto/vpc/v1/lb.proto",
        "proto/vpc/v1/network.proto",
        "proto/vpc/v1/security.proto",
        "proto/vpc/v1/trace.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    // The encoded descriptors, for the reflection service.
    std::fs::write(
        out.join("vpc_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
