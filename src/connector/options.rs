//! The WITH options each connector accepts, as Flink names them, and their validation.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::sql::error::{sqlstate, SqlError, SqlResult};

#[derive(Debug, Clone, Copy)]
enum Kind {
    Text,
    Integer,
    Boolean,
    Duration,
    OneOf(&'static [&'static str]),
}

#[derive(Debug, Clone, Copy)]
struct OptionSpec {
    key: &'static str,
    required: bool,
    kind: Kind,
}

const fn opt(key: &'static str, kind: Kind) -> OptionSpec {
    OptionSpec {
        key,
        required: false,
        kind,
    }
}

const fn required(key: &'static str, kind: Kind) -> OptionSpec {
    OptionSpec {
        required: true,
        ..opt(key, kind)
    }
}

/// A connector's options: fixed keys (in groups connectors share), plus key prefixes
/// passed through (`properties.*`).
struct ConnectorSpec {
    name: &'static str,
    options: &'static [&'static [OptionSpec]],
    prefixes: &'static [&'static str],
}

impl ConnectorSpec {
    fn options(&self) -> impl Iterator<Item = &OptionSpec> {
        self.options.iter().flat_map(|group| group.iter())
    }
}

const FORMATS: &[&str] = &["json", "csv", "raw", "debezium-json"];
const IDLE_TIMEOUT: OptionSpec = opt("scan.watermark.idle-timeout", Kind::Duration);
const TIMESTAMP_STANDARDS: Kind = Kind::OneOf(&["SQL", "ISO-8601"]);

/// How records are parsed (and bad ones treated), for connectors that read them.
const RECORDS: &[OptionSpec] = &[
    opt("csv.field-delimiter", Kind::Text),
    opt("csv.ignore-parse-errors", Kind::Boolean),
    opt("json.ignore-parse-errors", Kind::Boolean),
    opt("json.timestamp-format.standard", TIMESTAMP_STANDARDS),
    opt("debezium-json.schema-include", Kind::Boolean),
    opt("debezium-json.ignore-parse-errors", Kind::Boolean),
    opt(
        "debezium-json.timestamp-format.standard",
        TIMESTAMP_STANDARDS,
    ),
    IDLE_TIMEOUT,
];

/// Reading a Kafka topic, beyond where to start.
const KAFKA_READ: &[OptionSpec] = &[
    opt("scan.topic-partition-discovery.interval", Kind::Duration),
    opt(
        "scan.bounded.mode",
        Kind::OneOf(&["unbounded", "latest-offset"]),
    ),
];

/// Writing a Kafka topic.
const KAFKA_WRITE: &[OptionSpec] = &[
    opt(
        "sink.delivery-guarantee",
        Kind::OneOf(&["none", "at-least-once", "exactly-once"]),
    ),
    opt(
        "sink.exactly-once.mode",
        Kind::OneOf(&["transactional", "write-ahead"]),
    ),
    opt("sink.transactional-id-prefix", Kind::Text),
];

const CONNECTORS: &[ConnectorSpec] = &[
    ConnectorSpec {
        name: "filesystem",
        options: &[
            &[
                required("path", Kind::Text),
                required("format", Kind::OneOf(FORMATS)),
                opt("source.monitor-interval", Kind::Duration),
            ],
            RECORDS,
        ],
        prefixes: &[],
    },
    ConnectorSpec {
        name: "datagen",
        options: &[&[
            opt("rows-per-second", Kind::Integer),
            opt("number-of-rows", Kind::Integer),
            // Undocumented: fixes the random values, for tests.
            opt("seed", Kind::Integer),
            IDLE_TIMEOUT,
        ]],
        prefixes: &["fields."],
    },
    ConnectorSpec {
        name: "kafka",
        options: &[
            &[
                opt("topic", Kind::Text),
                opt("topic-pattern", Kind::Text),
                required("properties.bootstrap.servers", Kind::Text),
                opt("properties.group.id", Kind::Text),
                opt(
                    "scan.startup.mode",
                    Kind::OneOf(&[
                        "earliest-offset",
                        "latest-offset",
                        "group-offsets",
                        "timestamp",
                        "specific-offsets",
                    ]),
                ),
                opt("scan.startup.specific-offsets", Kind::Text),
                opt("scan.startup.timestamp-millis", Kind::Integer),
                opt("format", Kind::OneOf(FORMATS)),
                opt("value.format", Kind::OneOf(FORMATS)),
                opt("key.format", Kind::OneOf(FORMATS)),
                opt("key.fields", Kind::Text),
                opt("value.fields-include", Kind::OneOf(&["ALL", "EXCEPT_KEY"])),
                opt(
                    "sink.partitioner",
                    Kind::OneOf(&["default", "fixed", "round-robin"]),
                ),
            ],
            KAFKA_READ,
            KAFKA_WRITE,
            RECORDS,
        ],
        prefixes: &["properties."],
    },
    ConnectorSpec {
        name: "upsert-kafka",
        options: &[
            &[
                required("topic", Kind::Text),
                required("properties.bootstrap.servers", Kind::Text),
                required("key.format", Kind::OneOf(&["json", "csv", "raw"])),
                required("value.format", Kind::OneOf(&["json", "csv", "raw"])),
                opt("value.fields-include", Kind::OneOf(&["ALL", "EXCEPT_KEY"])),
            ],
            KAFKA_READ,
            KAFKA_WRITE,
            RECORDS,
        ],
        prefixes: &["properties."],
    },
    ConnectorSpec {
        name: "blackhole",
        options: &[&[opt("latency.column", Kind::Text)]],
        prefixes: &[],
    },
    ConnectorSpec {
        name: "print",
        options: &[&[
            opt("print-identifier", Kind::Text),
            opt("standard-error", Kind::Boolean),
        ]],
        prefixes: &[],
    },
    ConnectorSpec {
        name: "nexmark",
        options: &[&[
            required("nexmark.table", Kind::OneOf(&["person", "auction", "bid"])),
            opt("nexmark.event.num", Kind::Integer),
            opt("nexmark.events-per-second", Kind::Integer),
            opt("nexmark.first-event-rate", Kind::Integer),
            opt("nexmark.max-out-of-orderness", Kind::Duration),
            opt("nexmark.out-of-order-group-size", Kind::Integer),
            opt("nexmark.base-time", Kind::Integer),
            opt("nexmark.hot-auction-ratio", Kind::Integer),
            opt("nexmark.hot-seller-ratio", Kind::Integer),
            opt("nexmark.hot-bidder-ratio", Kind::Integer),
            opt("nexmark.num-active-people", Kind::Integer),
            opt("nexmark.num-in-flight-auctions", Kind::Integer),
            IDLE_TIMEOUT,
        ]],
        prefixes: &[],
    },
];

