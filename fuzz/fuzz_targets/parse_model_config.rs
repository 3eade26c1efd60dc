//! Any text, as a Triton config.pbtxt: parsed or refused with a reason, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use satwatch::repository::pbtxt::parse_model_config;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Err(err) = parse_model_config(text) {
            if let Some(line) = err.line {
                assert!(
                    line >= 1 && line <= text.lines().count().max(1) + 1,
                    "the line is inside the text"
                );
            }
        }
    }
});
