//! Wire types, generated from `proto/` (see `build.rs`); no logic lives here.
//!
//! # Layout
//! - [`v1`]: the public API messages (mirroring chall-manager's `api.v1`
//!   challenge and instance protos), the command envelope sent over JetStream
//!   and the command result. Every message has prost (binary) encoding and
//!   pbjson serde impls giving the protobuf canonical JSON mapping (camelCase,
//!   int64 as strings, RFC 3339 timestamps, `"600s"` durations), printing
//!   unpopulated scalars, lists and maps like grpc-gateway.
//! - [`api`]: chall-manager's gRPC services and their messages (binary
//!   protobuf only), with tonic servers and clients.
//! - [`wkt`]: `Timestamp` and `FieldMask` with Go protojson's JSON form.
//! - [`FILE_DESCRIPTOR_SET`]: the compiled descriptors of `proto/`.

/// Version 1 of the wire contract.
#[allow(clippy::all, missing_debug_implementations, missing_docs)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/cm.v1.rs"));
    include!(concat!(env!("OUT_DIR"), "/cm.v1.serde.rs"));
}

/// chall-manager's gRPC API (`api.v1.challenge.ChallengeStore`,
/// `api.v1.instance.InstanceManager`): its messages with its field numbers,
/// and the tonic server traits and clients.
#[allow(clippy::all, missing_debug_implementations, missing_docs)]
pub mod api {
    pub mod v1 {
        pub mod challenge {
            include!(concat!(env!("OUT_DIR"), "/api.v1.challenge.rs"));
        }
        pub mod instance {
            include!(concat!(env!("OUT_DIR"), "/api.v1.instance.rs"));
        }
    }
}

pub mod wkt;

/// The `FileDescriptorSet` of `proto/` (protobuf binary), for code that walks
/// messages by their schema (the API's unpopulated-field printing).
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/cm_descriptor.bin"));

pub use pbjson_types;
pub use prost;
pub use tonic;
