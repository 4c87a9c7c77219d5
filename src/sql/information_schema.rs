//! `information_schema`, as views over pg_catalog, so tools that read it (Grafana,
//! generic SQL clients) see Postgres type names (`bigint`, `timestamp without time zone`)
//! rather than Arrow's (`Int64`).

use std::sync::{Arc, OnceLock, Weak};

use async_trait::async_trait;
use datafusion::catalog::{CatalogProvider, MemoryCatalogProvider, SchemaProvider, TableProvider};
use datafusion::common::Result;
use datafusion::datasource::TableType;
use datafusion::prelude::SessionContext;

use super::schema::view_table;

const TABLES: &str =
    "SELECT 'weir' AS table_catalog, n.nspname AS table_schema, c.relname AS table_name, \
     CASE c.relkind WHEN 'v' THEN 'VIEW' ELSE 'BASE TABLE' END AS table_type \
     FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
     WHERE c.relkind IN ('r', 'v')";

const COLUMNS: &str =
    "SELECT 'weir' AS table_catalog, n.nspname AS table_schema, c.relname AS table_name, \
     a.attname AS column_name, CAST(a.attnum AS INT) AS ordinal_position, \
     CAST(NULL AS TEXT) AS column_default, \
     CASE WHEN a.attnotnull THEN 'NO' ELSE 'YES' END AS is_nullable, \
     CASE t.typname \
       WHEN 'int2' THEN 'smallint' WHEN 'int4' THEN 'integer' WHEN 'int8' THEN 'bigint' \
       WHEN 'float4' THEN 'real' WHEN 'float8' THEN 'double precision' \
       WHEN 'bool' THEN 'boolean' WHEN 'varchar' THEN 'character varying' \
       WHEN 'bpchar' THEN 'character' \
       WHEN 'time' THEN 'time without time zone' WHEN 'timetz' THEN 'time with time zone' \
       WHEN 'timestamp' THEN 'timestamp without time zone' \
       WHEN 'timestamptz' THEN 'timestamp with time zone' \
       ELSE t.typname END AS data_type, \
     t.typname AS udt_name \
     FROM pg_catalog.pg_attribute a \
     JOIN pg_catalog.pg_class c ON a.attrelid = c.oid \
     JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
     JOIN pg_catalog.pg_type t ON t.oid = a.atttypid \
     WHERE a.attnum > 0 AND c.relkind IN ('r', 'v')";

const SCHEMATA: &str = "SELECT 'weir' AS catalog_name, nspname AS schema_name, \
     'postgres' AS schema_owner FROM pg_catalog.pg_namespace";

pub const INFORMATION_SCHEMA: &str = "information_schema";

const VIEWS: &[(&str, &str)] = &[
    ("tables", TABLES),
    ("columns", COLUMNS),
    ("schemata", SCHEMATA),
];

#[derive(Debug, Default)]
pub struct InformationSchema {
    context: OnceLock<Weak<SessionContext>>,
}

impl InformationSchema {
    pub fn set_context(&self, ctx: &Arc<SessionContext>) {
        let _ = self.context.set(Arc::downgrade(ctx));
    }
}

#[async_trait]
impl SchemaProvider for InformationSchema {
    fn table_names(&self) -> Vec<String> {
        VIEWS.iter().map(|(name, _)| name.to_string()).collect()
    }

    async fn table(&self, name: &str) -> Result<Option<Arc<dyn TableProvider>>> {
        match VIEWS.iter().find(|(view, _)| *view == name) {
            Some((view, sql)) => view_table(&self.context, view, sql).await.map(Some),
            None => Ok(None),
        }
    }

    async fn table_type(&self, name: &str) -> Result<Option<TableType>> {
        Ok(self.table_exist(name).then_some(TableType::View))
    }

    fn table_exist(&self, name: &str) -> bool {
        VIEWS.iter().any(|(view, _)| *view == name)
    }
}

/// The `weir` catalog: its schemas, plus `information_schema`, which resolves by name but
/// is not listed, as in Postgres where it is off the search path. Listing it would put
/// its views among the user's in pg_class, where tools (SQLAlchemy) would report them.
#[derive(Debug)]
pub struct WeirCatalog {
    schemas: MemoryCatalogProvider,
    information_schema: Arc<InformationSchema>,
}

impl WeirCatalog {
    pub fn new(information_schema: Arc<InformationSchema>) -> Self {
        Self {
            schemas: MemoryCatalogProvider::new(),
            information_schema,
        }
    }
}

impl CatalogProvider for WeirCatalog {
    fn schema_names(&self) -> Vec<String> {
        self.schemas.schema_names()
    }

    fn schema(&self, name: &str) -> Option<Arc<dyn SchemaProvider>> {
        if name == INFORMATION_SCHEMA {
            return Some(self.information_schema.clone());
        }
        self.schemas.schema(name)
    }

    fn register_schema(
        &self,
        name: &str,
        schema: Arc<dyn SchemaProvider>,
    ) -> Result<Option<Arc<dyn SchemaProvider>>> {
        self.schemas.register_schema(name, schema)
    }

    fn deregister_schema(
        &self,
        name: &str,
        cascade: bool,
    ) -> Result<Option<Arc<dyn SchemaProvider>>> {
        self.schemas.deregister_schema(name, cascade)
    }
}
