//! Splits a query string into statements and parses each: Weir's own statements
//! (Flink DDL, SHOW, SET, DESCRIBE) with sqlparser's primitives, everything else with
//! sqlparser plus datafusion-pg-catalog's rewrites for what Postgres clients send.

use std::sync::LazyLock;

use datafusion::sql::sqlparser::ast;
use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
use datafusion::sql::sqlparser::keywords::Keyword;
use datafusion::sql::sqlparser::parser::{Parser, ParserError};
use datafusion::sql::sqlparser::tokenizer::{Token, TokenWithSpan, Tokenizer};
use datafusion_pg_catalog::sql::PostgresCompatibilityParser;

use super::ddl::{parse_create_table, CreateTable};
use super::error::{SqlError, SqlResult};
use super::names::{ident_name, object_name};
use super::subscribe_syntax::{self, Declare, Fetch, Subscribe};
use crate::plan::window_tvf;

#[derive(Debug, Clone)]
pub enum Statement {
    CreateTable(Box<CreateTable>),
    ShowTables,
    ShowCreateTable(String),
    Describe(String),
    /// `SHOW name`; `all` lists every variable.
    ShowVariable(String),
    /// `SET name = value`; `None` is `RESET name` / `SET name TO DEFAULT`.
    SetVariable {
        name: String,
        value: Option<String>,
    },
    /// A SET form with no effect in Weir (`SET SESSION CHARACTERISTICS ...`).
    SetIgnored,
    ShowJobs,
    /// `SHOW CHECKPOINTS`: the latest checkpoints of every view and job.
    ShowCheckpoints,
    /// `STOP JOB 'id' [WITH SAVEPOINT]`.
    StopJob {
        id: String,
        savepoint: bool,
    },
    /// `STOP MATERIALIZED VIEW name WITH SAVEPOINT`: keeps the view's state as a
    /// savepoint, then drops the view.
    StopView(String),
    /// `SHOW SAVEPOINTS`.
    ShowSavepoints,
    /// `DROP SAVEPOINT 'name'`: forgets a savepoint (its state, and the changes of the
    /// updating views it read that were kept for it).
    DropSavepoint(String),
    /// `ALTER MATERIALIZED VIEW v SET PARALLELISM = n` / `ALTER JOB 'id' SET PARALLELISM = n`
    /// (RisingWave's syntax): the job goes on from a final checkpoint at `n` subtasks.
    AlterParallelism {
        target: Rescaled,
        parallelism: usize,
    },
    /// `FLUSH`: wait until everything appended so far is reflected in every view and sink.
    Flush,
    /// `SUBSCRIBE TO v | (query)`: the changelog, streamed until cancelled.
    Subscribe(Box<Subscribe>),
    /// `COPY (SUBSCRIBE ...) TO STDOUT`: the same changelog as COPY text rows.
    CopySubscribe(Box<Subscribe>),
    /// `DECLARE c CURSOR FOR ...`.
    Declare(Box<Declare>),
    /// `FETCH n FROM c [WITH (timeout = ...)]`.
    Fetch(Fetch),
    /// `CLOSE c`; `None` is `CLOSE ALL`.
    Close(Option<String>),
    Sql(Box<ast::Statement>),
}

/// What `ALTER ... SET PARALLELISM` rescales.
#[derive(Debug, Clone)]
pub enum Rescaled {
    View(String),
    Job(String),
}

/// One statement of a query string.
#[derive(Debug, Clone)]
pub struct Parsed {
    pub statement: Statement,
    /// The statement's own text.
    pub text: String,
    /// Characters before the statement in the query string, for error positions.
    pub start: usize,
}

static COMPAT: LazyLock<PostgresCompatibilityParser> =
    LazyLock::new(PostgresCompatibilityParser::new);

/// Parses every statement of `sql`; an error carries its position in `sql`.
pub fn parse(sql: &str) -> SqlResult<Vec<Parsed>> {
    split(sql)?
        .into_iter()
        .map(|(start, text)| {
            let statement = parse_one(&text).map_err(|e| e.shifted(start))?;
            Ok(Parsed {
                statement,
                text,
                start,
            })
        })
        .collect()
}

