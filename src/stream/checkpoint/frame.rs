//! A length-prefixed binary framing for task snapshots: integers, byte strings and Arrow
//! batches (as IPC streams, which keep the schema metadata state batches carry).

use std::io::Cursor;

use datafusion::arrow::ipc::reader::StreamReader;
use datafusion::arrow::ipc::writer::StreamWriter;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::{DataFusionError, Result};

#[derive(Default)]
pub struct FrameWriter {
    pub bytes: Vec<u8>,
}

impl FrameWriter {
    pub fn u64(&mut self, v: u64) {
        self.bytes.extend_from_slice(&v.to_be_bytes());
    }

    pub fn i64(&mut self, v: i64) {
        self.bytes.extend_from_slice(&v.to_be_bytes());
    }

    pub fn bytes(&mut self, b: &[u8]) {
        self.u64(b.len() as u64);
        self.bytes.extend_from_slice(b);
    }

    /// Room for `more` bytes at once (a snapshot of big state otherwise grows by
    /// doubling, each time a fresh copy the kernel has to zero).
    pub fn reserve(&mut self, more: usize) {
        self.bytes.reserve(more);
    }

    /// The batch as an IPC stream, written in place after its length (which is filled
    /// in once the stream is written).
    pub fn batch(&mut self, batch: &RecordBatch) -> Result<()> {
        let at = self.bytes.len();
        self.u64(0);
        self.bytes.reserve(crate::stream::batch_bytes(batch) + 1024);
        let mut writer = StreamWriter::try_new(&mut self.bytes, batch.schema_ref())?;
        writer.write(batch)?;
        writer.finish()?;
        drop(writer);
        let len = (self.bytes.len() - at - 8) as u64;
        self.bytes[at..at + 8].copy_from_slice(&len.to_be_bytes());
        Ok(())
    }
}

pub struct FrameReader<'a> {
    bytes: &'a [u8],
    at: usize,
}

fn corrupt(what: &str) -> DataFusionError {
    DataFusionError::Internal(format!("a stored checkpoint is corrupt: {what}"))
}

impl<'a> FrameReader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, at: 0 }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .at
            .checked_add(n)
            .filter(|e| *e <= self.bytes.len())
            .ok_or_else(|| corrupt("it ends early"))?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    pub fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_be_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    pub fn i64(&mut self) -> Result<i64> {
        Ok(i64::from_be_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    pub fn bytes(&mut self) -> Result<&'a [u8]> {
        let n = self.u64()? as usize;
        self.take(n)
    }

    pub fn batch(&mut self) -> Result<RecordBatch> {
        let bytes = self.bytes()?;
        let mut reader = StreamReader::try_new(Cursor::new(bytes), None)?;
        reader
            .next()
            .ok_or_else(|| corrupt("a state batch is missing"))?
            .map_err(Into::into)
    }
}
