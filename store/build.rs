//! Compiles the vendored subset of etcd's v3 API (`proto/etcd`) with protox (no `protoc`
//! binary needed) into prost types and a tonic client for the etcd backend.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/etcd/rpc.proto", "proto/etcd/mvccpb/kv.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto/etcd"])?;
    tonic_prost_build::configure()
        .build_server(false)
        .compile_fds(fds)?;
    Ok(())
}
