//! Session variables (`SET` / `SHOW` / `RESET`), kept in the connection's metadata under
//! lower-case names, where pgwire and arrow-pg read the ones that change value formatting.

use std::collections::HashMap;
use std::str::FromStr;

use datafusion::arrow::array::timezone::Tz;

use super::error::{sqlstate, SqlError, SqlResult};

pub const SERVER_VERSION: &str = "16.6";
pub const SERVER_VERSION_NUM: &str = "160006";

#[derive(Debug, Clone, Copy)]
struct Variable {
    /// The name Postgres reports (ParameterStatus, SHOW ALL).
    name: &'static str,
    default: &'static str,
    /// Sent to the client as ParameterStatus when it changes.
    reported: bool,
    settable: bool,
    description: &'static str,
}

const fn var(
    name: &'static str,
    default: &'static str,
    reported: bool,
    description: &'static str,
) -> Variable {
    Variable {
        name,
        default,
        reported,
        settable: true,
        description,
    }
}

/// A variable clients may read but not change.
const fn fixed(
    name: &'static str,
    default: &'static str,
    reported: bool,
    description: &'static str,
) -> Variable {
    Variable {
        settable: false,
        ..var(name, default, reported, description)
    }
}

const VARIABLES: &[Variable] = &[
    var(
        "execution.checkpointing.interval",
        "1 s",
        false,
        "How often epochs commit (checkpoints, and what views and sinks publish at), server-wide (Flink's key)",
    ),
    var(
        "execution.checkpointing.unaligned",
        "false",
        false,
        "Barriers of new views and jobs overtake data waiting at operators with several inputs, which goes into the checkpoint instead (Flink's key)",
    ),
    var(
        "execution.savepoint.path",
        "",
        false,
        "Savepoint new materialized views and INSERT jobs start from (SHOW SAVEPOINTS lists them; Flink's key)",
    ),
    var(
        "parallelism.default",
        "0",
        false,
        "Subtasks per operator of new continuous queries; 0 = one per CPU core (Flink's key)",
    ),
    var(
        "pipeline.auto-watermark-interval",
        "0 ms",
        false,
        "Accepted for Flink compatibility: Weir decides lateness as if a watermark followed every row",
    ),
    var(
        "state.backend",
        "memory",
        false,
        "Where joins and unbounded GROUP BY of new queries keep state: memory, or sled (experimental: on disk beyond 'state.backend.sled.memory' per input)",
    ),
    var(
        "state.backend.sled.memory",
        "1 mb",
        false,
        "Memory each join input or GROUP BY subtask of new queries keeps under the sled state backend before moving state to disk",
    ),
    var(
        "table.dml-sync",
        "false",
        false,
        "Whether INSERT INTO ... SELECT over bounded inputs waits for its job to finish (Flink's key)",
    ),
    var(
        "table.exec.emit.allow-lateness",
        "0 ms",
        false,
        "How long window aggregates of new queries keep fired windows and correct them for late rows (Flink's key)",
    ),
    var(
        "table.exec.state.ttl",
        "0 ms",
        false,
        "How long unbounded aggregates, joins, TopN and dedup of new queries keep a key's state after it was last touched; 0 = forever (Flink's key)",
    ),
    var(
        "table.local-time-zone",
        "UTC",
        false,
        "Time zone of TIMESTAMP_LTZ values and of time functions (Flink's key)",
    ),
    var(
        "weir.late-data-table",
        "",
        false,
        "Table that rows dropped as late by window operators of new queries are appended to",
    ),
    var(
        "application_name",
        "",
        true,
        "Name of the application using this session",
    ),
    var(
        "bytea_output",
        "hex",
        false,
        "Output format of bytea values",
    ),
    var(
        "client_encoding",
        "UTF8",
        true,
        "Client character set (Weir speaks UTF8 only)",
    ),
    var(
        "client_min_messages",
        "notice",
        false,
        "Lowest message level sent to the client",
    ),
    var(
        "DateStyle",
        "ISO, MDY",
        true,
        "Display format of date and time values",
    ),
    fixed(
        "default_transaction_isolation",
        "read committed",
        false,
        "Isolation level of new transactions",
    ),
    var(
        "default_transaction_read_only",
        "off",
        true,
        "Whether new transactions are read-only",
    ),
    var(
        "extra_float_digits",
        "1",
        false,
        "Extra digits shown for floating-point values",
    ),
    var(
        "idle_in_transaction_session_timeout",
        "0",
        false,
        "Accepted for compatibility",
    ),
    fixed(
        "integer_datetimes",
        "on",
        true,
        "Datetimes are integer based",
    ),
    var(
        "IntervalStyle",
        "postgres",
        true,
        "Display format of interval values",
    ),
    fixed(
        "is_superuser",
        "on",
        true,
        "Whether the session user is a superuser",
    ),
    var(
        "lock_timeout",
        "0",
        false,
        "Accepted for compatibility; Weir takes no locks",
    ),
    fixed(
        "max_identifier_length",
        "63",
        false,
        "Longest identifier Postgres clients expect",
    ),
    var(
        "search_path",
        "\"$user\", public",
        false,
        "Schema search order (Weir has one schema: public)",
    ),
    fixed("server_encoding", "UTF8", true, "Server character set"),
    fixed(
        "server_version",
        SERVER_VERSION,
        true,
        "Postgres version Weir speaks",
    ),
    fixed(
        "server_version_num",
        SERVER_VERSION_NUM,
        false,
        "Postgres version Weir speaks, as a number",
    ),
    fixed(
        "standard_conforming_strings",
        "on",
        true,
        "Backslashes in '...' strings are literal",
    ),
    var(
        "statement_timeout",
        "0",
        false,
        "Accepted for compatibility",
    ),
    var(
        "TimeZone",
        "UTC",
        true,
        "Time zone for displaying and interpreting time stamps",
    ),
    fixed(
        "transaction_isolation",
        "read committed",
        false,
        "Isolation level of the current transaction",
    ),
    var(
        "transaction_read_only",
        "off",
        false,
        "Whether the current transaction is read-only",
    ),
];

