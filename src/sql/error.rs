//! Errors as the client sees them: a Postgres SQLSTATE, a message that says what to
//! change, and where the statement went wrong when we know.

use std::fmt;

use datafusion::arrow::error::ArrowError;
use datafusion::error::DataFusionError;
use datafusion::sql::sqlparser::parser::ParserError;
use weir_catalog::CatalogError;

/// SQLSTATE codes Weir reports (<https://www.postgresql.org/docs/current/errcodes-appendix.html>).
pub mod sqlstate {
    pub const SYNTAX_ERROR: &str = "42601";
    pub const UNDEFINED_TABLE: &str = "42P01";
    pub const UNDEFINED_COLUMN: &str = "42703";
    pub const UNDEFINED_FUNCTION: &str = "42883";
    pub const UNDEFINED_OBJECT: &str = "42704";
    pub const DUPLICATE_TABLE: &str = "42P07";
    pub const DUPLICATE_COLUMN: &str = "42701";
    pub const DATATYPE_MISMATCH: &str = "42804";
    pub const GROUPING_ERROR: &str = "42803";
    pub const INVALID_COLUMN_REFERENCE: &str = "42P10";
    pub const AMBIGUOUS_COLUMN: &str = "42702";
    pub const INVALID_TEXT_REPRESENTATION: &str = "22P02";
    pub const INVALID_PARAMETER_VALUE: &str = "22023";
    pub const DIVISION_BY_ZERO: &str = "22012";
    pub const NUMERIC_OUT_OF_RANGE: &str = "22003";
    pub const DATA_EXCEPTION: &str = "22000";
    pub const NOT_NULL_VIOLATION: &str = "23502";
    pub const DEPENDENT_OBJECTS_STILL_EXIST: &str = "2BP01";
    pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
    pub const WRONG_OBJECT_TYPE: &str = "42809";
    pub const INSUFFICIENT_RESOURCES: &str = "53000";
    pub const INTERNAL_ERROR: &str = "XX000";
    pub const IO_ERROR: &str = "58030";
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqlError {
    pub code: &'static str,
    pub message: String,
    pub hint: Option<String>,
    /// 1-based character position in the query string, as Postgres reports it.
    pub position: Option<usize>,
}

pub type SqlResult<T> = Result<T, SqlError>;

impl SqlError {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            hint: None,
            position: None,
        }
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Moves a position measured within one statement to the whole query string.
    pub fn shifted(mut self, statement_start: usize) -> Self {
        if let Some(p) = self.position.as_mut() {
            *p += statement_start;
        }
        self
    }

    pub fn syntax(message: impl Into<String>) -> Self {
        Self::new(sqlstate::SYNTAX_ERROR, message)
    }

    pub fn not_supported(message: impl Into<String>) -> Self {
        Self::new(sqlstate::FEATURE_NOT_SUPPORTED, message)
    }

    pub fn undefined_table(name: &str) -> Self {
        Self::new(
            sqlstate::UNDEFINED_TABLE,
            format!("relation \"{name}\" does not exist"),
        )
        .with_hint("SHOW TABLES lists the tables and views that exist")
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(sqlstate::INTERNAL_ERROR, message)
    }

    /// A sqlparser error for a statement of `sql`; its "Line: l, Column: c" becomes a position.
    pub fn from_parser(err: &ParserError, sql: &str) -> Self {
        Self::unlocated_parser_error(err).locate(sql)
    }

    /// A parser error whose "at Line: l, Column: c" is resolved later by [`SqlError::locate`].
    pub fn unlocated_parser_error(err: &ParserError) -> Self {
        match err {
            ParserError::TokenizerError(s) | ParserError::ParserError(s) => {
                Self::syntax(format!("syntax error: {s}"))
            }
            ParserError::RecursionLimitExceeded => Self::new(
                sqlstate::INSUFFICIENT_RESOURCES,
                "statement is nested too deeply; simplify it",
            ),
        }
    }

    /// Resolves a location left in the message against the statement's text.
    pub fn locate(mut self, sql: &str) -> Self {
        if self.position.is_none() && self.code == sqlstate::SYNTAX_ERROR {
            let (message, position) = split_location(&self.message, sql);
            self.message = message;
            self.position = position;
        }
        self
    }
}

