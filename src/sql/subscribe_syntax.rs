//! The changefeed statements sqlparser does not know, read with its tokenizer and
//! parser primitives: `SUBSCRIBE [TO] v | (query) [WITH (snapshot = false)]`,
//! `DECLARE c CURSOR FOR ...`, `FETCH [FORWARD] [n | ALL] [FROM] c [WITH (timeout = '1s')]`,
//! `CLOSE c | ALL` and `COPY (SUBSCRIBE ...) TO STDOUT`. Materialize's syntax, as
//! drivers (psycopg, JDBC) and psql send it.

use std::time::Duration;

use datafusion::sql::sqlparser::ast;
use datafusion::sql::sqlparser::keywords::Keyword;
use datafusion::sql::sqlparser::parser::{Parser, ParserError};
use datafusion::sql::sqlparser::tokenizer::{Location, Token};

use super::error::{sqlstate, SqlError, SqlResult};
use super::names::{ident_name, object_name};
use super::parser::Statement;

/// `SUBSCRIBE TO ...`: what to follow and how.
#[derive(Debug, Clone)]
pub struct Subscribe {
    pub target: SubscribeTarget,
    /// Whether the current rows come first (as inserts); Materialize's `SNAPSHOT`.
    pub snapshot: bool,
}

#[derive(Debug, Clone)]
pub enum SubscribeTarget {
    /// A materialized view, by name.
    View(String),
    /// `(SELECT ...)`: run as a temporary continuous job for the subscription.
    Query {
        text: String,
        statement: Box<ast::Statement>,
    },
}

/// `DECLARE name CURSOR FOR query`.
#[derive(Debug, Clone)]
pub struct Declare {
    pub name: String,
    /// `WITH HOLD`: the cursor outlives the transaction that declared it.
    pub hold: bool,
    pub query: CursorQuery,
}

#[derive(Debug, Clone)]
pub enum CursorQuery {
    /// Follows a changefeed: FETCH waits for changes.
    Subscribe(Subscribe),
    /// An ordinary query: its rows are computed at DECLARE and handed out by FETCH.
    Query(Box<Statement>),
}

/// `FETCH [FORWARD] [n | ALL] [FROM] cursor [WITH (timeout = ...)]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetch {
    pub cursor: String,
    /// `None` is ALL.
    pub count: Option<u64>,
    /// How long to wait for a first row; `None` waits until one comes.
    pub timeout: Option<Duration>,
}

/// Parses what follows `SUBSCRIBE`.
pub fn parse_subscribe(p: &mut Parser, text: &str) -> SqlResult<Subscribe> {
    let at = |e: ParserError| SqlError::from_parser(&e, text);
    let _ = p.parse_keyword(Keyword::TO);
    let target = if p.peek_token().token == Token::LParen {
        let (start, inner) = parenthesized(p, text).map_err(at)?;
        let statement = match super::parser::parse_generic(&inner).map_err(|e| e.shifted(start))? {
            Statement::Sql(s) if matches!(*s, ast::Statement::Query(_)) => s,
            _ => {
                return Err(SqlError::syntax(
                    "SUBSCRIBE TO (...) takes a query: SUBSCRIBE TO (SELECT ...)",
                ))
            }
        };
        SubscribeTarget::Query {
            text: inner,
            statement,
        }
    } else {
        let name = p.parse_object_name(false).map_err(at)?;
        SubscribeTarget::View(object_name(&name)?)
    };
    let mut snapshot = true;
    for (key, value) in parse_options(p).map_err(at)? {
        match key.as_str() {
            "snapshot" => snapshot = boolean("snapshot", value.as_deref())?,
            "progress" => {
                return Err(SqlError::not_supported(
                    "SUBSCRIBE option progress is not supported: changes arrive whole per epoch, \
                     so every batch of rows already ends at an epoch",
                ))
            }
            other => {
                return Err(SqlError::syntax(format!(
                    "SUBSCRIBE option \"{other}\" not recognized; the option is snapshot \
                     (WITH (snapshot = false) skips the current rows)"
                )))
            }
        }
    }
    expect_end(p).map_err(at)?;
    Ok(Subscribe { target, snapshot })
}

