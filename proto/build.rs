//! Generates the agent API's messages, client and server from
//! agent.proto (needs `protoc`, Debian's protobuf-compiler).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=agent.proto");
    tonic_prost_build::compile_protos("agent.proto")?;
    Ok(())
}
