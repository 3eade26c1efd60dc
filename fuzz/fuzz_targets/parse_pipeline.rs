//! Any text, as a pipeline file: validated or refused with a reason, never a panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use satwatch::config::Pipeline;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(pipeline) = Pipeline::parse(text, Path::new("fuzz.toml")) {
            assert!(
                !pipeline.channels.is_empty(),
                "a valid pipeline has channels"
            );
        }
    }
});
