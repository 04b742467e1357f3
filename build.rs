//! Compiles proto/ with protox, a protobuf compiler written in Rust, so building the
//! crate never needs a `protoc` binary on the machine.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(["proto/redpacket.proto"], ["proto"])?;
    prost_build::Config::new().compile_fds(descriptors)?;
    Ok(())
}
