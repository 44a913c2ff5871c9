//! Compiles `proto/**/*.proto` with protox (a protobuf compiler in Rust, so no `protoc`
//! binary is needed on the build machine) and generates prost types and tonic stubs.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/vpc/v1/datapath.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