/// Splits at top-level semicolons; returns (char offset, text) of each non-empty statement.
fn split(sql: &str) -> SqlResult<Vec<(usize, String)>> {
    let tokens = Tokenizer::new(&PostgreSqlDialect {}, sql)
        .tokenize_with_location()
        .map_err(|e| SqlError::from_parser(&ParserError::TokenizerError(e.to_string()), sql))?;
    let line_starts = line_starts(sql);
    let chars: Vec<char> = sql.chars().collect();
    let offset = |t: &TokenWithSpan, end: bool| {
        let loc = if end { t.span.end } else { t.span.start };
        let line_start = line_starts
            .get(loc.line.saturating_sub(1) as usize)
            .copied()
            .unwrap_or(0);
        (line_start + loc.column.saturating_sub(1) as usize).min(chars.len())
    };
    let mut statements = Vec::new();
    let mut current: Vec<&TokenWithSpan> = Vec::new();
    for token in tokens
        .iter()
        .chain(std::iter::once(&TokenWithSpan::wrap(Token::SemiColon)))
    {
        if token.token != Token::SemiColon {
            if !matches!(token.token, Token::Whitespace(_)) {
                current.push(token);
            }
            continue;
        }
        if let (Some(first), Some(last)) = (current.first(), current.last()) {
            let (from, to) = (offset(first, false), offset(last, true));
            statements.push((from, chars[from..to.max(from)].iter().collect()));
        }
        current.clear();
    }
    Ok(statements)
}

fn line_starts(sql: &str) -> Vec<usize> {
    let mut starts = vec![0];
    for (i, c) in sql.chars().enumerate() {
        if c == '\n' {
            starts.push(i + 1);
        }
    }
    starts
}

pub(super) fn parse_one(text: &str) -> SqlResult<Statement> {
    let dialect = PostgreSqlDialect {};
    let mut p = Parser::new(&dialect)
        .try_with_sql(text)
        .map_err(|e| SqlError::from_parser(&e, text))?;
    let at = |e: ParserError| SqlError::from_parser(&e, text);
    if p.parse_keywords(&[Keyword::CREATE, Keyword::TABLE]) {
        return parse_create_table(&mut p, text).map(|t| Statement::CreateTable(Box::new(t)));
    }
    if p.parse_keyword(Keyword::SHOW) {
        return parse_show(&mut p).map_err(at);
    }
    if p.parse_one_of_keywords(&[Keyword::DESCRIBE, Keyword::DESC])
        .is_some()
    {
        let name = object_name(&p.parse_object_name(false).map_err(at)?)?;
        expect_end(&mut p).map_err(at)?;
        return Ok(Statement::Describe(name));
    }
    if p.parse_keyword(Keyword::SET) {
        return parse_set(&mut p).map_err(at);
    }
    if p.parse_keyword(Keyword::FLUSH) {
        expect_end(&mut p).map_err(at)?;
        return Ok(Statement::Flush);
    }
    if peek_word(&mut p, "stop") {
        p.next_token();
        if p.parse_keywords(&[Keyword::MATERIALIZED, Keyword::VIEW]) {
            let name = object_name(&p.parse_object_name(false).map_err(at)?)?;
            if !p.parse_keywords(&[Keyword::WITH, Keyword::SAVEPOINT]) {
                return Err(at(ParserError::ParserError(
                    "expected WITH SAVEPOINT after STOP MATERIALIZED VIEW name (DROP MATERIALIZED VIEW drops it without one)".into(),
                )));
            }
            expect_end(&mut p).map_err(at)?;
            return Ok(Statement::StopView(name));
        }
        if !peek_word(&mut p, "job") {
            return Err(at(ParserError::ParserError(
                "expected JOB or MATERIALIZED VIEW after STOP".into(),
            )));
        }
        p.next_token();
        let id = p.parse_literal_string().map_err(at)?;
        let savepoint = p.parse_keywords(&[Keyword::WITH, Keyword::SAVEPOINT]);
        expect_end(&mut p).map_err(at)?;
        return Ok(Statement::StopJob { id, savepoint });
    }
    if p.parse_keywords(&[Keyword::DROP, Keyword::SAVEPOINT]) {
        let name = p.parse_literal_string().map_err(at)?;
        expect_end(&mut p).map_err(at)?;
        return Ok(Statement::DropSavepoint(name));
    }
    if p.parse_keywords(&[Keyword::ALTER, Keyword::MATERIALIZED, Keyword::VIEW]) {
        let name = object_name(&p.parse_object_name(false).map_err(at)?)?;
        return parse_set_parallelism(&mut p, Rescaled::View(name)).map_err(at);
    }
    if peek_word(&mut p, "alter")
        && matches!(&p.peek_nth_token(1).token, Token::Word(w) if w.value.eq_ignore_ascii_case("job"))
    {
        p.next_token();
        p.next_token();
        let id = p.parse_literal_string().map_err(at)?;
        return parse_set_parallelism(&mut p, Rescaled::Job(id)).map_err(at);
    }
    if peek_word(&mut p, "subscribe") {
        p.next_token();
        return subscribe_syntax::parse_subscribe(&mut p, text)
            .map(|s| Statement::Subscribe(Box::new(s)));
    }
    if subscribe_syntax::at_copy_subscribe(&p) {
        return subscribe_syntax::parse_copy_subscribe(&mut p, text)
            .map(|s| Statement::CopySubscribe(Box::new(s)));
    }
    if p.parse_keyword(Keyword::DECLARE) {
        return subscribe_syntax::parse_declare(&mut p, text)
            .map(|d| Statement::Declare(Box::new(d)));
    }
    if p.parse_keyword(Keyword::FETCH) {
        return subscribe_syntax::parse_fetch(&mut p, text).map(Statement::Fetch);
    }
    if p.parse_keyword(Keyword::CLOSE) {
        return subscribe_syntax::parse_close(&mut p, text).map(Statement::Close);
    }
    if p.parse_keyword(Keyword::RESET) {
        let name = if p.parse_keyword(Keyword::ALL) {
            "all".to_string()
        } else {
            variable_name(&mut p).map_err(at)?
        };
        expect_end(&mut p).map_err(at)?;
        return Ok(Statement::SetVariable { name, value: None });
    }
    parse_generic(text)
}

