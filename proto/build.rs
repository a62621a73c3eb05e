//! Generates the agent API's messages, client and server from
//! agent.proto, and the CRI client from cri.proto (needs `protoc`,
//! Debian's protobuf-compiler).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=agent.proto");
    println!("cargo:rerun-if-changed=cri.proto");
    tonic_prost_build::compile_protos("agent.proto")?;
    tonic_prost_build::configure()
        .build_server(false)
        .compile_protos(&["cri.proto"], &["."])?;
    Ok(())
}