/// Splits "msg at Line: 1, Column: 8" into the message and a 1-based character offset.
fn split_location(text: &str, sql: &str) -> (String, Option<usize>) {
    let Some(at) = text.rfind(" at Line: ") else {
        // sqlparser gives no location for the end of input; Postgres points just past it.
        let at_end = text.ends_with("found: EOF") && !sql.is_empty();
        return (
            text.to_string(),
            at_end.then(|| sql.trim_end().chars().count() + 1),
        );
    };
    let loc = &text[at + " at Line: ".len()..];
    let mut parts = loc.split(", Column: ");
    let line: Option<usize> = parts.next().and_then(|l| l.trim().parse().ok());
    let col: Option<usize> = parts.next().and_then(|c| c.trim().parse().ok());
    let position = match (line, col) {
        (Some(line), Some(col)) if line >= 1 && col >= 1 => {
            let before: usize = sql
                .split_inclusive('\n')
                .take(line - 1)
                .map(|l| l.chars().count())
                .sum();
            Some(before + col)
        }
        _ => None,
    };
    (text[..at].to_string(), position)
}

impl fmt::Display for SqlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.code)
    }
}

impl std::error::Error for SqlError {}

impl From<CatalogError> for SqlError {
    fn from(e: CatalogError) -> Self {
        let code = match &e {
            CatalogError::AlreadyExists { .. } => sqlstate::DUPLICATE_TABLE,
            CatalogError::NotFound { .. } => sqlstate::UNDEFINED_TABLE,
            CatalogError::HasDependents { .. } => sqlstate::DEPENDENT_OBJECTS_STILL_EXIST,
            CatalogError::Storage(_) => sqlstate::IO_ERROR,
            CatalogError::Unsupported(_) => sqlstate::FEATURE_NOT_SUPPORTED,
            CatalogError::Corrupt { .. } | CatalogError::Arrow(_) => sqlstate::INTERNAL_ERROR,
        };
        Self::new(code, e.to_string())
    }
}

impl From<ArrowError> for SqlError {
    fn from(e: ArrowError) -> Self {
        let code = match &e {
            ArrowError::CastError(_) | ArrowError::ParseError(_) => {
                sqlstate::INVALID_TEXT_REPRESENTATION
            }
            ArrowError::DivideByZero => sqlstate::DIVISION_BY_ZERO,
            ArrowError::ArithmeticOverflow(_) => sqlstate::NUMERIC_OUT_OF_RANGE,
            ArrowError::InvalidArgumentError(_) | ArrowError::ComputeError(_) => {
                sqlstate::DATA_EXCEPTION
            }
            ArrowError::NotYetImplemented(_) => sqlstate::FEATURE_NOT_SUPPORTED,
            _ => sqlstate::INTERNAL_ERROR,
        };
        Self::new(code, e.to_string())
    }
}

impl From<DataFusionError> for SqlError {
    fn from(e: DataFusionError) -> Self {
        let root = e.find_root();
        let message = root.to_string();
        match root {
            DataFusionError::SQL(p, _) => {
                let mut err = Self::from_parser(p, "");
                err.position = None;
                err
            }
            DataFusionError::ArrowError(a, _) => SqlError::from(clone_arrow(a)),
            DataFusionError::External(inner) => match inner.downcast_ref::<SqlError>() {
                Some(sql) => sql.clone(),
                None => match inner.downcast_ref::<ArrowError>() {
                    Some(a) => SqlError::from(clone_arrow(a)),
                    None => Self::new(sqlstate::INTERNAL_ERROR, inner.to_string()),
                },
            },
            DataFusionError::NotImplemented(m) => Self::not_supported(m.clone()),
            DataFusionError::SchemaError(..) => {
                Self::new(classify_schema(&message), clean(&message))
            }
            DataFusionError::Plan(m) => match missing_table(m) {
                Some(name) => Self::undefined_table(&name),
                None => Self::new(classify_plan(m), clean(&message)),
            },
            DataFusionError::ResourcesExhausted(m) => {
                Self::new(sqlstate::INSUFFICIENT_RESOURCES, m.clone())
            }
            DataFusionError::Execution(m) => Self::new(classify_execution(m), clean(&message)),
            _ => Self::new(classify_execution(&message), clean(&message)),
        }
    }
}

