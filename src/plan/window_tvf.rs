//! Window table functions in FROM: Flink's `TABLE(TUMBLE(TABLE t, DESCRIPTOR(ts), size))`
//! and RisingWave's `TUMBLE(t, ts, size)`, with HOP, CUMULATE and SESSION alike.
//!
//! sqlparser cannot read `TABLE t` as a function argument, so the Flink form is first
//! reduced to the RisingWave form on the token stream; the parsed table function is then
//! replaced by a reference to a table whose name encodes the [`WindowSpec`]. Weir's schema
//! resolves that name to a [`WindowTvfTable`], which the streaming planner turns into
//! window operators.

use std::ops::ControlFlow;

use datafusion::sql::sqlparser::ast::{
    self, DateTimeField, Expr, FunctionArg, FunctionArgExpr, FunctionArguments, Ident, ObjectName,
    TableFactor, VisitMut, VisitorMut,
};
use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
use datafusion::sql::sqlparser::keywords::Keyword;
use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer, Whitespace};
use serde::{Deserialize, Serialize};

use crate::sql::error::{sqlstate, SqlError, SqlResult};
use crate::sql::names::ident_name;
use crate::stream::message::Millis;

const NAME_PREFIX: &str = "__weir_window__";
const PARTITION_ARG: &str = "__weir_partition_by";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WindowKind {
    Tumble {
        size: Millis,
        offset: Millis,
    },
    Hop {
        slide: Millis,
        size: Millis,
        offset: Millis,
    },
    Cumulate {
        step: Millis,
        size: Millis,
        offset: Millis,
    },
    Session {
        gap: Millis,
        partition_by: Vec<String>,
    },
}

/// One window table function call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowSpec {
    pub kind: WindowKind,
    /// The table or view windowed.
    pub table: String,
    /// The DESCRIPTOR column: the time attribute rows are windowed by.
    pub time_column: String,
}

impl WindowSpec {
    pub fn table_name(&self) -> String {
        format!(
            "{NAME_PREFIX}{}",
            serde_json::to_string(self).expect("specs serialise")
        )
    }

    pub fn from_table_name(name: &str) -> Option<Self> {
        serde_json::from_str(name.strip_prefix(NAME_PREFIX)?).ok()
    }

    pub fn function_name(&self) -> &'static str {
        match self.kind {
            WindowKind::Tumble { .. } => "TUMBLE",
            WindowKind::Hop { .. } => "HOP",
            WindowKind::Cumulate { .. } => "CUMULATE",
            WindowKind::Session { .. } => "SESSION",
        }
    }
}

impl std::fmt::Display for WindowSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (name, table, col) = (self.function_name(), &self.table, &self.time_column);
        match &self.kind {
            WindowKind::Tumble { size, offset } => {
                write!(f, "{name}({table}, {col}, size={}", ms(*size))?;
                if *offset != 0 {
                    write!(f, ", offset={}", ms(*offset))?;
                }
            }
            WindowKind::Hop {
                slide,
                size,
                offset,
            } => {
                write!(
                    f,
                    "{name}({table}, {col}, slide={}, size={}",
                    ms(*slide),
                    ms(*size)
                )?;
                if *offset != 0 {
                    write!(f, ", offset={}", ms(*offset))?;
                }
            }
            WindowKind::Cumulate { step, size, offset } => {
                write!(
                    f,
                    "{name}({table}, {col}, step={}, size={}",
                    ms(*step),
                    ms(*size)
                )?;
                if *offset != 0 {
                    write!(f, ", offset={}", ms(*offset))?;
                }
            }
            WindowKind::Session { gap, partition_by } => {
                write!(f, "{name}({table}, {col}, gap={}", ms(*gap))?;
                if !partition_by.is_empty() {
                    write!(f, ", partition by {}", partition_by.join(", "))?;
                }
            }
        }
        write!(f, ")")
    }
}

impl WindowSpec {
    /// The call in Flink's syntax.
    pub fn to_sql(&self) -> String {
        let interval = |v: Millis| format!("INTERVAL '{}' SECOND", v as f64 / 1000.0);
        let (name, table, col) = (self.function_name(), &self.table, &self.time_column);
        let args = match &self.kind {
            WindowKind::Tumble { size, offset } => {
                let mut a = vec![interval(*size)];
                if *offset != 0 {
                    a.push(interval(*offset));
                }
                a
            }
            WindowKind::Hop {
                slide,
                size,
                offset,
            }
            | WindowKind::Cumulate {
                step: slide,
                size,
                offset,
            } => {
                let mut a = vec![interval(*slide), interval(*size)];
                if *offset != 0 {
                    a.push(interval(*offset));
                }
                a
            }
            WindowKind::Session { gap, .. } => vec![interval(*gap)],
        };
        let partition = match &self.kind {
            WindowKind::Session { partition_by, .. } if !partition_by.is_empty() => {
                format!(" PARTITION BY ({})", partition_by.join(", "))
            }
            _ => String::new(),
        };
        format!(
            "TABLE({name}(TABLE {table}{partition}, DESCRIPTOR({col}), {}))",
            args.join(", ")
        )
    }
}

