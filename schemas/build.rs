//! Compiles `proto/` with prost and generates canonical-JSON serde impls with
//! pbjson. Needs `protoc` (Debian: protobuf-compiler; `scripts/dev.sh install`).

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/cm/v1/challenge.proto",
        "proto/cm/v1/instance.proto",
        "proto/cm/v1/command.proto",
    ];
    for proto in &protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let descriptor_path = out_dir.join("cm_descriptor.bin");
    prost_build::Config::new()
        .file_descriptor_set_path(&descriptor_path)
        .compile_well_known_types()
        .extern_path(".google.protobuf", "::pbjson_types")
        .compile_protos(&protos, &["proto"])
        .map_err(|e| format!("protoc failed (install it with `scripts/dev.sh install`): {e}"))?;
    let descriptors = std::fs::read(descriptor_path)?;
    pbjson_build::Builder::new()
        .register_descriptors(&descriptors)?
        .ignore_unknown_fields()
        .build(&[".cm"])?;
    Ok(())
}