/// Parses what follows `DECLARE`.
pub fn parse_declare(p: &mut Parser, text: &str) -> SqlResult<Declare> {
    let at = |e: ParserError| SqlError::from_parser(&e, text);
    let name = ident_name(&p.parse_identifier().map_err(at)?);
    if p.parse_keyword(Keyword::BINARY) {
        return Err(SqlError::not_supported(
            "BINARY cursors are not supported; ask for binary results through the protocol",
        ));
    }
    let _ = p.parse_one_of_keywords(&[Keyword::ASENSITIVE, Keyword::INSENSITIVE]);
    if p.parse_keyword(Keyword::SCROLL) {
        return Err(SqlError::not_supported(
            "cursors scan forward only; declare it without SCROLL",
        ));
    }
    let _ = p.parse_keywords(&[Keyword::NO, Keyword::SCROLL]);
    p.expect_keyword(Keyword::CURSOR).map_err(at)?;
    let hold = if p.parse_keywords(&[Keyword::WITH, Keyword::HOLD]) {
        true
    } else {
        let _ = p.parse_keywords(&[Keyword::WITHOUT, Keyword::HOLD]);
        false
    };
    p.expect_keyword(Keyword::FOR).map_err(at)?;
    let start = offset(text, p.peek_token().span.start);
    let rest: String = text.chars().skip(start).collect();
    let query = match super::parser::parse_one(&rest).map_err(|e| e.shifted(start))? {
        Statement::Subscribe(s) => CursorQuery::Subscribe(*s),
        s @ Statement::Sql(_) => CursorQuery::Query(Box::new(s)),
        _ => return Err(SqlError::syntax(
            "DECLARE CURSOR takes a query: DECLARE c CURSOR FOR SUBSCRIBE TO ... or FOR SELECT ...",
        )),
    };
    if let CursorQuery::Query(q) = &query {
        if !matches!(q.as_ref(), Statement::Sql(s) if matches!(s.as_ref(), ast::Statement::Query(_)))
        {
            return Err(SqlError::syntax(
                "DECLARE CURSOR takes a query: DECLARE c CURSOR FOR SUBSCRIBE TO ... or FOR SELECT ...",
            ));
        }
    }
    Ok(Declare { name, hold, query })
}

/// Parses what follows `FETCH`.
pub fn parse_fetch(p: &mut Parser, text: &str) -> SqlResult<Fetch> {
    let at = |e: ParserError| SqlError::from_parser(&e, text);
    let backward = [
        Keyword::BACKWARD,
        Keyword::PRIOR,
        Keyword::FIRST,
        Keyword::LAST,
        Keyword::ABSOLUTE,
        Keyword::RELATIVE,
    ];
    if let Some(k) = p.parse_one_of_keywords(&backward) {
        return Err(
            SqlError::new("55000", format!("cursor can only scan forward, not {k:?}"))
                .with_hint("use FETCH n or FETCH ALL"),
        );
    }
    let forward = p.parse_keyword(Keyword::FORWARD);
    let mut count = Some(1);
    if p.parse_keyword(Keyword::ALL) {
        count = None;
    } else if let Token::Number(n, _) = &p.peek_token().token {
        count = Some(n.parse::<u64>().map_err(|_| {
            SqlError::syntax(format!("FETCH takes a whole number of rows, not {n}"))
        })?);
        p.next_token();
    } else if matches!(p.peek_token().token, Token::Minus) {
        return Err(SqlError::new("55000", "cursor can only scan forward")
            .with_hint("use FETCH n with n >= 0, or FETCH ALL"));
    } else if !forward {
        let _ = p.parse_keyword(Keyword::NEXT);
    }
    let _ = p.parse_one_of_keywords(&[Keyword::FROM, Keyword::IN]);
    let cursor = ident_name(&p.parse_identifier().map_err(at)?);
    let mut timeout = None;
    for (key, value) in parse_options(p).map_err(at)? {
        match key.as_str() {
            "timeout" => {
                let value = value.unwrap_or_default();
                timeout = Some(
                    crate::connector::options::parse_duration(&value).ok_or_else(|| {
                        SqlError::new(
                            sqlstate::INVALID_PARAMETER_VALUE,
                            format!(
                                "FETCH timeout '{value}' is not a duration; write it like '1s' \
                                 or '500 ms'"
                            ),
                        )
                    })?,
                );
            }
            other => {
                return Err(SqlError::syntax(format!(
                    "FETCH option \"{other}\" not recognized; the option is timeout \
                     (WITH (timeout = '1s'))"
                )))
            }
        }
    }
    expect_end(p).map_err(at)?;
    Ok(Fetch {
        cursor,
        count,
        timeout,
    })
}

/// Parses what follows `CLOSE`: a cursor name, or `None` for ALL.
pub fn parse_close(p: &mut Parser, text: &str) -> SqlResult<Option<String>> {
    let at = |e: ParserError| SqlError::from_parser(&e, text);
    let name = if p.parse_keyword(Keyword::ALL) {
        None
    } else {
        Some(ident_name(&p.parse_identifier().map_err(at)?))
    };
    expect_end(p).map_err(at)?;
    Ok(name)
}