/// Anything else: datafusion-pg-catalog's parser first (it rewrites the catalog queries
/// psql and drivers send); when that fails, plain sqlparser for a positioned error.
pub(super) fn parse_generic(text: &str) -> SqlResult<Statement> {
    let reduced = window_tvf::reduce_flink_syntax(text);
    let text = reduced.as_deref().unwrap_or(text);
    let state_ttls = crate::plan::state_ttl_hint::hints(text)?;
    match COMPAT.parse(text) {
        Ok(mut statements) if statements.len() == 1 => {
            let mut statement = statements.remove(0);
            window_tvf::rewrite_statement(&mut statement)?;
            crate::plan::state_ttl_hint::rewrite_statement(&mut statement, &state_ttls)?;
            Ok(Statement::Sql(Box::new(statement)))
        }
        Ok(_) => Err(SqlError::syntax("expected exactly one statement")),
        Err(_) if mentions_system_time(text) => Err(temporal_join_not_supported()),
        Err(compat_err) => match Parser::parse_sql(&PostgreSqlDialect {}, text) {
            Err(e) => Err(SqlError::from_parser(&e, text)),
            Ok(_) => Err(SqlError::from_parser(&compat_err, text)),
        },
    }
}

/// Whether `text` has `FOR SYSTEM_TIME` outside strings and comments: Flink's temporal
/// and lookup joins, which the Postgres grammar cannot parse.
fn mentions_system_time(text: &str) -> bool {
    let Ok(tokens) = Tokenizer::new(&PostgreSqlDialect {}, text).tokenize() else {
        return false;
    };
    // A quoted word is no keyword.
    let keywords: Vec<Keyword> = tokens
        .iter()
        .filter(|t| !matches!(t, Token::Whitespace(_)))
        .map(|t| match t {
            Token::Word(w) => w.keyword,
            _ => Keyword::NoKeyword,
        })
        .collect();
    keywords
        .windows(2)
        .any(|pair| pair == [Keyword::FOR, Keyword::SYSTEM_TIME])
}

