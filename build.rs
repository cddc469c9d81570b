//! Generates the gRPC code for the SPIFFE Workload API and tessera's own services.
//!
//! No protoc is needed on the machine: the vendored one is used unless `PROTOC` names another.

use std::path::PathBuf;

#[allow(unsafe_code)]
fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        // SAFETY: build scripts are single-threaded; nothing else reads the environment yet.
        unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let includes = [PathBuf::from("proto"), protoc_bin_vendored::include_path()?];

    // The Workload API has no package; give its generated file a stable name. Its streams are
    // long-lived too (small codec buffers, as for SDS below).
    let mut config = tonic_prost_build::Config::new();
    config.default_package_filename("workload");
    tonic_prost_build::configure()
        .codec_path("crate::proto::SmallBufferCodec")
        .build_client(true)
        .build_server(true)
        .file_descriptor_set_path(out_dir.join("workload_descriptor.bin"))
        .compile_with_config(config, &[PathBuf::from("proto/workload.proto")], &includes)?;

    // tessera's own services, package tessera.v1. Messages carrying a join token get a
    // hand-written Debug (in src/lib.rs) that leaves the token out.
    tonic_prost_build::configure()
        .skip_debug([".tessera.v1.JoinToken", ".tessera.v1.JoinTokenAttestation"])
        .build_client(true)
        .build_server(true)
        .file_descriptor_set_path(out_dir.join("tessera_descriptor.bin"))
        .compile_protos(
            &[
                PathBuf::from("proto/tessera/v1/node.proto"),
                PathBuf::from("proto/tessera/v1/admin.proto"),
                PathBuf::from("proto/tessera/v1/events.proto"),
                PathBuf::from("proto/tessera/v1/tasks.proto"),
            ],
            &includes,
        )?;

    // Envoy's Secret Discovery Service, served on the workload socket: only the messages and
    // fields it uses, numbered as in Envoy's API (see the files' headers). A TlsCertificate
    // holds a private key: its Debug is hand-written (src/lib.rs) and leaves the key out.
    // Its streams are long-lived and bidirectional, so their codec buffers live as long as they
    // do: they use the small ones of `proto::SmallBufferCodec`.
    tonic_prost_build::configure()
        .skip_debug([".envoy.extensions.transport_sockets.tls.v3.TlsCertificate"])
        .codec_path("crate::proto::SmallBufferCodec")
        .build_client(true)
        .build_server(true)
        .compile_protos(
            &[
                PathBuf::from("proto/google/rpc/status.proto"),
                PathBuf::from("proto/envoy/config/core/v3/core.proto"),
                PathBuf::from("proto/envoy/service/discovery/v3/discovery.proto"),
                PathBuf::from("proto/envoy/extensions/transport_sockets/tls/v3/tls.proto"),
                PathBuf::from("proto/envoy/service/secret/v3/sds.proto"),
            ],
            &includes,
        )?;

    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-env-changed=PROTOC");
    Ok(())
}
