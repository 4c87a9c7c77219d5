//! Flink's per-input state TTL hint: `SELECT /*+ STATE_TTL('l' = '1d', 'r' = '12h') */ ...`.
//!
//! sqlparser's PostgreSQL dialect reads comments as whitespace, and DataFusion keeps no
//! hints in its plans, so the hint is found on the token stream and each input it names
//! is wrapped in a subquery whose alias carries the TTL: `FROM t AS l` becomes
//! `FROM (SELECT * FROM t AS "__weir_state_ttl__86400000") AS l`. The alias survives
//! optimization (and stored view queries, which are printed from the AST), and the join
//! planner reads it from the plan of each join input.

use std::ops::ControlFlow;

use datafusion::sql::sqlparser::ast::{
    self, Ident, SetExpr, TableAlias, TableFactor, VisitMut, VisitorMut,
};
use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
use datafusion::sql::sqlparser::keywords::Keyword;
use datafusion::sql::sqlparser::parser::Parser;
use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer, Whitespace};

use crate::sql::error::{sqlstate, SqlError, SqlResult};
use crate::sql::names::ident_name;
use crate::stream::message::Millis;

const PREFIX: &str = "__weir_state_ttl__";

/// A TTL for the input named `name` (a table name or alias).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateTtl {
    pub name: String,
    pub ttl: Millis,
}

/// The TTL an alias written by [`rewrite_statement`] carries.
pub fn ttl_of_alias(alias: &str) -> Option<Millis> {
    alias.strip_prefix(PREFIX)?.parse().ok()
}

fn syntax(message: String) -> SqlError {
    SqlError::new(sqlstate::SYNTAX_ERROR, message)
}

/// Every STATE_TTL hint of `text`: hint comments right after SELECT.
pub fn hints(text: &str) -> SqlResult<Vec<StateTtl>> {
    if !text.contains("/*+") {
        return Ok(vec![]);
    }
    let Ok(tokens) = Tokenizer::new(&PostgreSqlDialect {}, text).tokenize() else {
        // The parser reports the error with its position.
        return Ok(vec![]);
    };
    let mut found = Vec::new();
    let mut previous: Option<&Token> = None;
    for token in &tokens {
        match token {
            Token::Whitespace(Whitespace::MultiLineComment(body)) => {
                let after_select =
                    matches!(previous, Some(Token::Word(w)) if w.keyword == Keyword::SELECT);
                if let (true, Some(hint)) = (after_select, body.strip_prefix('+')) {
                    found.extend(state_ttls(hint)?);
                }
            }
            Token::Whitespace(_) => {}
            t => previous = Some(t),
        }
    }
    Ok(found)
}

/// The STATE_TTL entries of one hint comment's text (`STATE_TTL('a' = '1d'), OTHER(x)`).
fn state_ttls(hint: &str) -> SqlResult<Vec<StateTtl>> {
    let tokens: Vec<Token> = Tokenizer::new(&PostgreSqlDialect {}, hint)
        .tokenize()
        .map_err(|e| syntax(format!("cannot read the hint /*+{hint}*/: {e}")))?
        .into_iter()
        .filter(|t| !matches!(t, Token::Whitespace(_)))
        .collect();
    let usage = "write /*+ STATE_TTL('t' = '1 h', 'u' = '30 min') */ with table names or aliases";
    let mut out = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        let Token::Word(name) = &tokens[i] else {
            i += 1;
            continue;
        };
        let is_ttl = name.value.eq_ignore_ascii_case("state_ttl");
        if tokens.get(i + 1) != Some(&Token::LParen) {
            i += 1;
            continue;
        }
        // Up to the matching parenthesis.
        let mut depth = 0;
        let mut end = i + 1;
        while end < tokens.len() {
            match tokens[end] {
                Token::LParen => depth += 1,
                Token::RParen => {
                    depth -= 1;
                    if depth == 0 {
                        break;
                    }
                }
                _ => {}
            }
            end += 1;
        }
        if is_ttl {
            let args = &tokens[i + 2..end.min(tokens.len())];
            for pair in args.split(|t| *t == Token::Comma) {
                let (key, value) = match pair {
                    [Token::SingleQuotedString(k), Token::Eq, Token::SingleQuotedString(v)] => {
                        (k.clone(), v)
                    }
                    [Token::Word(k), Token::Eq, Token::SingleQuotedString(v)] => {
                        (ident_name(&Ident::new(k.value.clone())), v)
                    }
                    _ => return Err(syntax(format!("malformed STATE_TTL hint; {usage}"))),
                };
                let ttl = crate::connector::options::parse_duration(value).ok_or_else(|| {
                    SqlError::new(
                        sqlstate::INVALID_PARAMETER_VALUE,
                        format!(
                            "invalid STATE_TTL '{value}' for \"{key}\"; write a duration such \
                             as '1 h', '30 min' or '1d'"
                        ),
                    )
                })?;
                out.push(StateTtl {
                    name: key,
                    ttl: ttl.as_millis() as Millis,
                });
            }
        }
        i = end + 1;
    }
    Ok(out)
}