fn lookup(name: &str) -> SqlResult<&'static Variable> {
    VARIABLES
        .iter()
        .find(|v| v.name.eq_ignore_ascii_case(name))
        .ok_or_else(|| {
            SqlError::new(
                sqlstate::UNDEFINED_OBJECT,
                format!("unrecognized configuration parameter \"{name}\""),
            )
            .with_hint("SHOW ALL lists the parameters Weir knows")
        })
}

/// A variable's current value: `(name as Postgres spells it, value)`.
pub fn show(metadata: &HashMap<String, String>, name: &str) -> SqlResult<(String, String)> {
    let var = lookup(name)?;
    let value = metadata
        .get(&var.name.to_ascii_lowercase())
        .cloned()
        .unwrap_or_else(|| var.default.to_string());
    Ok((var.name.to_string(), value))
}

/// Every variable with its value and description, for `SHOW ALL`.
pub fn show_all(metadata: &HashMap<String, String>) -> Vec<(String, String, String)> {
    VARIABLES
        .iter()
        .map(|v| {
            let (name, value) = show(metadata, v.name).expect("listed variables exist");
            (name, value, v.description.to_string())
        })
        .collect()
}

/// Every variable sent to the client at start-up, with the client's start-up values.
pub fn reported(metadata: &HashMap<String, String>) -> Vec<(String, String)> {
    VARIABLES
        .iter()
        .filter(|v| v.reported)
        .map(|v| show(metadata, v.name).expect("listed variables exist"))
        .collect()
}

/// A change to make: the metadata key, the value to store, and the ParameterStatus to
/// send (Postgres name and value) if the client must be told.
#[derive(Debug, PartialEq, Eq)]
pub struct Assignment {
    pub key: String,
    pub value: String,
    pub report: Option<(String, String)>,
}

/// Validates `SET name = value` (`None` = reset to default).
pub fn assign(name: &str, value: Option<&str>) -> SqlResult<Assignment> {
    let var = lookup(name)?;
    if !var.settable {
        return Err(SqlError::new(
            "55P02",
            format!("parameter \"{}\" cannot be changed", var.name),
        ));
    }
    let value = match value {
        None => var.default.to_string(),
        Some(v) => normalize(var.name, v)?,
    };
    Ok(Assignment {
        key: var.name.to_ascii_lowercase(),
        report: var.reported.then(|| (var.name.to_string(), value.clone())),
        value,
    })
}

/// Every settable variable back to its default, for `RESET ALL`.
pub fn reset_all() -> Vec<Assignment> {
    VARIABLES
        .iter()
        .filter(|v| v.settable)
        .map(|v| assign(v.name, None).expect("defaults are valid"))
        .collect()
}