/// Whether the parser is at `COPY (SUBSCRIBE`.
pub fn at_copy_subscribe(p: &Parser) -> bool {
    let is_word = |t: &Token, word: &str| matches!(t, Token::Word(w) if w.quote_style.is_none() && w.value.eq_ignore_ascii_case(word));
    is_word(&p.peek_nth_token(0).token, "copy")
        && p.peek_nth_token(1).token == Token::LParen
        && is_word(&p.peek_nth_token(2).token, "subscribe")
}

/// Parses `COPY (SUBSCRIBE ...) TO STDOUT [WITH] [(FORMAT text)]`.
pub fn parse_copy_subscribe(p: &mut Parser, text: &str) -> SqlResult<Subscribe> {
    let at = |e: ParserError| SqlError::from_parser(&e, text);
    p.expect_keyword(Keyword::COPY).map_err(at)?;
    let (start, inner) = parenthesized(p, text).map_err(at)?;
    let subscribe = match super::parser::parse_one(&inner).map_err(|e| e.shifted(start))? {
        Statement::Subscribe(s) => *s,
        _ => return Err(SqlError::internal("COPY (SUBSCRIBE ...) without SUBSCRIBE")),
    };
    p.expect_keyword(Keyword::TO).map_err(at)?;
    if !p.parse_keyword(Keyword::STDOUT) {
        return Err(SqlError::not_supported(
            "COPY (SUBSCRIBE ...) writes to the client only: COPY (SUBSCRIBE ...) TO STDOUT",
        ));
    }
    let _ = p.parse_keyword(Keyword::WITH);
    for (key, value) in parse_parenthesized_options(p).map_err(at)? {
        match (key.as_str(), value.as_deref().map(str::to_ascii_lowercase)) {
            ("format", Some(f)) if f == "text" => {}
            ("format", f) => {
                return Err(SqlError::not_supported(format!(
                    "COPY (SUBSCRIBE ...) writes the text format only, not {}",
                    f.unwrap_or_default()
                )))
            }
            (other, _) => {
                return Err(SqlError::syntax(format!(
                    "COPY option \"{other}\" not recognized for COPY (SUBSCRIBE ...) TO STDOUT"
                )))
            }
        }
    }
    expect_end(p).map_err(at)?;
    Ok(subscribe)
}

/// `WITH (key [=] value, ...)` if present.
fn parse_options(p: &mut Parser) -> Result<Vec<(String, Option<String>)>, ParserError> {
    if !p.parse_keyword(Keyword::WITH) {
        return Ok(vec![]);
    }
    if p.peek_token().token != Token::LParen {
        return p.expected("( after WITH", p.peek_token());
    }
    parse_parenthesized_options(p)
}

/// `(key [=] value, ...)` if present; keys are lowercased.
fn parse_parenthesized_options(
    p: &mut Parser,
) -> Result<Vec<(String, Option<String>)>, ParserError> {
    let mut options = vec![];
    if !p.consume_token(&Token::LParen) {
        return Ok(options);
    }
    loop {
        let token = p.next_token();
        let key = match token.token {
            Token::Word(w) => w.value.to_lowercase(),
            Token::SingleQuotedString(s) => s.to_lowercase(),
            _ => return p.expected("an option name", token),
        };
        let _ = p.consume_token(&Token::Eq);
        let value = match p.peek_token().token {
            Token::Comma | Token::RParen => None,
            _ => option_value(p)?,
        };
        options.push((key, value));
        if p.consume_token(&Token::RParen) {
            return Ok(options);
        }
        p.expect_token(&Token::Comma)?;
    }
}

fn option_value(p: &mut Parser) -> Result<Option<String>, ParserError> {
    let token = p.next_token();
    Ok(Some(match token.token {
        Token::Word(w) => w.value,
        Token::SingleQuotedString(s) => s,
        Token::Number(n, _) => n,
        _ => return p.expected("an option value", token),
    }))
}

fn boolean(option: &str, value: Option<&str>) -> SqlResult<bool> {
    match value.map(str::to_ascii_lowercase).as_deref() {
        None | Some("true" | "on" | "1" | "t" | "yes") => Ok(true),
        Some("false" | "off" | "0" | "f" | "no") => Ok(false),
        Some(other) => Err(SqlError::new(
            sqlstate::INVALID_PARAMETER_VALUE,
            format!("{option} takes true or false, not '{other}'"),
        )),
    }
}

