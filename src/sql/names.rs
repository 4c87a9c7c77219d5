//! Identifier rules: unquoted names fold to lower case, as in Postgres and DataFusion;
//! Weir has one database (`weir`) with one schema (`public`).

use datafusion::sql::sqlparser::ast::{Ident, ObjectName};

use super::error::{SqlError, SqlResult};

pub const CATALOG: &str = "weir";
pub const SCHEMA: &str = "public";

pub fn ident_name(ident: &Ident) -> String {
    match ident.quote_style {
        Some(_) => ident.value.clone(),
        None => ident.value.to_lowercase(),
    }
}

/// The table name an object name refers to, checking any schema and catalog qualifiers.
pub fn object_name(name: &ObjectName) -> SqlResult<String> {
    let parts: Vec<String> = name
        .0
        .iter()
        .map(|p| match p.as_ident() {
            Some(ident) => ident_name(ident),
            None => p.to_string(),
        })
        .collect();
    match parts.as_slice() {
        [table] => Ok(table.clone()),
        [schema, table] if schema == SCHEMA => Ok(table.clone()),
        [catalog, schema, table] if catalog == CATALOG && schema == SCHEMA => Ok(table.clone()),
        _ => Err(SqlError::new(
            "3F000",
            format!(
                "schema of \"{name}\" does not exist; Weir keeps every table in {CATALOG}.{SCHEMA}"
            ),
        )),
    }
}
