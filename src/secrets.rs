//! Secrets kept out of messages. A setting whose name suggests a secret may
//! be misspelt (`sasl.pasword`) or hold a bad value, and the error that
//! says so (from the pipeline file's parser, or from librdkafka, which
//! quotes the property's value) would print the secret with it. Every such
//! message passes through [`mask`] first.

use std::collections::BTreeMap;

/// What a masked value reads as.
pub const MASK: &str = "***";

/// Whether a setting's name suggests that its value is a secret: it
/// mentions a password (or a misspelling of one: `pass`, `pwd`), a secret,
/// a token, a key, a credential, or SASL, whose properties carry
/// credentials and are easily misspelt. Case is ignored. Erring towards
/// masking costs a message a value; the other way costs a secret.
pub fn suggests_secret(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    [
        "pass",
        "pwd",
        "secret",
        "token",
        "key",
        "sasl",
        "credential",
        "private",
    ]
    .iter()
    .any(|hint| name.contains(hint))
}

/// `message` with the value of every setting in `settings` whose name
/// [`suggests_secret`] replaced by [`MASK`]. Longer values are masked
/// first (one may contain another). A value shorter than four characters is
/// masked only where it stands as a whole word, so that masking it does not
/// eat every occurrence of its letters in the message.
pub fn mask<'a>(message: &str, settings: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut secrets: Vec<&str> = settings
        .into_iter()
        .filter(|(name, value)| !value.is_empty() && suggests_secret(name))
        .map(|(_, value)| value)
        .collect();
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    secrets.dedup();
    let mut masked = message.to_owned();
    for secret in secrets {
        masked = if secret.chars().count() >= 4 {
            masked.replace(secret, MASK)
        } else {
            replace_whole_words(&masked, secret)
        };
    }
    masked
}

/// `text` with each occurrence of `word` not joined to a letter, digit or
/// `_` on either side replaced by [`MASK`].
fn replace_whole_words(text: &str, word: &str) -> String {
    let joined = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(word) {
        let before = rest[..at]
            .chars()
            .next_back()
            .or_else(|| out.chars().next_back());
        let after = rest[at + word.len()..].chars().next();
        out.push_str(&rest[..at]);
        if joined(before) || joined(after) {
            out.push_str(word);
        } else {
            out.push_str(MASK);
        }
        rest = &rest[at + word.len()..];
    }
    out.push_str(rest);
    out
}

/// What to print for an error from making a Kafka client whose extra
/// properties are `client` (the pipeline's `[kafka.client]`): librdkafka
/// quotes the value of an unknown or invalid property (`Client config
/// error: No such configuration property: "sasl.pasword" sasl.pasword
/// hunter2`), and names a bad `sasl.mechanism` value as it was given.
pub fn mask_client_error(err: &dyn std::fmt::Display, client: &BTreeMap<String, String>) -> String {
    mask(
        &err.to_string(),
        client.iter().map(|(k, v)| (k.as_str(), v.as_str())),
    )
}

/// The values in a pipeline file (TOML) that belong to settings whose name
/// [`suggests_secret`], as a parser's message could quote them: each
/// scalar under such a key, as written and as read. Line by line as well as
/// through the parsed tree, so a file that does not parse is covered too.
pub fn secrets_in_toml(text: &str) -> Vec<(String, String)> {
    let mut found = Vec::new();
    if let Ok(table) = text.parse::<toml::Table>() {
        collect_table(&table, &mut found);
    }
    for line in text.lines() {
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let key = key.trim().trim_matches(['"', '\'']);
        if !suggests_secret(key) {
            continue;
        }
        let value = value.trim();
        let value = match value.chars().next() {
            Some(quote @ ('"' | '\'')) => {
                let inner = &value[1..];
                inner.find(quote).map_or(inner, |end| &inner[..end])
            }
            _ => value.split('#').next().unwrap_or_default().trim(),
        };
        found.push((key.to_owned(), value.to_owned()));
    }
    found
}

fn collect_table(table: &toml::Table, found: &mut Vec<(String, String)>) {
    for (key, value) in table {
        if suggests_secret(key) {
            collect_scalars(key, value, found);
        } else if let toml::Value::Table(inner) = value {
            collect_table(inner, found);
        }
    }
}

