//! Compiles `proto/` with prost (and tonic's service generator for the gRPC
//! services of `api.v1`) and generates canonical-JSON serde impls with
//! pbjson for `cm.v1`. Needs `protoc` (Debian: protobuf-compiler; `scripts/dev.sh install`).

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/cm/v1/challenge.proto",
        "proto/cm/v1/instance.proto",
        "proto/cm/v1/command.proto",
        "proto/api/v1/challenge/challenge.proto",
        "proto/api/v1/instance/instance.proto",
    ];
    for proto in &protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let descriptor_path = out_dir.join("cm_descriptor.bin");
    let mut config = prost_build::Config::new();
    config
        .file_descriptor_set_path(&descriptor_path)
        .compile_well_known_types()
        // `prost::Name`: the API finds a message's descriptor by its name.
        .enable_type_names()
        // Timestamp and FieldMask print as Go's protojson does (see src/wkt.rs);
        // the other well-known types come from pbjson-types.
        .extern_path(".google.protobuf.Timestamp", "crate::wkt::Timestamp")
        .extern_path(".google.protobuf.FieldMask", "crate::wkt::FieldMask")
        .extern_path(".google.protobuf", "::pbjson_types");
    // Messages of every file, plus the gRPC services of `api.v1` (server and
    // client; `cm.v1` has none).
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_with_config(config, &protos, &["proto"])
        .map_err(|e| format!("protoc failed (install it with `scripts/dev.sh install`): {e}"))?;
    let descriptors = std::fs::read(descriptor_path)?;
    pbjson_build::Builder::new()
        .register_descriptors(&descriptors)?
        .ignore_unknown_fields()
        // Like grpc-gateway's marshaler (protojson EmitUnpopulated): scalars,
        // lists and maps are printed even when empty. Unset message fields
        // are added as `null` by the API (it holds the descriptors).
        .emit_fields()
        .build(&[".cm"])?;
    Ok(())
}
