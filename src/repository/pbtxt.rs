//! Protobuf text format, read against satwatch's copy of Triton's schema.
//!
//! prost-reflect parses the text format strictly (unknown fields are errors,
//! which is what we want) but rejects the colon-less list form
//! `input [ { ... } ]` that Triton's own examples use and that the text format
//! allows for message fields. [`normalise_lists`] inserts the colon before
//! parsing, without adding or removing newlines, so line numbers in errors still
//! point into the user's file.

use miette::Diagnostic;
use prost_reflect::{DescriptorPool, DynamicMessage};
use std::sync::OnceLock;

/// The generated ModelConfig types (`proto/model_config.proto`).
pub mod inference {
    include!(concat!(env!("OUT_DIR"), "/inference.rs"));
}

static DESCRIPTORS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/model_config.bin"));

fn pool() -> &'static DescriptorPool {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    POOL.get_or_init(|| {
        DescriptorPool::decode(DESCRIPTORS).expect("build.rs wrote a valid descriptor set")
    })
}

/// A text-format error located in the source text.
#[derive(Debug, Clone, PartialEq)]
pub struct TextFormatError {
    /// 1-based line of the offending token, when the parser reported one.
    pub line: Option<usize>,
    pub reason: String,
}

/// Parses `text` as an `inference.ModelConfig`.
pub fn parse_model_config(text: &str) -> Result<inference::ModelConfig, TextFormatError> {
    let descriptor = pool()
        .get_message_by_name("inference.ModelConfig")
        .expect("the schema defines inference.ModelConfig");
    let normalised = normalise_lists(text);
    let message = DynamicMessage::parse_text_format(descriptor, &normalised).map_err(|err| {
        let line = err
            .labels()
            .and_then(|mut labels| labels.next())
            .map(|label| line_of(&normalised, label.offset()));
        TextFormatError {
            line,
            reason: err.to_string(),
        }
    })?;
    message
        .transcode_to::<inference::ModelConfig>()
        .map_err(|err| TextFormatError {
            line: None,
            reason: err.to_string(),
        })
}

/// 1-based line number of a byte offset.
pub fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// Rewrites `name [` as `name: [` outside strings and comments.
fn normalise_lists(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 16);
    let mut chars = text.chars().peekable();
    // The last significant token was an identifier (a field name candidate).
    let mut after_ident = false;
    while let Some(c) = chars.next() {
        match c {
            '#' => {
                out.push(c);
                for c in chars.by_ref() {
                    out.push(c);
                    if c == '\n' {
                        break;
                    }
                }
                after_ident = false;
            }
            '"' | '\'' => {
                out.push(c);
                let quote = c;
                while let Some(c) = chars.next() {
                    out.push(c);
                    if c == '\\' {
                        if let Some(escaped) = chars.next() {
                            out.push(escaped);
                        }
                    } else if c == quote {
                        break;
                    }
                }
                after_ident = false;
            }
            '[' if after_ident => {
                out.push_str(": [");
                after_ident = false;
            }
            c if c.is_ascii_alphanumeric() || c == '_' => {
                out.push(c);
                // Identifiers start with a letter or '_'; digits continue one.
                after_ident = true;
            }
            c if c.is_whitespace() => out.push(c),
            c => {
                out.push(c);
                after_ident = false;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colon_less_lists_get_a_colon_and_keep_their_lines() {
        let text = "input [\n  { name: \"a [b\" }\n]\ndims: [ 1 ]\n# x [\n";
        let normalised = normalise_lists(text);
        assert_eq!(
            normalised,
            "input : [\n  { name: \"a [b\" }\n]\ndims: [ 1 ]\n# x [\n"
        );
    }

    #[test]
    fn parses_triton_style_config() {
        let config = parse_model_config(
            "name: \"m\"\nmax_batch_size: 8\ninput [ { name: \"window\" data_type: TYPE_FP32 dims: [ 4, 2 ] } ]\n\
             parameters { key: \"k\" value: { string_value: \"v\" } }\n",
        )
        .unwrap();
        assert_eq!(config.name, "m");
        assert_eq!(config.input[0].dims, vec![4, 2]);
        assert_eq!(config.parameters["k"].string_value, "v");
    }

    #[test]
    fn unknown_field_is_refused_with_its_line() {
        let err = parse_model_config("name: \"m\"\n\nmax_batch_sise: 8\n").unwrap_err();
        assert_eq!(err.line, Some(3));
        assert!(err.reason.contains("max_batch_sise"), "{}", err.reason);
    }
}