fn collect_scalars(key: &str, value: &toml::Value, found: &mut Vec<(String, String)>) {
    match value {
        toml::Value::String(s) => found.push((key.to_owned(), s.clone())),
        toml::Value::Array(items) => items
            .iter()
            .for_each(|item| collect_scalars(key, item, found)),
        toml::Value::Table(inner) => inner
            .values()
            .for_each(|item| collect_scalars(key, item, found)),
        other => found.push((key.to_owned(), other.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_suggest_a_secret() {
        for name in [
            "sasl.password",
            "sasl.pasword",
            "sasl.mechanism",
            "sasl.username",
            "SASL.Password",
            "ssl.key.password",
            "ssl.key.pem",
            "ssl_keystore_pasword",
            "sasl.oauthbearer.client.secret",
            "control_token",
            "api-key",
            "passwd",
            "db_pwd",
        ] {
            assert!(suggests_secret(name), "{name}");
        }
        for name in [
            "bootstrap.servers",
            "security.protocol",
            "linger.ms",
            "acks",
        ] {
            assert!(!suggests_secret(name), "{name}");
        }
    }

    #[test]
    fn the_values_of_secret_settings_are_masked_wherever_they_appear() {
        let settings = [
            ("sasl.pasword", "hunter2-long"),
            ("sasl.mechanism", "SCRAM-BOGUS"),
            ("security.protocol", "sasl_plaintext"),
            ("ssl.key.password", "abc"),
        ];
        let message = "Client config error: No such configuration property: \
             \"sasl.pasword\" sasl.pasword hunter2-long; Unsupported SASL mechanism: \
             SCRAM-BOGUS; key abc, not abcd; protocol sasl_plaintext";
        assert_eq!(
            mask(message, settings),
            "Client config error: No such configuration property: \
             \"sasl.pasword\" sasl.pasword ***; Unsupported SASL mechanism: \
             ***; key ***, not abcd; protocol sasl_plaintext"
        );
        assert_eq!(mask("nothing to hide", settings), "nothing to hide");
        assert_eq!(mask("abc", settings), "***");
        assert_eq!(
            mask("x", [("sasl.password", "")]),
            "x",
            "an empty value hides nothing"
        );
    }

    #[test]
    fn a_value_inside_a_longer_one_is_masked_after_it() {
        let settings = [("token", "hunter2"), ("sasl.password", "hunter2hunter2")];
        assert_eq!(
            mask("got hunter2hunter2 and hunter2", settings),
            "got *** and ***"
        );
    }

    #[test]
    fn secrets_are_found_in_a_pipeline_file_parsed_or_not() {
        let text = r#"
[kafka]
brokers = "b:9092"
[kafka.client]
"sasl.pasword" = "hunter2"
"ssl.key.password" = 123456 # a PIN
"linger.ms" = "5"
[repository]
control_token = 'tok-en'
"#;
        let values: Vec<String> = secrets_in_toml(text).into_iter().map(|(_, v)| v).collect();
        for secret in ["hunter2", "123456", "tok-en"] {
            assert!(values.iter().any(|v| v == secret), "{secret}: {values:?}");
        }
        assert!(!values.iter().any(|v| v == "5"), "{values:?}");
        let broken = "[kafka.client]\n\"sasl.password\" = \"hunter2\nbrokers = ";
        let values: Vec<String> = secrets_in_toml(broken)
            .into_iter()
            .map(|(_, v)| v)
            .collect();
        assert!(values.iter().any(|v| v == "hunter2"), "{values:?}");
    }

    /// The clients satwatch makes, refused for their properties: the
    /// message as `satwatch run` printed it quotes the secret; masked, it
    /// names the property and not its value.
    #[cfg(feature = "kafka")]
    #[test]
    fn misspelt_or_invalid_secret_properties_are_masked_in_client_errors() {
        use rdkafka::{admin::AdminClient, client::DefaultClientContext, consumer::BaseConsumer};

        use crate::{
            config::Pipeline,
            kafka::{
                client::{client_config, consumer_config},
                DeadLetters, Publisher,
            },
        };

        let cases = [
            (
                r#""sasl.pasword" = "hunter2-a""#,
                "hunter2-a",
                "sasl.pasword",
            ),
            (r#""sasl.password" = "hunter2-b""#, "", "sasl.password"),
            (
                r#""ssl.key.pasword" = "hunter2-c""#,
                "hunter2-c",
                "ssl.key.pasword",
            ),
            (
                "\"security.protocol\" = \"sasl_plaintext\"\n\"sasl.mechanism\" = \"HUNTER2-D\"",
                "HUNTER2-D",
                "SASL mechanism",
            ),
        ];
        for (properties, secret, named) in cases {
            let text = format!(
                "[kafka]\nbrokers = \"127.0.0.1:1\"\n[kafka.client]\n{properties}\n\
                 [repository]\npath = \"m\"\n[channels]\nids = [\"A-1\"]\n[subsystems]\nA = \"acs\"\n"
            );
            let pipeline = Pipeline::parse(&text, std::path::Path::new("p.toml")).unwrap();
            let settings = &pipeline.file.kafka;
            let errors = [
                Publisher::new(settings, "satwatch-test")
                    .err()
                    .map(|e| e.to_string()),
                DeadLetters::new(settings).err().map(|e| e.to_string()),
                consumer_config(settings, "satwatch-test")
                    .create::<BaseConsumer>()
                    .err()
                    .map(|e| e.to_string()),
                client_config(settings)
                    .create::<AdminClient<DefaultClientContext>>()
                    .err()
                    .map(|e| e.to_string()),
            ];
            for (client, error) in ["producer", "dead letters", "consumer", "admin"]
                .iter()
                .zip(errors)
            {
                if secret.is_empty() {
                    // A well-spelt property is accepted: nothing to print.
                    assert!(error.is_none(), "{client}: {error:?}");
                    continue;
                }
                let error = error.unwrap_or_else(|| panic!("{client}: {properties} is refused"));
                let shown = mask_client_error(&error, &settings.client);
                assert!(
                    !shown.contains(secret) && shown.contains(named),
                    "{client}: {properties}: {shown}"
                );
            }
        }
    }
}