/// `sql` with every encoded window table reference written back as the Flink call, for
/// showing stored queries (SHOW CREATE VIEW, SHOW JOBS).
pub fn readable(sql: &str) -> String {
    let marker = format!("\"{NAME_PREFIX}");
    let mut out = String::with_capacity(sql.len());
    let mut rest = sql;
    while let Some(start) = rest.find(&marker) {
        out.push_str(&rest[..start]);
        let body = &rest[start + 1..];
        // A quoted identifier ends at a quote that is not doubled.
        let mut end = None;
        let bytes = body.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'"' {
                if bytes.get(i + 1) == Some(&b'"') {
                    i += 2;
                    continue;
                }
                end = Some(i);
                break;
            }
            i += 1;
        }
        let Some(end) = end else {
            out.push_str(&rest[start..]);
            return out;
        };
        match WindowSpec::from_table_name(&body[..end].replace("\"\"", "\"")) {
            Some(spec) => out.push_str(&spec.to_sql()),
            None => out.push_str(&rest[start..start + end + 2]),
        }
        rest = &body[end + 1..];
    }
    out.push_str(rest);
    out
}

fn ms(v: Millis) -> String {
    match v {
        v if v % 3_600_000 == 0 => format!("{}h", v / 3_600_000),
        v if v % 60_000 == 0 => format!("{}min", v / 60_000),
        v if v % 1000 == 0 => format!("{}s", v / 1000),
        v => format!("{v}ms"),
    }
}

fn is_window_function(word: &str) -> bool {
    ["tumble", "hop", "cumulate", "session"]
        .iter()
        .any(|f| word.eq_ignore_ascii_case(f))
}

/// Rewrites Flink's `TABLE(TUMBLE(TABLE t [PARTITION BY k], ...))` into the table-function
/// form sqlparser reads; `None` when the text has no such call.
pub fn reduce_flink_syntax(text: &str) -> Option<String> {
    let tokens = Tokenizer::new(&PostgreSqlDialect {}, text)
        .tokenize()
        .ok()?;
    let significant =
        |from: usize| (from..tokens.len()).find(|&i| !matches!(tokens[i], Token::Whitespace(_)));
    let word_is = |i: usize, kw: Keyword| matches!(&tokens[i], Token::Word(w) if w.keyword == kw);
    let mut out: Vec<Token> = Vec::with_capacity(tokens.len());
    let mut changed = false;
    let mut i = 0;
    while i < tokens.len() {
        // TABLE ( <window fn> ( ... ) )
        let call = (|| {
            if !word_is(i, Keyword::TABLE) {
                return None;
            }
            let open = significant(i + 1)?;
            if tokens[open] != Token::LParen {
                return None;
            }
            let func = significant(open + 1)?;
            match &tokens[func] {
                Token::Word(w) if is_window_function(&w.value) => {}
                _ => return None,
            }
            let inner_open = significant(func + 1)?;
            (tokens[inner_open] == Token::LParen).then_some((open, func, inner_open))
        })();
        let Some((open, func, inner_open)) = call else {
            out.push(tokens[i].clone());
            i += 1;
            continue;
        };
        let close = matching_paren(&tokens, open)?;
        let inner_close = matching_paren(&tokens, inner_open)?;
        changed = true;
        out.push(tokens[func].clone());
        out.push(Token::LParen);
        let mut partition: Option<Vec<Token>> = None;
        let mut j = inner_open + 1;
        while j < inner_close {
            if word_is(j, Keyword::TABLE) {
                j += 1;
                continue;
            }
            if word_is(j, Keyword::PARTITION) {
                let by = significant(j + 1)?;
                if !word_is(by, Keyword::BY) {
                    return None;
                }
                // PARTITION BY k  or  PARTITION BY (k1, k2): up to the next top-level comma.
                let mut keys = Vec::new();
                let mut depth = 0usize;
                let mut k = by + 1;
                while k < inner_close {
                    match &tokens[k] {
                        Token::LParen => depth += 1,
                        Token::RParen => depth = depth.saturating_sub(1),
                        Token::Comma if depth == 0 => break,
                        _ => {}
                    }
                    if !matches!(tokens[k], Token::LParen | Token::RParen) {
                        keys.push(tokens[k].clone());
                    }
                    k += 1;
                }
                partition = Some(keys);
                j = k;
                continue;
            }
            out.push(tokens[j].clone());
            j += 1;
        }
        if let Some(keys) = partition {
            out.push(Token::Comma);
            out.push(Token::make_word(PARTITION_ARG, None));
            out.push(Token::LParen);
            out.extend(keys);
            out.push(Token::RParen);
        }
        out.push(Token::RParen);
        i = close + 1;
    }
    changed.then(|| {
        out.iter()
            .map(|t| match t {
                Token::Whitespace(Whitespace::SingleLineComment { .. }) => " ".to_string(),
                t => t.to_string(),
            })
            .collect()
    })
}

