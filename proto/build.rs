//! Generates the vigil.v1 messages and the Ingest, Query and Alerts services from
//! proto/vigil/v1/*.proto.
//! Needs `protoc` (Debian's protobuf-compiler; `cargo xtask setup` installs it) or PROTOC set.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo::rerun-if-changed=vigil/v1");
    tonic_prost_build::configure()
        // Boxed: a DeltaBlock is a dozen byte columns, and every Batch (and WAL record) would
        // otherwise carry its room inline whether or not it is delta-coded.
        .boxed(".vigil.v1.Batch.delta")
        .compile_protos(
            &[
                "vigil/v1/ingest.proto",
                "vigil/v1/query.proto",
                "vigil/v1/alerts.proto",
            ],
            &["."],
        )?;
    Ok(())
}
