//! The key layout of Weir's keyspace. Integers are big-endian so keys sort numerically.

use crate::table_def::TableId;

pub const TABLE_PREFIX: &[u8] = b"catalog/table/";
pub const VIEW_PREFIX: &[u8] = b"catalog/view/";
pub const JOB_PREFIX: &[u8] = b"catalog/job/";
pub const NEXT_TABLE_ID: &[u8] = b"catalog/next_table_id";

pub fn table(name: &str) -> Vec<u8> {
    [TABLE_PREFIX, name.as_bytes()].concat()
}

pub fn view(name: &str) -> Vec<u8> {
    [VIEW_PREFIX, name.as_bytes()].concat()
}

pub fn job(id: &str) -> Vec<u8> {
    [JOB_PREFIX, id.as_bytes()].concat()
}

/// All log entries of one table share this prefix.
pub fn log_prefix(table: TableId) -> Vec<u8> {
    [b"log/".as_slice(), &table.0.to_be_bytes(), b"/"].concat()
}

pub fn log_entry(table: TableId, offset: u64) -> Vec<u8> {
    [log_prefix(table).as_slice(), &offset.to_be_bytes()].concat()
}

/// Offset of the next entry of a table's log; written in the same batch as the entries.
pub fn log_next_offset(table: TableId) -> Vec<u8> {
    [b"lognext/".as_slice(), &table.0.to_be_bytes()].concat()
}

pub fn offset_of_log_key(key: &[u8]) -> Option<u64> {
    let tail: [u8; 8] = key.get(key.len().checked_sub(8)?..)?.try_into().ok()?;
    Some(u64::from_be_bytes(tail))
}
