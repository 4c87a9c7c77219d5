//! The catalog: tables and views by name, persisted in the store, cached in memory.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use crate::error::{CatalogError, Result};
use crate::keys;
use crate::store::{StateStore, WriteBatch};
use crate::table_def::{JobDef, TableDef, TableId, ViewDef};
use crate::table_log::TableLog;

#[derive(Debug, Default)]
struct Entries {
    tables: BTreeMap<String, Arc<TableDef>>,
    views: BTreeMap<String, Arc<ViewDef>>,
    jobs: BTreeMap<String, Arc<JobDef>>,
    next_table_id: u64,
}

/// Tables and views share one namespace, as relations do in Postgres.
#[derive(Debug)]
pub struct Catalog {
    store: Arc<dyn StateStore>,
    log: TableLog,
    entries: RwLock<Entries>,
}

impl Catalog {
    /// Loads the catalog persisted in `store`.
    pub fn open(store: Arc<dyn StateStore>) -> Result<Self> {
        let mut entries = Entries {
            next_table_id: 1,
            ..Default::default()
        };
        for (key, value) in store.scan_prefix(keys::TABLE_PREFIX)? {
            let def: TableDef = parse_entry(&key, &value)?;
            entries.tables.insert(def.name.clone(), Arc::new(def));
        }
        for (key, value) in store.scan_prefix(keys::VIEW_PREFIX)? {
            let def: ViewDef = parse_entry(&key, &value)?;
            entries.views.insert(def.name.clone(), Arc::new(def));
        }
        for (key, value) in store.scan_prefix(keys::JOB_PREFIX)? {
            let def: JobDef = parse_entry(&key, &value)?;
            entries.jobs.insert(def.id.clone(), Arc::new(def));
        }
        if let Some(bytes) = store.get(keys::NEXT_TABLE_ID)? {
            entries.next_table_id = parse_entry(keys::NEXT_TABLE_ID, &bytes)?;
        }
        Ok(Self {
            log: TableLog::new(store.clone()),
            store,
            entries: RwLock::new(entries),
        })
    }

    /// Makes every write so far durable.
    pub fn flush(&self) -> Result<()> {
        self.store.flush()
    }

    /// The keyspace everything is persisted in (checkpoints live beside the catalog).
    pub fn store(&self) -> Arc<dyn StateStore> {
        self.store.clone()
    }

    pub fn table_log(&self) -> &TableLog {
        &self.log
    }

    pub fn table(&self, name: &str) -> Option<Arc<TableDef>> {
        self.read().tables.get(name).cloned()
    }

    pub fn view(&self, name: &str) -> Option<Arc<ViewDef>> {
        self.read().views.get(name).cloned()
    }

    pub fn tables(&self) -> Vec<Arc<TableDef>> {
        self.read().tables.values().cloned().collect()
    }

    pub fn views(&self) -> Vec<Arc<ViewDef>> {
        self.read().views.values().cloned().collect()
    }

    pub fn jobs(&self) -> Vec<Arc<JobDef>> {
        self.read().jobs.values().cloned().collect()
    }

    pub fn create_job(&self, def: JobDef) -> Result<()> {
        let mut entries = self.write();
        let mut write = WriteBatch::default();
        write.put(keys::job(&def.id), to_json(&def));
        self.commit(write)?;
        entries.jobs.insert(def.id.clone(), Arc::new(def));
        Ok(())
    }

    /// Returns false when the job did not exist.
    pub fn drop_job(&self, id: &str) -> Result<bool> {
        let mut entries = self.write();
        if !entries.jobs.contains_key(id) {
            return Ok(false);
        }
        let mut write = WriteBatch::default();
        write.delete(keys::job(id));
        self.commit(write)?;
        entries.jobs.remove(id);
        Ok(true)
    }

    pub fn exists(&self, name: &str) -> bool {
        let entries = self.read();
        entries.tables.contains_key(name) || entries.views.contains_key(name)
    }

    /// Registers a table; `def.id` is ignored and a fresh id assigned.
    /// Returns `None` when the name is taken and `if_not_exists` is set.
    pub fn create_table(
        &self,
        mut def: TableDef,
        if_not_exists: bool,
    ) -> Result<Option<Arc<TableDef>>> {
        let mut entries = self.write();
        if entries.tables.contains_key(&def.name) || entries.views.contains_key(&def.name) {
            return if if_not_exists {
                Ok(None)
            } else {
                Err(CatalogError::AlreadyExists {
                    kind: "relation",
                    name: def.name,
                })
            };
        }
        def.id = TableId(entries.next_table_id);
        let mut write = WriteBatch::default();
        write.put(keys::table(&def.name), to_json(&def));
        write.put(keys::NEXT_TABLE_ID, to_json(&(def.id.0 + 1)));
        self.commit(write)?;
        entries.next_table_id = def.id.0 + 1;
        let def = Arc::new(def);
        entries.tables.insert(def.name.clone(), def.clone());
        Ok(Some(def))
    }