fn matching_paren(tokens: &[Token], open: usize) -> Option<usize> {
    let mut depth = 0usize;
    for (i, t) in tokens.iter().enumerate().skip(open) {
        match t {
            Token::LParen => depth += 1,
            Token::RParen => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
    }
    None
}

/// Replaces every window table function in FROM by a reference to its [`WindowTvfTable`].
pub fn rewrite_statement(stmt: &mut ast::Statement) -> SqlResult<()> {
    struct Rewriter(Option<SqlError>);
    impl VisitorMut for Rewriter {
        type Break = ();
        fn pre_visit_table_factor(&mut self, factor: &mut TableFactor) -> ControlFlow<()> {
            let TableFactor::Table {
                name, args, alias, ..
            } = factor
            else {
                return ControlFlow::Continue(());
            };
            let (Some(call_args), Some(func)) = (args.as_ref(), name.0.last()) else {
                return ControlFlow::Continue(());
            };
            let Some(func) = func.as_ident().map(ident_name) else {
                return ControlFlow::Continue(());
            };
            if name.0.len() != 1 || !is_window_function(&func) {
                return ControlFlow::Continue(());
            }
            match window_spec(&func, &call_args.args) {
                Ok(spec) => {
                    if alias.is_none() {
                        *alias = Some(ast::TableAlias {
                            explicit: true,
                            name: Ident::new(spec.table.clone()),
                            columns: vec![],
                            at: None,
                        });
                    }
                    *name = ObjectName::from(vec![Ident::with_quote('"', spec.table_name())]);
                    *args = None;
                    ControlFlow::Continue(())
                }
                Err(e) => {
                    self.0 = Some(e);
                    ControlFlow::Break(())
                }
            }
        }
    }
    let mut rewriter = Rewriter(None);
    let _ = stmt.visit(&mut rewriter);
    match rewriter.0 {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn invalid(message: String) -> SqlError {
    SqlError::new(sqlstate::INVALID_PARAMETER_VALUE, message)
}

fn window_spec(func: &str, args: &[FunctionArg]) -> SqlResult<WindowSpec> {
    let usage = match func {
        "tumble" => "TUMBLE(TABLE t, DESCRIPTOR(ts), size [, offset])",
        "hop" => "HOP(TABLE t, DESCRIPTOR(ts), slide, size [, offset])",
        "cumulate" => "CUMULATE(TABLE t, DESCRIPTOR(ts), step, size [, offset])",
        _ => "SESSION(TABLE t [PARTITION BY k], DESCRIPTOR(ts), gap)",
    };
    let bad = |what: &str| {
        SqlError::new(
            sqlstate::SYNTAX_ERROR,
            format!("{what} in {}; write {usage}", func.to_uppercase()),
        )
    };
    let mut positional: Vec<&Expr> = Vec::new();
    let mut partition_by = Vec::new();
    let mut named: Vec<(String, &Expr)> = Vec::new();
    for arg in args {
        match arg {
            FunctionArg::Unnamed(FunctionArgExpr::Expr(e)) => match e {
                Expr::Function(f) if f.name.to_string().eq_ignore_ascii_case(PARTITION_ARG) => {
                    partition_by = function_columns(f).ok_or_else(|| bad("bad PARTITION BY"))?;
                }
                e => positional.push(e),
            },
            FunctionArg::Named {
                name,
                arg: FunctionArgExpr::Expr(e),
                ..
            }
            | FunctionArg::ExprNamed {
                name: Expr::Identifier(name),
                arg: FunctionArgExpr::Expr(e),
                ..
            } => named.push((ident_name(name), e)),
            _ => return Err(bad("unexpected argument")),
        }
    }
    let param_order: &[&str] = match func {
        "tumble" => &["data", "timecol", "size", "offset"],
        "hop" => &["data", "timecol", "slide", "size", "offset"],
        "cumulate" => &["data", "timecol", "step", "size", "offset"],
        _ => &["data", "timecol", "gap"],
    };
    let mut values: Vec<Option<&Expr>> = vec![None; param_order.len()];
    if positional.len() > param_order.len() {
        return Err(bad("too many arguments"));
    }
    for (i, e) in positional.into_iter().enumerate() {
        values[i] = Some(e);
    }
    for (name, e) in named {
        let i = param_order
            .iter()
            .position(|p| *p == name)
            .ok_or_else(|| bad(&format!("unknown parameter {}", name.to_uppercase())))?;
        values[i] = Some(e);
    }
    let get = |i: usize| {
        values[i].ok_or_else(|| bad(&format!("missing {}", param_order[i].to_uppercase())))
    };
    let table = match get(0)? {
        Expr::Identifier(id) => ident_name(id),
        Expr::CompoundIdentifier(ids) => ids.last().map(ident_name).unwrap_or_default(),
        _ => return Err(bad("the first argument must name a table or view")),
    };
    let time_column = match get(1)? {
        Expr::Identifier(id) => ident_name(id),
        Expr::Function(f) if f.name.to_string().eq_ignore_ascii_case("descriptor") => {
            match function_columns(f).as_deref() {
                Some([one]) => one.clone(),
                _ => return Err(bad("DESCRIPTOR takes exactly one column")),
            }
        }
        _ => return Err(bad("the time column must be DESCRIPTOR(column)")),
    };
    let duration = |i: usize| -> SqlResult<Millis> {
        let e = get(i)?;
        let v = interval_millis(e).ok_or_else(|| {
            invalid(format!(
                "{} of {} must be a positive day-time interval such as INTERVAL '10' SECOND, not {e}",
                param_order[i].to_uppercase(),
                func.to_uppercase()
            ))
        })?;
        if v <= 0 && param_order[i] != "offset" {
            return Err(invalid(format!(
                "{} of {} must be positive, not {e}",
                param_order[i].to_uppercase(),
                func.to_uppercase()
            )));
        }
        Ok(v)
    };
    let offset = |i: usize| -> SqlResult<Millis> {
        if values.get(i).copied().flatten().is_some() {
            duration(i)
        } else {
            Ok(0)
        }
    };
    let kind = match func {
        "tumble" => WindowKind::Tumble {
            size: duration(2)?,
            offset: offset(3)?,
        },
        "hop" => {
            let (slide, size) = (duration(2)?, duration(3)?);
            WindowKind::Hop {
                slide,
                size,
                offset: offset(4)?,
            }
        }
        "cumulate" => {
            let (step, size) = (duration(2)?, duration(3)?);
            if size % step != 0 {
                return Err(invalid(format!(
                    "CUMULATE needs a size that is a whole multiple of the step; {} is not a multiple of {}",
                    ms(size),
                    ms(step)
                )));
            }
            WindowKind::Cumulate {
                step,
                size,
                offset: offset(4)?,
            }
        }
        _ => WindowKind::Session {
            gap: duration(2)?,
            partition_by,
        },
    };
    Ok(WindowSpec {
        kind,
        table,
        time_column,
    })
}

fn function_columns(f: &ast::Function) -> Option<Vec<String>> {
    let FunctionArguments::List(list) = &f.args else {
        return None;
    };
    list.args
        .iter()
        .map(|a| match a {
            FunctionArg::Unnamed(FunctionArgExpr::Expr(Expr::Identifier(id))) => {
                Some(ident_name(id))
            }
            _ => None,
        })
        .collect()
}

/// Milliseconds of a day-time interval literal (`INTERVAL '10' SECOND`, `INTERVAL '1 minute'`).
pub fn interval_millis(e: &Expr) -> Option<Millis> {
    let Expr::Interval(iv) = e else {
        return None;
    };
    let text = match iv.value.as_ref() {
        Expr::Value(v) => match &v.value {
            ast::Value::SingleQuotedString(s) => s.clone(),
            ast::Value::Number(n, _) => n.clone(),
            _ => return None,
        },
        _ => return None,
    };
    match &iv.leading_field {
        Some(field) => {
            let n: f64 = text.trim().parse().ok()?;
            Some((n * unit_millis(field)? as f64).round() as Millis)
        }
        None => {
            let mut parts = text.split_whitespace();
            let mut total = 0.0;
            while let Some(n) = parts.next() {
                let n: f64 = n.parse().ok()?;
                let unit = parts.next()?.to_ascii_lowercase();
                let per = match unit.trim_end_matches('s') {
                    "millisecond" | "m" => 1,
                    "second" | "sec" => 1000,
                    "minute" | "min" => 60_000,
                    "hour" => 3_600_000,
                    "day" => 86_400_000,
                    _ => return None,
                };
                total += n * per as f64;
            }
            Some(total.round() as Millis)
        }
    }
}

fn unit_millis(field: &DateTimeField) -> Option<Millis> {
    Some(match field {
        DateTimeField::Millisecond | DateTimeField::Milliseconds => 1,
        DateTimeField::Second | DateTimeField::Seconds => 1000,
        DateTimeField::Minute | DateTimeField::Minutes => 60_000,
        DateTimeField::Hour | DateTimeField::Hours => 3_600_000,
        DateTimeField::Day | DateTimeField::Days => 86_400_000,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sql::parser::{parse, Statement};

    fn spec_of(sql: &str) -> WindowSpec {
        let stmt = parse(sql).unwrap().remove(0).statement;
        let Statement::Sql(stmt) = stmt else {
            panic!("not sql")
        };
        let text = stmt.to_string();
        let start = text.find(NAME_PREFIX).unwrap();
        let quoted = &text[start..];
        let end = quoted.rfind("}\"").unwrap() + 1;
        WindowSpec::from_table_name(&quoted[..end].replace("\"\"", "\"")).unwrap()
    }

    #[test]
    fn reads_flink_and_risingwave_forms() {
        let flink =
            spec_of("SELECT * FROM TABLE(TUMBLE(TABLE bid, DESCRIPTOR(ts), INTERVAL '10' SECOND))");
        let rw = spec_of("SELECT * FROM TUMBLE(bid, ts, INTERVAL '10' SECOND)");
        assert_eq!(flink, rw);
        assert_eq!(
            flink.kind,
            WindowKind::Tumble {
                size: 10_000,
                offset: 0
            }
        );
        let hop = spec_of(
            "SELECT * FROM TABLE(HOP(TABLE bid, DESCRIPTOR(ts), INTERVAL '2' SECOND, INTERVAL '1' MINUTE)) w",
        );
        assert_eq!(
            hop.kind,
            WindowKind::Hop {
                slide: 2000,
                size: 60_000,
                offset: 0
            }
        );
        let session = spec_of(
            "SELECT * FROM TABLE(SESSION(TABLE bid PARTITION BY (a, b), DESCRIPTOR(ts), INTERVAL '5' MINUTES))",
        );
        assert_eq!(
            session.kind,
            WindowKind::Session {
                gap: 300_000,
                partition_by: vec!["a".into(), "b".into()]
            }
        );
        let named = spec_of(
            "SELECT * FROM TABLE(CUMULATE(DATA => TABLE bid, TIMECOL => DESCRIPTOR(ts), STEP => INTERVAL '1' SECOND, SIZE => INTERVAL '4' SECOND))",
        );
        assert_eq!(
            named.kind,
            WindowKind::Cumulate {
                step: 1000,
                size: 4000,
                offset: 0
            }
        );
    }

    #[test]
    fn stored_queries_read_back_in_flink_syntax() {
        let stmt = parse(
            "SELECT * FROM TABLE(HOP(TABLE bid, DESCRIPTOR(ts), INTERVAL '2' SECOND, INTERVAL '1' MINUTE)) w",
        )
        .unwrap()
        .remove(0)
        .statement;
        let Statement::Sql(stmt) = stmt else {
            panic!("not sql")
        };
        let text = readable(&stmt.to_string());
        assert_eq!(
            text,
            "SELECT * FROM TABLE(HOP(TABLE bid, DESCRIPTOR(ts), INTERVAL '2' SECOND, INTERVAL '60' SECOND)) w"
        );
        assert_eq!(
            spec_of(&text).kind,
            WindowKind::Hop {
                slide: 2000,
                size: 60_000,
                offset: 0
            }
        );
    }

    #[test]
    fn bad_arguments_say_what_to_write() {
        let e = parse("SELECT * FROM TABLE(TUMBLE(TABLE bid, DESCRIPTOR(ts)))").unwrap_err();
        assert!(e.message.contains("missing SIZE"), "{}", e.message);
        let e = parse("SELECT * FROM TABLE(TUMBLE(TABLE bid, DESCRIPTOR(ts), 5))").unwrap_err();
        assert!(e.message.contains("INTERVAL"), "{}", e.message);
    }
}
