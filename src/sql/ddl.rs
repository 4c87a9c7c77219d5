//! Flink's CREATE TABLE, read with sqlparser's primitives:
//! columns, `name AS expr` computed columns, `WATERMARK FOR col AS expr`,
//! `PRIMARY KEY (k) NOT ENFORCED`, and `WITH ('key' = 'value', ...)`.

use std::collections::BTreeMap;

use datafusion::sql::sqlparser::ast::Expr;
use datafusion::sql::sqlparser::keywords::Keyword;
use datafusion::sql::sqlparser::parser::{Parser, ParserError};
use datafusion::sql::sqlparser::tokenizer::Token;
use weir_catalog::{ColumnDef, SqlType};

use super::error::{sqlstate, SqlError, SqlResult};
use super::names::{ident_name, object_name};
use super::types::sql_type;

#[derive(Debug, Clone)]
pub struct CreateTable {
    pub name: String,
    pub if_not_exists: bool,
    pub columns: Vec<ColumnDef>,
    pub computed: Vec<(String, Expr)>,
    pub watermark: Option<(String, Expr)>,
    pub primary_key: Vec<String>,
    pub options: BTreeMap<String, String>,
    /// `CREATE TABLE t [WITH (...)] AS query`: the query's text; the table takes its columns.
    pub as_query: Option<String>,
}

/// Parses what follows `CREATE TABLE`.
pub fn parse_create_table(p: &mut Parser, text: &str) -> SqlResult<CreateTable> {
    parse_create_table_body(p, text).map_err(|e| e.locate(text))
}

/// The rest of `text` from the next token on: the query of CREATE TABLE ... AS.
fn rest_of(p: &mut Parser, text: &str) -> String {
    let at = p.peek_token().span.start;
    let line_start: usize = text
        .split_inclusive('\n')
        .take(at.line.saturating_sub(1) as usize)
        .map(|l| l.chars().count())
        .sum();
    text.chars()
        .skip(line_start + at.column.saturating_sub(1) as usize)
        .collect()
}

fn parse_create_table_body(p: &mut Parser, text: &str) -> SqlResult<CreateTable> {
    let if_not_exists = p.parse_keywords(&[Keyword::IF, Keyword::NOT, Keyword::EXISTS]);
    let name = object_name(&p.parse_object_name(false).map_err(syntax)?)?;
    let mut table = CreateTable {
        name,
        if_not_exists,
        columns: vec![],
        computed: vec![],
        watermark: None,
        primary_key: vec![],
        options: BTreeMap::new(),
        as_query: None,
    };
    if p.peek_token().token == Token::LParen {
        p.expect_token(&Token::LParen).map_err(syntax)?;
        loop {
            parse_element(p, &mut table)?;
            if p.consume_token(&Token::Comma) {
                continue;
            }
            p.expect_token(&Token::RParen).map_err(syntax)?;
            break;
        }
    } else if !p.peek_keyword(Keyword::WITH) && !p.peek_keyword(Keyword::AS) {
        return Err(syntax(
            p.expected::<()>("a column list, WITH or AS", p.peek_token())
                .unwrap_err(),
        ));
    }
    if p.parse_keyword(Keyword::COMMENT) {
        p.parse_literal_string().map_err(syntax)?;
    }
    if p.parse_keyword(Keyword::WITH) {
        table.options = parse_options(p)?;
    }
    if p.parse_keyword(Keyword::AS) {
        if !table.columns.is_empty() {
            return Err(SqlError::not_supported(
                "CREATE TABLE ... AS takes its columns from the query; leave out the column list",
            ));
        }
        table.as_query = Some(rest_of(p, text));
        return Ok(table);
    }
    if table.columns.is_empty() {
        return Err(syntax(
            p.expected::<()>(
                "AS query (a table without columns takes them from a query)",
                p.peek_token(),
            )
            .unwrap_err(),
        ));
    }
    if p.peek_token().token != Token::EOF {
        return Err(syntax(
            p.expected::<()>("end of CREATE TABLE", p.peek_token())
                .unwrap_err(),
        ));
    }
    check_columns(&table)?;
    Ok(table)
}

fn parse_element(p: &mut Parser, table: &mut CreateTable) -> SqlResult<()> {
    if parse_word(p, "WATERMARK") {
        p.expect_keyword(Keyword::FOR).map_err(syntax)?;
        let column = ident_name(&p.parse_identifier().map_err(syntax)?);
        p.expect_keyword(Keyword::AS).map_err(syntax)?;
        let expr = p.parse_expr().map_err(syntax)?;
        if table.watermark.replace((column, expr)).is_some() {
            return Err(SqlError::syntax("a table can have only one WATERMARK"));
        }
        return Ok(());
    }
    if p.parse_keyword(Keyword::CONSTRAINT) {
        p.parse_identifier().map_err(syntax)?;
    }
    if p.parse_keywords(&[Keyword::PRIMARY, Keyword::KEY]) {
        let columns = p
            .parse_parenthesized_column_list(
                datafusion::sql::sqlparser::parser::IsOptional::Mandatory,
                false,
            )
            .map_err(syntax)?;
        parse_not_enforced(p)?;
        return set_primary_key(table, columns.iter().map(ident_name).collect());
    }
    let name = ident_name(&p.parse_identifier().map_err(syntax)?);
    if p.parse_keyword(Keyword::AS) {
        let expr = p.parse_expr().map_err(syntax)?;
        table.computed.push((name, expr));
        return Ok(());
    }
    let data_type = sql_type(&p.parse_data_type().map_err(syntax)?)?;
    let mut nullable = true;
    let mut metadata = None;
    loop {
        if p.parse_keywords(&[Keyword::NOT, Keyword::NULL]) {
            nullable = false;
        } else if p.parse_keyword(Keyword::NULL) {
            nullable = true;
        } else if p.parse_keywords(&[Keyword::PRIMARY, Keyword::KEY]) {
            parse_not_enforced(p)?;
            set_primary_key(table, vec![name.clone()])?;
        } else if p.parse_keyword(Keyword::COMMENT) {
            p.parse_literal_string().map_err(syntax)?;
        } else if p.parse_keyword(Keyword::METADATA) {
            // Flink: `METADATA [FROM 'key'] [VIRTUAL]`; Weir never writes metadata.
            metadata = Some(if p.parse_keyword(Keyword::FROM) {
                p.parse_literal_string().map_err(syntax)?
            } else {
                name.clone()
            });
            parse_word(p, "VIRTUAL");
        } else {
            break;
        }
    }
    table.columns.push(ColumnDef {
        name,
        data_type,
        nullable,
        metadata,
    });
    Ok(())
}