fn normalize(name: &str, value: &str) -> SqlResult<String> {
    let invalid = |why: String| {
        SqlError::new(
            sqlstate::INVALID_PARAMETER_VALUE,
            format!("invalid value for parameter \"{name}\": \"{value}\"; {why}"),
        )
    };
    match name {
        "client_encoding" => {
            let v = value.to_ascii_uppercase().replace('-', "");
            if v == "UTF8" || v == "UNICODE" {
                Ok("UTF8".into())
            } else {
                Err(invalid("Weir speaks UTF8 only".into()))
            }
        }
        "TimeZone" => {
            let tz = if value.eq_ignore_ascii_case("utc") || value.eq_ignore_ascii_case("z") {
                "UTC"
            } else {
                value
            };
            Tz::from_str(tz)
                .map(|_| tz.to_string())
                .map_err(|_| invalid("use a zone name such as 'UTC' or 'Europe/Paris', or an offset such as '+02:00'".into()))
        }
        "parallelism.default" => match value.trim().parse::<usize>() {
            Ok(n) if n <= 128 => Ok(n.to_string()),
            _ => Err(invalid(
                "it must be an integer from 0 (one per core) to 128".into(),
            )),
        },
        "table.dml-sync" | "execution.checkpointing.unaligned" => {
            match value.to_ascii_lowercase().as_str() {
                "true" | "on" => Ok("true".into()),
                "false" | "off" => Ok("false".into()),
                _ => Err(invalid("it must be true or false".into())),
            }
        }
        "execution.checkpointing.interval"
        | "pipeline.auto-watermark-interval"
        | "table.exec.emit.allow-lateness"
        | "table.exec.state.ttl" => match crate::connector::options::parse_duration(value) {
            Some(d) if name != "execution.checkpointing.interval" || !d.is_zero() => {
                Ok(value.to_string())
            }
            _ => Err(invalid(
                "it must be a duration such as '1 s' or '500 ms'".into(),
            )),
        },
        "state.backend" => match value.trim().to_ascii_lowercase().as_str() {
            "memory" | "hashmap" => Ok("memory".into()),
            "sled" => Ok("sled".into()),
            _ => Err(invalid(
                "it must be 'memory' (the default) or 'sled' (keyed state beyond memory on disk)"
                    .into(),
            )),
        },
        "state.backend.sled.memory" => match crate::connector::options::parse_memory_size(value) {
            Some(_) => Ok(value.to_string()),
            None => Err(invalid(
                "it must be a memory size such as '64 mb', '512 kb' or '1 gb'".into(),
            )),
        },
        "table.local-time-zone" => Tz::from_str(value)
            .map(|_| value.to_string())
            .map_err(|_| invalid("use a zone name such as 'UTC' or 'Asia/Shanghai'".into())),
        "extra_float_digits" => match value.parse::<i8>() {
            Ok(n) if (-15..=3).contains(&n) => Ok(n.to_string()),
            _ => Err(invalid("it must be an integer from -15 to 3".into())),
        },
        "default_transaction_read_only" | "transaction_read_only" => {
            match value.to_ascii_lowercase().as_str() {
                "on" | "true" | "yes" | "1" => Ok("on".into()),
                "off" | "false" | "no" | "0" => Ok("off".into()),
                _ => Err(invalid("it must be on or off".into())),
            }
        }
        _ => Ok(value.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_validates_and_reports() {
        let a = assign("timezone", Some("Europe/Paris")).unwrap();
        assert_eq!(a.key, "timezone");
        assert_eq!(a.report, Some(("TimeZone".into(), "Europe/Paris".into())));
        assert!(assign("timezone", Some("Mars/Olympus")).is_err());
        assert_eq!(assign("search_path", Some("public")).unwrap().report, None);
        assert_eq!(
            assign("server_version", Some("1")).unwrap_err().code,
            "55P02"
        );
        assert_eq!(assign("no_such", Some("1")).unwrap_err().code, "42704");
        assert_eq!(
            assign("client_encoding", Some("utf-8")).unwrap().value,
            "UTF8"
        );
    }

    #[test]
    fn show_falls_back_to_defaults() {
        let mut md = HashMap::new();
        assert_eq!(
            show(&md, "DATESTYLE").unwrap(),
            ("DateStyle".into(), "ISO, MDY".into())
        );
        md.insert("datestyle".into(), "ISO, DMY".into());
        assert_eq!(show(&md, "datestyle").unwrap().1, "ISO, DMY");
        assert_eq!(
            show(&md, "server_version_num").unwrap().1,
            SERVER_VERSION_NUM
        );
    }
}