fn temporal_join_not_supported() -> SqlError {
    SqlError::not_supported(
        "temporal and lookup joins (FOR SYSTEM_TIME AS OF) are not supported yet",
    )
    .with_hint(
        "join the table without FOR SYSTEM_TIME AS OF: a regular join keeps both inputs' rows \
         and corrects its results when the table changes (SET 'table.exec.state.ttl' bounds \
         what it keeps)",
    )
}

fn peek_word(p: &mut Parser, word: &str) -> bool {
    matches!(&p.peek_token().token, Token::Word(w) if w.quote_style.is_none() && w.value.eq_ignore_ascii_case(word))
}

/// `SET PARALLELISM { = | TO } n` after the object of an ALTER.
fn parse_set_parallelism(p: &mut Parser, target: Rescaled) -> Result<Statement, ParserError> {
    if !p.parse_keyword(Keyword::SET) || !peek_word(p, "parallelism") {
        return Err(ParserError::ParserError(
            "expected SET PARALLELISM = n (the only change ALTER makes to a running view or job)"
                .into(),
        ));
    }
    p.next_token();
    if !p.consume_token(&Token::Eq) {
        p.expect_keyword(Keyword::TO)?;
    }
    let parallelism = p.parse_literal_uint()?;
    if parallelism == 0 || parallelism > crate::stream::graph::KEY_GROUPS as u64 {
        return Err(ParserError::ParserError(format!(
            "PARALLELISM must be between 1 and {}",
            crate::stream::graph::KEY_GROUPS
        )));
    }
    expect_end(p)?;
    Ok(Statement::AlterParallelism {
        target,
        parallelism: parallelism as usize,
    })
}

fn parse_show(p: &mut Parser) -> Result<Statement, ParserError> {
    let statement = if peek_word(p, "jobs") {
        p.next_token();
        Statement::ShowJobs
    } else if peek_word(p, "checkpoints") {
        p.next_token();
        Statement::ShowCheckpoints
    } else if peek_word(p, "savepoints") {
        p.next_token();
        Statement::ShowSavepoints
    } else if p.parse_keyword(Keyword::TABLES) {
        if p.parse_one_of_keywords(&[Keyword::FROM, Keyword::IN])
            .is_some()
        {
            p.parse_object_name(false)?;
        }
        Statement::ShowTables
    } else if p.parse_keywords(&[Keyword::CREATE, Keyword::TABLE])
        || p.parse_keywords(&[Keyword::CREATE, Keyword::VIEW])
    {
        let name = p.parse_object_name(false)?;
        Statement::ShowCreateTable(
            object_name(&name).map_err(|e| ParserError::ParserError(e.message))?,
        )
    } else if p.parse_keywords(&[Keyword::TRANSACTION, Keyword::ISOLATION, Keyword::LEVEL]) {
        Statement::ShowVariable("transaction_isolation".into())
    } else if p.parse_keyword(Keyword::ALL) {
        Statement::ShowVariable("all".into())
    } else if p.parse_keywords(&[Keyword::TIME, Keyword::ZONE]) {
        Statement::ShowVariable("timezone".into())
    } else {
        Statement::ShowVariable(variable_name(p)?)
    };
    expect_end(p)?;
    Ok(statement)
}

fn parse_set(p: &mut Parser) -> Result<Statement, ParserError> {
    if p.parse_keywords(&[Keyword::SESSION, Keyword::CHARACTERISTICS])
        || p.parse_keyword(Keyword::TRANSACTION)
    {
        while p.next_token().token != Token::EOF {}
        return Ok(Statement::SetIgnored);
    }
    let _scope = p.parse_one_of_keywords(&[Keyword::SESSION, Keyword::LOCAL]);
    let name = if p.parse_keywords(&[Keyword::TIME, Keyword::ZONE]) {
        "timezone".to_string()
    } else {
        let name = variable_name(p)?;
        if !p.consume_token(&Token::Eq) {
            p.expect_keyword(Keyword::TO)?;
        }
        name
    };
    let value = if p.parse_keyword(Keyword::DEFAULT) {
        None
    } else {
        let mut items = vec![];
        loop {
            items.push(set_value_item(p)?);
            if !p.consume_token(&Token::Comma) {
                break;
            }
        }
        Some(items.join(", "))
    };
    expect_end(p)?;
    Ok(Statement::SetVariable { name, value })
}