/// The connectors `'connector' = '...'` may name.
pub fn connector_names() -> Vec<&'static str> {
    CONNECTORS.iter().map(|c| c.name).collect()
}

/// Checks WITH options against the named connector's specification. Without a
/// `connector` option the table is Weir's own log, which takes no options.
pub fn validate(options: &BTreeMap<String, String>) -> SqlResult<()> {
    let Some(name) = options.get("connector") else {
        // Weir's own log is a source like any other: it may go idle.
        return match options.keys().find(|k| *k != IDLE_TIMEOUT.key) {
            None => match options.get(IDLE_TIMEOUT.key) {
                Some(value) => check_value("log", &IDLE_TIMEOUT, value),
                None => Ok(()),
            },
            Some(key) => Err(invalid(format!(
                "option '{key}' needs a connector; add 'connector' = '...' (one of {}) \
                 or drop the WITH clause for a table stored in Weir's own log",
                connector_names().join(", ")
            ))),
        };
    };
    let spec = CONNECTORS.iter().find(|c| c.name == name).ok_or_else(|| {
        invalid(format!(
            "unknown connector '{name}'; valid connectors are: {}",
            connector_names().join(", ")
        ))
    })?;
    for (key, value) in options.iter().filter(|(k, _)| k.as_str() != "connector") {
        match spec.options().find(|o| o.key == key) {
            Some(option) => check_value(spec.name, option, value)?,
            None if spec
                .prefixes
                .iter()
                .any(|p| key.starts_with(p) && key.len() > p.len()) => {}
            None => return Err(invalid(unknown_option(spec, key))),
        }
    }
    for option in spec.options().filter(|o| o.required) {
        if !options.contains_key(option.key) {
            return Err(invalid(format!(
                "connector '{}' needs option '{}'; add it to the WITH clause",
                spec.name, option.key
            )));
        }
    }
    if spec.name == "kafka"
        && options.contains_key("topic") == options.contains_key("topic-pattern")
    {
        return Err(invalid(
            "connector 'kafka' needs exactly one of 'topic' or 'topic-pattern'",
        ));
    }
    Ok(())
}

fn unknown_option(spec: &ConnectorSpec, key: &str) -> String {
    let mut valid: Vec<String> = spec.options().map(|o| format!("'{}'", o.key)).collect();
    valid.extend(spec.prefixes.iter().map(|p| format!("'{p}*'")));
    if valid.is_empty() {
        format!(
            "unknown option '{key}': connector '{}' takes no options",
            spec.name
        )
    } else {
        format!(
            "unknown option '{key}' for connector '{}'; valid options are: {}",
            spec.name,
            valid.join(", ")
        )
    }
}

fn check_value(connector: &str, option: &OptionSpec, value: &str) -> SqlResult<()> {
    let ok = match option.kind {
        Kind::Text => !value.is_empty(),
        Kind::Integer => value.trim().parse::<u64>().is_ok(),
        Kind::Boolean => matches!(value.to_ascii_lowercase().as_str(), "true" | "false"),
        Kind::Duration => parse_duration(value).is_some(),
        Kind::OneOf(values) => values.contains(&value),
    };
    if ok {
        return Ok(());
    }
    let expected = match option.kind {
        Kind::Text => "a non-empty string".to_string(),
        Kind::Integer => "a non-negative integer".to_string(),
        Kind::Boolean => "'true' or 'false'".to_string(),
        Kind::Duration => "a duration such as '5 s', '500 ms' or '1 min'".to_string(),
        Kind::OneOf(values) => format!("one of {}", values.join(", ")),
    };
    Err(invalid(format!(
        "bad value '{value}' for option '{}' of connector '{connector}'; expected {expected}",
        option.key
    )))
}