    /// Drops a table and its log. Returns false when it did not exist.
    pub fn drop_table(&self, name: &str) -> Result<bool> {
        let mut entries = self.write();
        let Some(def) = entries.tables.get(name).cloned() else {
            return Ok(false);
        };
        check_no_dependents(&entries, "table", name)?;
        let mut write = WriteBatch::default();
        write.delete(keys::table(name));
        self.log.delete_into(def.id, &mut write)?;
        self.commit(write)?;
        entries.tables.remove(name);
        Ok(true)
    }

    pub fn create_view(&self, def: ViewDef, or_replace: bool) -> Result<()> {
        let mut entries = self.write();
        let taken_by_view = entries.views.contains_key(&def.name);
        if entries.tables.contains_key(&def.name) || (taken_by_view && !or_replace) {
            return Err(CatalogError::AlreadyExists {
                kind: "relation",
                name: def.name,
            });
        }
        let mut write = WriteBatch::default();
        write.put(keys::view(&def.name), to_json(&def));
        self.commit(write)?;
        entries.views.insert(def.name.clone(), Arc::new(def));
        Ok(())
    }

    /// Returns false when the view did not exist.
    pub fn drop_view(&self, name: &str) -> Result<bool> {
        let mut entries = self.write();
        if !entries.views.contains_key(name) {
            return Ok(false);
        }
        check_no_dependents(&entries, "view", name)?;
        let mut write = WriteBatch::default();
        write.delete(keys::view(name));
        self.commit(write)?;
        entries.views.remove(name);
        Ok(true)
    }

    fn commit(&self, write: WriteBatch) -> Result<()> {
        self.store.apply(write)?;
        self.store.flush()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Entries> {
        self.entries.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Entries> {
        self.entries.write().unwrap_or_else(|p| p.into_inner())
    }
}

fn check_no_dependents(entries: &Entries, kind: &'static str, name: &str) -> Result<()> {
    let views: Vec<&str> = entries
        .views
        .values()
        .filter(|v| v.depends_on.iter().any(|d| d == name))
        .map(|v| v.name.as_str())
        .collect();
    let jobs: Vec<&str> = entries
        .jobs
        .values()
        .filter(|j| j.depends_on.iter().any(|d| d == name))
        .map(|j| j.id.as_str())
        .collect();
    let mut dependents = Vec::new();
    if !views.is_empty() {
        dependents.push(format!("view(s) {}", views.join(", ")));
    }
    if !jobs.is_empty() {
        dependents.push(format!("job(s) {} (STOP JOB first)", jobs.join(", ")));
    }
    if dependents.is_empty() {
        Ok(())
    } else {
        Err(CatalogError::HasDependents {
            kind,
            name: name.to_string(),
            dependents: dependents.join(" and "),
        })
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("catalog entries always serialise")
}

fn parse_entry<T: serde::de::DeserializeOwned>(key: &[u8], value: &[u8]) -> Result<T> {
    serde_json::from_slice(value).map_err(|e| CatalogError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SledStore;
    use crate::table_def::ColumnDef;
    use crate::types::SqlType;

    fn table(name: &str) -> TableDef {
        TableDef {
            id: TableId(0),
            name: name.into(),
            columns: vec![ColumnDef {
                name: "id".into(),
                data_type: SqlType::BigInt,
                nullable: false,
                metadata: None,
            }],
            computed: vec![],
            primary_key: vec![],
            watermark: None,
            options: BTreeMap::new(),
        }
    }

    #[test]
    fn tables_and_views_persist_and_share_a_namespace() {
        let dir = tempfile::tempdir().unwrap();
        {
            let catalog = Catalog::open(Arc::new(SledStore::open(dir.path()).unwrap())).unwrap();
            let t = catalog.create_table(table("t"), false).unwrap().unwrap();
            assert_eq!(t.id, TableId(1));
            assert!(catalog.create_table(table("t"), true).unwrap().is_none());
            assert!(matches!(
                catalog.create_table(table("t"), false),
                Err(CatalogError::AlreadyExists { .. })
            ));
            catalog
                .create_view(
                    ViewDef {
                        name: "v".into(),
                        query: "SELECT * FROM t".into(),
                        depends_on: vec!["t".into()],
                        materialized: false,
                        settings: Default::default(),
                    },
                    false,
                )
                .unwrap();
            assert!(catalog.create_table(table("v"), false).is_err());
        }
        let catalog = Catalog::open(Arc::new(SledStore::open(dir.path()).unwrap())).unwrap();
        assert_eq!(catalog.table("t").unwrap().id, TableId(1));
        assert!(catalog.view("v").is_some());
        assert!(matches!(
            catalog.drop_table("t"),
            Err(CatalogError::HasDependents { .. })
        ));
        assert!(catalog.drop_view("v").unwrap());
        assert!(catalog.drop_table("t").unwrap());
        assert!(!catalog.drop_table("t").unwrap());
        // A re-created table gets a new id, so it never sees the old log.
        assert_eq!(
            catalog.create_table(table("t"), false).unwrap().unwrap().id,
            TableId(2)
        );
    }
}
