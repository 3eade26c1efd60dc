//! Any bytes, as a telemetry record: decoded or refused with a reason, never a panic.
#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use satwatch::telemetry::{ChannelShape, Decoder};

fuzz_target!(|data: &[u8]| {
    let mut channels = HashMap::new();
    channels.insert(
        "A-1".to_string(),
        ChannelShape {
            index: 0,
            topic: "telemetry.acs".into(),
            features: 25,
        },
    );
    channels.insert(
        "E-2".to_string(),
        ChannelShape {
            index: 1,
            topic: "telemetry.eps".into(),
            features: 3,
        },
    );
    let decoder = Decoder::new(channels, 64 * 1024);
    match decoder.decode(
        Some(data),
        Some("telemetry.acs"),
        chrono::DateTime::UNIX_EPOCH,
    ) {
        Ok(sample) => {
            assert!(
                sample.values.iter().all(|v| v.is_finite()),
                "decoded values are finite"
            );
            assert_eq!(sample.values.len(), 25, "decoded arity matches the channel");
        }
        Err(rejection) => assert!(!rejection.reason.code().is_empty()),
    }
});