/// Consumes `word` if it is next; for Flink words sqlparser has no keyword for.
fn parse_word(p: &mut Parser, word: &str) -> bool {
    match &p.peek_token().token {
        Token::Word(w) if w.quote_style.is_none() && w.value.eq_ignore_ascii_case(word) => {
            p.next_token();
            true
        }
        _ => false,
    }
}

/// Flink requires `NOT ENFORCED`: Weir, like Flink, does not check key uniqueness.
fn parse_not_enforced(p: &mut Parser) -> SqlResult<()> {
    if p.parse_keywords(&[Keyword::NOT, Keyword::ENFORCED]) {
        Ok(())
    } else {
        Err(SqlError::syntax(
            "PRIMARY KEY must be declared NOT ENFORCED: Weir does not check uniqueness of keys",
        )
        .with_hint("write PRIMARY KEY (col) NOT ENFORCED"))
    }
}

fn set_primary_key(table: &mut CreateTable, columns: Vec<String>) -> SqlResult<()> {
    if !table.primary_key.is_empty() {
        return Err(SqlError::new(
            sqlstate::INVALID_COLUMN_REFERENCE,
            "multiple primary keys are not allowed",
        ));
    }
    table.primary_key = columns;
    Ok(())
}

fn parse_options(p: &mut Parser) -> SqlResult<BTreeMap<String, String>> {
    p.expect_token(&Token::LParen).map_err(syntax)?;
    let mut options = BTreeMap::new();
    if p.consume_token(&Token::RParen) {
        return Ok(options);
    }
    loop {
        let key = p.parse_literal_string().map_err(syntax)?;
        p.expect_token(&Token::Eq).map_err(syntax)?;
        let value = p.parse_literal_string().map_err(syntax)?;
        if options.insert(key.clone(), value).is_some() {
            return Err(SqlError::new(
                sqlstate::INVALID_PARAMETER_VALUE,
                format!("option '{key}' is given twice"),
            ));
        }
        if !p.consume_token(&Token::Comma) {
            break;
        }
    }
    p.expect_token(&Token::RParen).map_err(syntax)?;
    Ok(options)
}

/// Column names are unique; keys and watermarks name stored columns.
fn check_columns(table: &CreateTable) -> SqlResult<()> {
    let mut seen = std::collections::HashSet::new();
    let names = table
        .columns
        .iter()
        .map(|c| &c.name)
        .chain(table.computed.iter().map(|(n, _)| n));
    for name in names {
        if !seen.insert(name) {
            return Err(SqlError::new(
                sqlstate::DUPLICATE_COLUMN,
                format!("column \"{name}\" specified more than once"),
            ));
        }
    }
    if table.columns.is_empty() {
        return Err(SqlError::syntax("a table needs at least one column"));
    }
    let stored = |name: &str| table.columns.iter().find(|c| c.name == name);
    for key in &table.primary_key {
        if stored(key).is_none() {
            return Err(undefined_column(key, "PRIMARY KEY"));
        }
    }
    if let Some((column, _)) = &table.watermark {
        let is_computed = table.computed.iter().any(|(n, _)| n == column);
        match stored(column) {
            Some(c) if matches!(c.data_type, SqlType::Timestamp(_) | SqlType::TimestampLtz(_)) => {}
            Some(c) => {
                return Err(SqlError::new(
                    sqlstate::DATATYPE_MISMATCH,
                    format!(
                        "WATERMARK column \"{column}\" is {}; it must be TIMESTAMP(p) or TIMESTAMP_LTZ(p)",
                        c.data_type
                    ),
                ))
            }
            None if is_computed => {}
            None => return Err(undefined_column(column, "WATERMARK")),
        }
    }
    Ok(())
}

fn undefined_column(name: &str, clause: &str) -> SqlError {
    SqlError::new(
        sqlstate::UNDEFINED_COLUMN,
        format!("column \"{name}\" named in {clause} is not a column of the table"),
    )
}

/// Keeps sqlparser's location in the message; [`SqlError::locate`] turns it into a
/// position once the statement text is at hand.
fn syntax(e: ParserError) -> SqlError {
    SqlError::unlocated_parser_error(&e)
}