/// Wraps every input `hints` name in a subquery whose alias carries its TTL.
pub fn rewrite_statement(stmt: &mut ast::Statement, hints: &[StateTtl]) -> SqlResult<()> {
    if hints.is_empty() {
        return Ok(());
    }
    struct Wrapper<'h> {
        hints: &'h [StateTtl],
        used: Vec<bool>,
        error: Option<SqlError>,
    }
    impl VisitorMut for Wrapper<'_> {
        type Break = ();
        fn pre_visit_table_factor(&mut self, factor: &mut TableFactor) -> ControlFlow<()> {
            let (name, alias) = match factor {
                TableFactor::Table { name, alias, .. } => (
                    name.0
                        .last()
                        .and_then(|p| p.as_ident())
                        .map(ident_name)
                        .unwrap_or_default(),
                    alias.clone(),
                ),
                TableFactor::Derived {
                    alias: Some(alias), ..
                } => (ident_name(&alias.name), Some(alias.clone())),
                _ => return ControlFlow::Continue(()),
            };
            let visible = alias.as_ref().map_or(name, |a| ident_name(&a.name));
            let Some(hint) = self.hints.iter().position(|h| h.name == visible) else {
                return ControlFlow::Continue(());
            };
            if ttl_of_alias(&visible).is_some() {
                return ControlFlow::Continue(());
            }
            self.used[hint] = true;
            if self.hints[hint].ttl == 0 {
                return ControlFlow::Continue(());
            }
            match wrap(factor, &visible, alias, self.hints[hint].ttl) {
                Ok(()) => ControlFlow::Continue(()),
                Err(e) => {
                    self.error = Some(e);
                    ControlFlow::Break(())
                }
            }
        }
    }
    let mut wrapper = Wrapper {
        hints,
        used: vec![false; hints.len()],
        error: None,
    };
    let _ = stmt.visit(&mut wrapper);
    if let Some(e) = wrapper.error {
        return Err(e);
    }
    if let Some(unused) = wrapper.used.iter().position(|u| !u) {
        return Err(SqlError::new(
            sqlstate::UNDEFINED_TABLE,
            format!(
                "the STATE_TTL hint names \"{}\", which is no table or alias of the query",
                hints[unused].name
            ),
        ));
    }
    Ok(())
}

/// `factor` becomes `(SELECT * FROM factor AS "__weir_state_ttl__<ms>") AS <visible>`.
fn wrap(
    factor: &mut TableFactor,
    visible: &str,
    alias: Option<TableAlias>,
    ttl: Millis,
) -> SqlResult<()> {
    let statement = Parser::parse_sql(&PostgreSqlDialect {}, "SELECT * FROM t")
        .map_err(|e| SqlError::internal(e.to_string()))?
        .pop();
    let Some(ast::Statement::Query(mut query)) = statement else {
        return Err(SqlError::internal("a SELECT template"));
    };
    let SetExpr::Select(select) = query.body.as_mut() else {
        return Err(SqlError::internal("a SELECT template"));
    };
    let mut inner = factor.clone();
    let marker = Some(TableAlias {
        explicit: true,
        name: Ident::with_quote('"', format!("{PREFIX}{ttl}")),
        columns: vec![],
        at: None,
    });
    match &mut inner {
        TableFactor::Table { alias, .. } | TableFactor::Derived { alias, .. } => *alias = marker,
        _ => return Err(SqlError::internal("a table to wrap")),
    }
    select.from[0].relation = inner;
    let outer = alias.unwrap_or(TableAlias {
        explicit: true,
        name: Ident::new(visible),
        columns: vec![],
        at: None,
    });
    *factor = TableFactor::Derived {
        lateral: false,
        subquery: query,
        alias: Some(outer),
        sample: None,
    };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sql::parser::{parse, Statement};

    fn rewritten(sql: &str) -> String {
        match parse(sql).unwrap().remove(0).statement {
            Statement::Sql(s) => s.to_string(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn hints_wrap_the_inputs_they_name() {
        let sql = "SELECT /*+ STATE_TTL('l' = '1d', r = '12h') */ l.a, r.b \
                   FROM orders l JOIN (SELECT * FROM items) AS r ON l.a = r.a";
        assert_eq!(
            rewritten(sql),
            "SELECT l.a, r.b FROM (SELECT * FROM orders AS \"__weir_state_ttl__86400000\") l \
             JOIN (SELECT * FROM (SELECT * FROM items) AS \"__weir_state_ttl__43200000\") AS r \
             ON l.a = r.a"
        );
        // Table names work when there is no alias; other hints are left alone.
        assert_eq!(
            rewritten("SELECT /*+ BROADCAST(x), STATE_TTL('orders' = '10 min') */ * FROM orders"),
            "SELECT * FROM (SELECT * FROM orders AS \"__weir_state_ttl__600000\") AS orders"
        );
        // A comment elsewhere is no hint.
        assert_eq!(
            rewritten("SELECT a /*+ STATE_TTL('orders' = '1d') */ FROM orders"),
            "SELECT a FROM orders"
        );
        assert_eq!(ttl_of_alias("__weir_state_ttl__600000"), Some(600_000));
        assert_eq!(ttl_of_alias("orders"), None);
    }

    #[test]
    fn bad_hints_say_what_to_write() {
        let err = |sql: &str| match parse(sql) {
            Err(e) => format!("{}: {}", e.code, e.message),
            Ok(_) => panic!("{sql} parsed"),
        };
        assert_eq!(
            err("SELECT /*+ STATE_TTL('x' = '1d') */ * FROM orders"),
            "42P01: the STATE_TTL hint names \"x\", which is no table or alias of the query"
        );
        assert!(
            err("SELECT /*+ STATE_TTL('orders' = 'soon') */ * FROM orders")
                .starts_with("22023: invalid STATE_TTL 'soon' for \"orders\"")
        );
        assert!(err("SELECT /*+ STATE_TTL('orders') */ * FROM orders")
            .starts_with("42601: malformed STATE_TTL hint"));
    }
}