/// ArrowError is not Clone; its message is all callers need.
fn clone_arrow(e: &ArrowError) -> ArrowError {
    match e {
        ArrowError::CastError(m) => ArrowError::CastError(m.clone()),
        ArrowError::ParseError(m) => ArrowError::ParseError(m.clone()),
        ArrowError::DivideByZero => ArrowError::DivideByZero,
        ArrowError::ArithmeticOverflow(m) => ArrowError::ArithmeticOverflow(m.clone()),
        ArrowError::InvalidArgumentError(m) => ArrowError::InvalidArgumentError(m.clone()),
        ArrowError::ComputeError(m) => ArrowError::ComputeError(m.clone()),
        ArrowError::NotYetImplemented(m) => ArrowError::NotYetImplemented(m.clone()),
        other => ArrowError::ExternalError(other.to_string().into()),
    }
}

/// The name in DataFusion's "table 'weir.public.t' not found".
fn missing_table(message: &str) -> Option<String> {
    let rest = message.strip_prefix("table '")?;
    let name = rest.strip_suffix("' not found")?;
    Some(name.rsplit('.').next().unwrap_or(name).to_string())
}

fn classify_schema(message: &str) -> &'static str {
    if message.contains("No field named") || message.contains("not found") {
        sqlstate::UNDEFINED_COLUMN
    } else if message.contains("Ambiguous reference") {
        sqlstate::AMBIGUOUS_COLUMN
    } else if message.contains("duplicate") || message.contains("Duplicate") {
        sqlstate::DUPLICATE_COLUMN
    } else {
        sqlstate::SYNTAX_ERROR
    }
}

fn classify_plan(message: &str) -> &'static str {
    let m = message.to_ascii_lowercase();
    if m.contains("table") && m.contains("not found") {
        sqlstate::UNDEFINED_TABLE
    } else if m.contains("no field named") {
        sqlstate::UNDEFINED_COLUMN
    } else if m.contains("invalid function") || m.contains("no function matches") {
        sqlstate::UNDEFINED_FUNCTION
    } else if m.contains("cannot be cast")
        || m.contains("cannot coerce")
        || m.contains("cannot infer common")
        || m.contains("does not support")
        || m.contains("coercion")
    {
        sqlstate::DATATYPE_MISMATCH
    } else if m.contains("unsupported") || m.contains("not supported") {
        sqlstate::FEATURE_NOT_SUPPORTED
    } else {
        sqlstate::SYNTAX_ERROR
    }
}

fn classify_execution(message: &str) -> &'static str {
    let m = message.to_ascii_lowercase();
    if m.contains("cannot cast")
        || m.contains("parse")
        || m.contains("invalid") && m.contains("value")
    {
        sqlstate::INVALID_TEXT_REPRESENTATION
    } else if m.contains("divide by zero") || m.contains("division by zero") {
        sqlstate::DIVISION_BY_ZERO
    } else if m.contains("overflow") {
        sqlstate::NUMERIC_OUT_OF_RANGE
    } else {
        sqlstate::INTERNAL_ERROR
    }
}

/// DataFusion prefixes messages with its error kind ("Error during planning: ..."),
/// which tells a user nothing; keep the part that does.
fn clean(message: &str) -> String {
    const PREFIXES: &[&str] = &[
        "Error during planning: ",
        "Execution error: ",
        "Schema error: ",
        "Arrow error: ",
        "Optimizer rule",
    ];
    let mut m = message;
    for p in PREFIXES {
        if let Some(rest) = m.strip_prefix(p) {
            m = rest;
        }
    }
    m.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
    use datafusion::sql::sqlparser::parser::Parser;

    #[test]
    fn parser_location_becomes_a_character_position() {
        let sql = "SELECT 1;\nSELEC 2";
        let err = Parser::parse_sql(&PostgreSqlDialect {}, sql).unwrap_err();
        let e = SqlError::from_parser(&err, sql);
        assert_eq!(e.code, sqlstate::SYNTAX_ERROR);
        assert_eq!(e.position, Some(11));
        assert!(!e.message.contains("Line:"), "{}", e.message);
    }

    #[test]
    fn datafusion_errors_map_to_sqlstates() {
        let e = SqlError::from(DataFusionError::Plan(
            "table 'weir.public.nope' not found".into(),
        ));
        assert_eq!(e.code, sqlstate::UNDEFINED_TABLE);
        let e = SqlError::from(DataFusionError::ArrowError(
            Box::new(ArrowError::CastError(
                "Cannot cast string 'x' to value of Int64 type".into(),
            )),
            None,
        ));
        assert_eq!(e.code, sqlstate::INVALID_TEXT_REPRESENTATION);
        let e = SqlError::from(DataFusionError::NotImplemented("x".into()));
        assert_eq!(e.code, sqlstate::FEATURE_NOT_SUPPORTED);
    }
}