/// A variable name: an identifier, a dotted name, or Flink's quoted key (`'table.dml-sync'`).
fn variable_name(p: &mut Parser) -> Result<String, ParserError> {
    if let Token::SingleQuotedString(s) = &p.peek_token().token {
        let s = s.clone();
        p.next_token();
        return Ok(s);
    }
    let name = p.parse_object_name(false)?;
    Ok(name
        .0
        .iter()
        .map(|part| {
            part.as_ident()
                .map(ident_name)
                .unwrap_or_else(|| part.to_string())
        })
        .collect::<Vec<_>>()
        .join("."))
}

fn set_value_item(p: &mut Parser) -> Result<String, ParserError> {
    let token = p.next_token();
    match token.token {
        Token::SingleQuotedString(s) => Ok(s),
        Token::Number(n, _) => Ok(n),
        Token::Minus => match p.next_token().token {
            Token::Number(n, _) => Ok(format!("-{n}")),
            other => p.expected("a number", TokenWithSpan::wrap(other)),
        },
        Token::Word(w) => Ok(w.value),
        _ => p.expected("a value", token),
    }
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

    #[test]
    fn splits_statements_and_keeps_their_offsets() {
        let parsed = parse("SELECT 1; ;\n SELECT 'a;b'").unwrap();
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[1].text, "SELECT 'a;b'");
        assert_eq!(parsed[1].start, 13);
    }

    #[test]
    fn syntax_errors_point_into_the_whole_query() {
        let e = parse("SELECT 1; SELECT * FROM t WHERE").unwrap_err();
        assert_eq!(e.code, "42601");
        assert_eq!(e.position, Some(32));
        let e = parse("SELECT 1;\nSELECT * FROM t WHERE a = = 1").unwrap_err();
        assert_eq!(e.position, Some(37));
    }

    #[test]
    fn reads_flink_ddl() {
        let parsed = parse(
            "CREATE TABLE IF NOT EXISTS Bid (auction BIGINT NOT NULL, price DECIMAL(10, 2), \
             ts TIMESTAMP(3), pt AS PROCTIME(), WATERMARK FOR ts AS ts - INTERVAL '5' SECOND, \
             PRIMARY KEY (auction) NOT ENFORCED) WITH ('connector' = 'datagen')",
        )
        .unwrap();
        let Statement::CreateTable(t) = &parsed[0].statement else {
            panic!("not a CREATE TABLE: {parsed:?}");
        };
        assert_eq!(t.name, "bid");
        assert!(t.if_not_exists);
        assert_eq!(t.columns.len(), 3);
        assert!(!t.columns[0].nullable);
        assert_eq!(t.computed[0].0, "pt");
        assert_eq!(t.watermark.as_ref().unwrap().0, "ts");
        assert_eq!(t.primary_key, vec!["auction".to_string()]);
        assert_eq!(t.options["connector"], "datagen");
    }

    #[test]
    fn reads_set_show_and_reset() {
        let p = |s: &str| parse(s).unwrap().remove(0).statement;
        assert!(matches!(p("SET search_path TO \"$user\", public"),
            Statement::SetVariable { name, value: Some(v) } if name == "search_path" && v == "$user, public"));
        assert!(matches!(p("SET 'table.dml-sync' = 'true'"),
            Statement::SetVariable { name, .. } if name == "table.dml-sync"));
        assert!(
            matches!(p("SET TIME ZONE 'UTC'"), Statement::SetVariable { name, .. } if name == "timezone")
        );
        assert!(matches!(p("SHOW DateStyle"), Statement::ShowVariable(n) if n == "datestyle"));
        assert!(
            matches!(p("SHOW TRANSACTION ISOLATION LEVEL"), Statement::ShowVariable(n) if n == "transaction_isolation")
        );
        assert!(matches!(
            p("RESET ALL"),
            Statement::SetVariable { value: None, .. }
        ));
    }
}
