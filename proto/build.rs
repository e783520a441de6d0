//! Generates the vigil.v1 messages and the Ingest service from proto/vigil/v1/*.proto.
//! Needs `protoc` (Debian's protobuf-compiler; `cargo xtask setup` installs it) or PROTOC set.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo::rerun-if-changed=vigil/v1");
    tonic_prost_build::configure().compile_protos(&["vigil/v1/ingest.proto"], &["."])?;
    Ok(())
}
