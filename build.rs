//! Compiles the protobuf schemas with protox, a pure-Rust protobuf compiler, so
//! no `protoc` is needed:
//!
//! - `proto/model_config.proto`: the subset of Triton's ModelConfig that
//!   satwatch reads. Its encoded descriptor set is written next to the
//!   generated types because the text-format parser works on descriptors at run
//!   time.
//! - `proto/onnx.proto`: the subset of ONNX's model format that the native and
//!   CUDA backends decode (binary protobuf, so the generated types suffice).

use std::{env, fs, path::PathBuf};

use prost::Message;

fn main() {
    println!("cargo:rerun-if-changed=proto/model_config.proto");
    println!("cargo:rerun-if-changed=proto/onnx.proto");
    let descriptors = protox::compile(["model_config.proto"], ["proto"])
        .expect("proto/model_config.proto must compile");
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    // prost-build's compile_fds ignores file_descriptor_set_path, so write it ourselves.
    fs::write(
        out_dir.join("model_config.bin"),
        descriptors.encode_to_vec(),
    )
    .expect("OUT_DIR is writable");
    prost_build::Config::new()
        .compile_fds(descriptors)
        .expect("prost-build generates the ModelConfig types");

    let onnx = protox::compile(["onnx.proto"], ["proto"]).expect("proto/onnx.proto must compile");
    prost_build::Config::new()
        .compile_fds(onnx)
        .expect("prost-build generates the ONNX types");
}