/// Skips a parenthesized part; returns where its inside starts and its text.
fn parenthesized(p: &mut Parser, text: &str) -> Result<(usize, String), ParserError> {
    p.expect_token(&Token::LParen)?;
    let start = offset(text, p.peek_token().span.start);
    let mut depth = 1;
    loop {
        let token = p.next_token();
        match token.token {
            Token::LParen => depth += 1,
            Token::RParen => {
                depth -= 1;
                if depth == 0 {
                    let end = offset(text, token.span.start);
                    let inner = text.chars().skip(start).take(end - start).collect();
                    return Ok((start, inner));
                }
            }
            Token::EOF => return p.expected(")", token),
            _ => {}
        }
    }
}

/// The character offset of a token location (1-based line and column) in `text`.
fn offset(text: &str, location: Location) -> usize {
    let mut line = 1;
    let mut column = 1;
    for (i, c) in text.chars().enumerate() {
        if line == location.line && column == location.column {
            return i;
        }
        if c == '\n' {
            line += 1;
            column = 1;
        } else {
            column += 1;
        }
    }
    text.chars().count()
}

fn expect_end(p: &mut Parser) -> Result<(), ParserError> {
    match p.peek_token().token {
        Token::EOF => Ok(()),
        _ => p.expected("end of statement", p.peek_token()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sql::parser::parse;

    fn one(sql: &str) -> Statement {
        parse(sql).unwrap().remove(0).statement
    }

    #[test]
    fn reads_subscribe_to_a_view_and_a_query() {
        let Statement::Subscribe(s) = one("SUBSCRIBE TO Hot WITH (SNAPSHOT = false)") else {
            panic!()
        };
        assert!(matches!(&s.target, SubscribeTarget::View(v) if v == "hot"));
        assert!(!s.snapshot);
        let Statement::Subscribe(s) = one("SUBSCRIBE (SELECT a, (b) FROM t WHERE a > 1)") else {
            panic!()
        };
        assert!(s.snapshot);
        assert!(
            matches!(&s.target, SubscribeTarget::Query { text, .. } if text == "SELECT a, (b) FROM t WHERE a > 1")
        );
    }

    #[test]
    fn bad_subscribe_options_say_what_exists() {
        let e = parse("SUBSCRIBE TO v WITH (snapshot = maybe)").unwrap_err();
        assert_eq!(e.code, "22023");
        let e = parse("SUBSCRIBE TO v WITH (foo = 1)").unwrap_err();
        assert_eq!(e.code, "42601");
        assert!(e.message.contains("snapshot"), "{}", e.message);
        // An error inside the query points into the whole statement.
        let e = parse("SUBSCRIBE TO (SELECT a FROM t WHERE)").unwrap_err();
        assert_eq!(e.code, "42601");
        assert!(e.position.unwrap() > 14, "{e:?}");
    }

    #[test]
    fn reads_cursor_statements() {
        let Statement::Declare(d) = one("DECLARE \"C\" NO SCROLL CURSOR WITH HOLD FOR SUBSCRIBE v")
        else {
            panic!()
        };
        assert_eq!(d.name, "C");
        assert!(d.hold);
        assert!(matches!(d.query, CursorQuery::Subscribe(_)));
        let Statement::Declare(d) = one("DECLARE c CURSOR FOR SELECT 1") else {
            panic!()
        };
        assert!(matches!(d.query, CursorQuery::Query(_)));
        let fetch = |sql: &str| match one(sql) {
            Statement::Fetch(f) => f,
            other => panic!("{other:?}"),
        };
        assert_eq!(fetch("FETCH c").count, Some(1));
        assert_eq!(fetch("FETCH FORWARD 10 FROM \"c\"").count, Some(10));
        assert_eq!(fetch("FETCH ALL IN c").count, None);
        assert_eq!(fetch("FETCH FORWARD ALL FROM c").count, None);
        assert_eq!(
            fetch("FETCH 3 c WITH (timeout = '1s')").timeout,
            Some(Duration::from_secs(1))
        );
        assert_eq!(parse("FETCH BACKWARD 1 FROM c").unwrap_err().code, "55000");
        assert_eq!(
            parse("FETCH 1 FROM c WITH (timeout = 'soon')")
                .unwrap_err()
                .code,
            "22023"
        );
        assert!(matches!(one("CLOSE ALL"), Statement::Close(None)));
        assert!(matches!(one("CLOSE c"), Statement::Close(Some(c)) if c == "c"));
    }

    #[test]
    fn reads_copy_of_a_subscription() {
        assert!(matches!(
            one("COPY (SUBSCRIBE TO v WITH (snapshot = false)) TO STDOUT WITH (FORMAT text)"),
            Statement::CopySubscribe(s) if !s.snapshot
        ));
        assert_eq!(
            parse("COPY (SUBSCRIBE v) TO STDOUT (FORMAT csv)")
                .unwrap_err()
                .code,
            "0A000"
        );
    }
}