/// A leading whole number and the rest in lower case, trimmed (`"5 s"` -> 5, "s").
fn number_and_unit(text: &str) -> Option<(u64, String)> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    Some((number.parse().ok()?, unit.trim().to_ascii_lowercase()))
}

/// Parses Flink's duration syntax: a number and an optional unit (`5 s`, `100ms`, `1 min`).
pub fn parse_duration(text: &str) -> Option<Duration> {
    let (n, unit) = number_and_unit(text)?;
    let ms = match unit.as_str() {
        "" | "ms" | "milli" | "millis" | "millisecond" | "milliseconds" => n,
        "s" | "sec" | "secs" | "second" | "seconds" => n.checked_mul(1_000)?,
        "min" | "mins" | "minute" | "minutes" => n.checked_mul(60_000)?,
        "h" | "hour" | "hours" => n.checked_mul(3_600_000)?,
        "d" | "day" | "days" => n.checked_mul(86_400_000)?,
        _ => return None,
    };
    Some(Duration::from_millis(ms))
}

/// Parses Flink's memory size syntax: a number and an optional unit (`64 mb`, `1g`,
/// `512kb`; bytes without one).
pub fn parse_memory_size(text: &str) -> Option<usize> {
    let (n, unit) = number_and_unit(text)?;
    let n = usize::try_from(n).ok()?;
    let scale: usize = match unit.as_str() {
        "" | "b" | "bytes" => 1,
        "k" | "kb" | "kib" | "kibibytes" => 1 << 10,
        "m" | "mb" | "mib" | "mebibytes" => 1 << 20,
        "g" | "gb" | "gib" | "gibibytes" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(scale)
}

fn invalid(message: impl Into<String>) -> SqlError {
    SqlError::new(sqlstate::INVALID_PARAMETER_VALUE, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn accepts_valid_options() {
        validate(&opts(&[])).unwrap();
        validate(&opts(&[
            ("connector", "filesystem"),
            ("path", "/x"),
            ("format", "csv"),
        ]))
        .unwrap();
        validate(&opts(&[
            ("connector", "kafka"),
            ("topic", "t"),
            ("properties.bootstrap.servers", "h:1"),
            ("properties.client.id", "c"),
            ("scan.watermark.idle-timeout", "5 s"),
        ]))
        .unwrap();
        validate(&opts(&[
            ("connector", "datagen"),
            ("fields.id.kind", "sequence"),
        ]))
        .unwrap();
    }

    #[test]
    fn rejects_with_a_list_of_what_is_valid() {
        let e = validate(&opts(&[("connector", "nope")])).unwrap_err();
        assert!(
            e.message.contains("filesystem, datagen, kafka"),
            "{}",
            e.message
        );
        let e = validate(&opts(&[
            ("connector", "filesystem"),
            ("path", "/x"),
            ("format", "csv"),
            ("colour", "red"),
        ]))
        .unwrap_err();
        assert!(e.message.contains("unknown option 'colour'") && e.message.contains("'path'"));
        let e = validate(&opts(&[("connector", "filesystem"), ("path", "/x")])).unwrap_err();
        assert!(e.message.contains("needs option 'format'"));
        let e = validate(&opts(&[
            ("connector", "filesystem"),
            ("path", "/x"),
            ("format", "xml"),
        ]))
        .unwrap_err();
        assert!(e.message.contains("one of json, csv"));
        let e = validate(&opts(&[
            ("connector", "datagen"),
            ("rows-per-second", "fast"),
        ]))
        .unwrap_err();
        assert!(e.message.contains("non-negative integer"));
        assert_eq!(e.code, sqlstate::INVALID_PARAMETER_VALUE);
        assert!(validate(&opts(&[("path", "/x")])).is_err());
    }

    #[test]
    fn durations_parse_like_flink() {
        assert_eq!(parse_duration("5 s"), Some(Duration::from_secs(5)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("2 min"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("soon"), None);
    }

    #[test]
    fn memory_sizes_parse_like_flink() {
        assert_eq!(parse_memory_size("64 mb"), Some(64 << 20));
        assert_eq!(parse_memory_size("1g"), Some(1 << 30));
        assert_eq!(parse_memory_size("512KB"), Some(512 << 10));
        assert_eq!(parse_memory_size("100"), Some(100));
        assert_eq!(parse_memory_size("0"), Some(0));
        assert_eq!(parse_memory_size("lots"), None);
        assert_eq!(parse_memory_size("5 tb"), None);
        assert_eq!(parse_memory_size("99999999999999999999 gb"), None);
    }
}
