//! The `filesystem` connector: CSV or newline-delimited JSON files, and Debezium change
//! events ('debezium-json', read only) that make the table a changelog.
//!
//! As a source, `'path'` is a file or a directory whose regular files are read in name
//! order (names starting with `.` or `_`, such as files still being written, are
//! skipped); file i goes to split i % splits ([`Share`]: a split restored at another
//! parallelism skips the files, and the parts of files, the old splits read). Bounded.
//! A bad record fails the job with its file and line, or with
//! `'<format>.ignore-parse-errors'` is skipped and counted.
//!
//! As a sink (csv and json), `'path'` is a directory. Sink subtask s of job j writes rows to a hidden
//! `.part-j-s-n.csv.inprogress` file; at a barrier it syncs it, and when the epoch commits
//! it is renamed to `part-j-s-n.csv`, so readers only ever see whole, committed files.

use std::fs::{self, File};
use std::io::{BufRead, BufReader, BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use datafusion::common::Result;
use weir_catalog::TableDef;

use super::factory::{blocking, invalid, opt_bool, to_df};
use super::format::{Format, RecordDecoder, RecordEncoder};
use super::io::{SinkWriter, SplitReader};
use super::share::{Share, UnitProgress};
use crate::sql::error::{sqlstate, SqlError, SqlResult};
use crate::stream::checkpoint::Precommit;
use crate::stream::message::ChangeBatch;

fn format_of(def: &TableDef) -> SqlResult<Format> {
    match Format::named(def, "format")? {
        Some(Format::Raw) => Err(SqlError::not_supported(
            "the filesystem connector reads 'csv', 'json' and 'debezium-json' and writes \
             'csv' and 'json', not 'raw'",
        )),
        Some(f) => Ok(f),
        None => Err(invalid("connector 'filesystem' needs option 'format'")),
    }
}

/// Refuses a filesystem sink in a format it cannot write (a changelog format).
pub fn check_sink_format(def: &TableDef) -> SqlResult<()> {
    RecordEncoder::new(def, format_of(def)?).map(|_| ())
}

fn io_error(what: &str, path: &Path, e: std::io::Error) -> SqlError {
    SqlError::new(
        sqlstate::IO_ERROR,
        format!("cannot {what} '{}': {e}", path.display()),
    )
}

/// The files a source path names: the file itself, or a directory's visible files by name.
pub(crate) fn list_files(path: &Path) -> SqlResult<Vec<PathBuf>> {
    let meta = fs::metadata(path).map_err(|e| io_error("read path", path, e))?;
    if !meta.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    for entry in fs::read_dir(path).map_err(|e| io_error("list directory", path, e))? {
        let entry = entry.map_err(|e| io_error("list directory", path, e))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') || name.starts_with('_') {
            continue;
        }
        let is_file = fs::metadata(entry.path()).is_ok_and(|m| m.is_file());
        if is_file {
            files.push(entry.path());
        }
    }
    files.sort();
    Ok(files)
}

/// Where a split is in a file: the next record's byte offset and 1-based line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct FileAt {
    offset: u64,
    line: u64,
}

impl Default for FileAt {
    fn default() -> Self {
        Self { offset: 0, line: 1 }
    }
}

impl UnitProgress for FileAt {
    const BYTES: usize = 16;
    fn put(&self, out: &mut Vec<u8>) {
        out.extend(self.offset.to_le_bytes());
        out.extend(self.line.to_le_bytes());
    }
    fn get(bytes: &[u8]) -> Self {
        let word = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().expect("8 bytes"));
        Self {
            offset: word(0),
            line: word(8),
        }
    }
}

/// A hash of the names of the files listed, in order (FNV-1a: stable across builds).
/// A position records it: file i of another listing is another file, so a restore in
/// the middle of one is refused rather than reading files twice or not at all.
fn listing_hash(files: &[PathBuf]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for file in files {
        let name = file.file_name().map(|n| n.to_string_lossy().into_owned());
        for byte in name.unwrap_or_default().bytes().chain([0]) {
            hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    hash
}

/// What a position says of the files listed: their names' hash and how many.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Listing {
    hash: u64,
    files: u64,
}

impl Listing {
    fn of(files: &[PathBuf]) -> Self {
        Self {
            hash: listing_hash(files),
            files: files.len() as u64,
        }
    }

    fn put(&self, out: &mut Vec<u8>) {
        out.extend(self.hash.to_le_bytes());
        out.extend(self.files.to_le_bytes());
    }
}

/// A position's listing and its split's place; positions stored before listings were
/// recorded (a unit count and `FileAt`, 24 bytes) have none.
fn split_position(position: &[u8]) -> (Option<Listing>, &[u8]) {
    const BEFORE_LISTINGS: usize = 8 + FileAt::BYTES;
    if position.len() == BEFORE_LISTINGS || position.len() < 16 {
        return (None, position);
    }
    let word = |i: usize| u64::from_le_bytes(position[i..i + 8].try_into().expect("8 bytes"));
    let listing = Listing {
        hash: word(0),
        files: word(8),
    };
    (Some(listing), &position[16..])
}

fn files_changed(def: &TableDef) -> SqlError {
    let path = def.options.get("path").map_or("", String::as_str);
    SqlError::new(
        "55000",
        format!(
            "the files under '{path}' are not those table \"{}\" listed when its reading \
             started, so where it was in them cannot be restored",
            def.name
        ),
    )
    .with_hint(
        "put the files back as they were, or drop the views and jobs reading the table and \
         create them again to read the files as they are now",
    )
}

/// A filesystem source's splits' positions merged into one every split of another
/// parallelism restores.
pub fn merge_positions(def: &TableDef, positions: &[&[u8]]) -> SqlResult<Vec<u8>> {
    let mut listing: Option<Listing> = None;
    let mut places = Vec::with_capacity(positions.len());
    for position in positions {
        let (recorded, place) = split_position(position);
        if let Some(recorded) = recorded {
            if listing.is_some_and(|l| l != recorded) {
                return Err(files_changed(def));
            }
            listing = Some(recorded);
        }
        places.push(place);
    }
    // Positions stored before listings were recorded are taken as of the files now.
    let listing = match listing {
        Some(listing) => listing,
        None => Listing::of(&list_files(Path::new(source_path(def)?))?),
    };
    let mut merged = Vec::new();
    listing.put(&mut merged);
    merged.extend(super::share::merge::<FileAt>(&places)?);
    Ok(merged)
}

fn source_path(def: &TableDef) -> SqlResult<&str> {
    def.options
        .get("path")
        .map(String::as_str)
        .ok_or_else(|| invalid("connector 'filesystem' needs option 'path'"))
}

struct SourceState {
    /// Every file of the path; the share says which this split reads.
    files: Vec<PathBuf>,
    /// What positions record of the files: those listed when the reading started.
    listing: Listing,
    /// Restored past every file of a listing other than `files`: nothing is left.
    finished: bool,
    share: Share<FileAt>,
    decoder: RecordDecoder,
    batch_size: usize,
    ignore_errors: bool,
    /// The next record of the share's current file: byte offset and 1-based line.
    offset: u64,
    line: u64,
    reader: Option<BufReader<File>>,
    skipped: u64,
}

pub struct FileSource {
    def: TableDef,
    state: Option<SourceState>,
    /// Copies of the state's position and skip count, readable while a read is running.
    position: Vec<u8>,
    skipped: u64,
}

impl FileSource {
    pub fn open(def: &TableDef, split: usize, splits: usize, batch_size: usize) -> SqlResult<Self> {
        let format = format_of(def)?;
        let files = list_files(Path::new(source_path(def)?))?;
        let state = SourceState {
            listing: Listing::of(&files),
            finished: false,
            files,
            share: Share::new(split, splits),
            decoder: RecordDecoder::new(def, format, def.physical_schema())?,
            batch_size,
            ignore_errors: opt_bool(def, format.ignore_errors_option())?,
            offset: 0,
            line: 1,
            reader: None,
            skipped: 0,
        };
        Ok(Self {
            def: def.clone(),
            position: state.position(),
            state: Some(state),
            skipped: 0,
        })
    }
}

impl SourceState {
    fn file(&self) -> usize {
        self.share.unit() as usize
    }

    fn path(&self) -> &Path {
        &self.files[self.file()]
    }

    fn position(&self) -> Vec<u8> {
        let mut position = Vec::new();
        self.listing.put(&mut position);
        position.extend(self.share.position(FileAt {
            offset: self.offset,
            line: self.line,
        }));
        position
    }

    fn go_to(&mut self, at: FileAt) {
        self.offset = at.offset;
        self.line = at.line;
        self.reader = None;
    }

    fn next_file(&mut self) {
        let at = self.share.pass();
        self.go_to(at);
    }

    fn read_batch(&mut self) -> SqlResult<Option<ChangeBatch>> {
        loop {
            if self.finished || self.file() >= self.files.len() {
                return Ok(None);
            }
            if self.reader.is_none() {
                let path = self.path().to_path_buf();
                let mut f = File::open(&path).map_err(|e| io_error("open file", &path, e))?;
                f.seek(SeekFrom::Start(self.offset))
                    .map_err(|e| io_error("read file", &path, e))?;
                self.reader = Some(BufReader::with_capacity(1 << 16, f));
            }
            let (buf, records, eof) = self.read_records()?;
            let batch = if records.is_empty() {
                None
            } else {
                Some(self.decode(&buf, &records)?)
            };
            if eof {
                self.next_file();
            }
            match batch {
                Some(b) if b.num_rows() > 0 => return Ok(Some(b)),
                _ => continue,
            }
        }
    }

    /// Up to a batch of records: their bytes (each ending in a newline), each record's
    /// range and first line, and whether the file ended.
    #[allow(clippy::type_complexity)]
    fn read_records(&mut self) -> SqlResult<(Vec<u8>, Vec<(usize, usize, u64)>, bool)> {
        let path = self.path().to_path_buf();
        let reader = self.reader.as_mut().expect("opened");
        let mut buf = Vec::new();
        let mut records = Vec::new();
        let mut eof = false;
        while records.len() < self.batch_size {
            let start = buf.len();
            let line = self.line;
            let mut quotes = 0usize;
            loop {
                let from = buf.len();
                let n = reader
                    .read_until(b'\n', &mut buf)
                    .map_err(|e| io_error("read file", &path, e))?;
                if n == 0 {
                    eof = true;
                    break;
                }
                self.line += 1;
                self.offset += n as u64;
                // A CSV record goes on while a quoted field is open.
                if self.decoder.format() != Format::Csv {
                    break;
                }
                quotes += buf[from..].iter().filter(|&&b| b == b'"').count();
                if quotes.is_multiple_of(2) {
                    break;
                }
            }
            if buf[start..].iter().all(|b| b.is_ascii_whitespace()) {
                buf.truncate(start);
                if eof {
                    break;
                }
                continue;
            }
            if buf.last() != Some(&b'\n') {
                buf.push(b'\n');
            }
            records.push((start, buf.len(), line));
            if eof {
                break;
            }
        }
        Ok((buf, records, eof))
    }

    fn decode(&mut self, buf: &[u8], records: &[(usize, usize, u64)]) -> SqlResult<ChangeBatch> {
        let ranges: Vec<_> = records.iter().map(|&(start, end, _)| start..end).collect();
        let mut skipped = 0;
        let (rows, _) = self.decoder.decode(buf, &ranges, |i, problem| {
            if self.ignore_errors {
                skipped += 1;
                Ok(())
            } else {
                Err(self.bad_record(records[i].2, problem))
            }
        })?;
        self.skipped += skipped;
        Ok(rows)
    }

    fn bad_record(&self, line: u64, problem: String) -> SqlError {
        let format = self.decoder.format();
        let option = format.ignore_errors_option();
        SqlError::new(
            sqlstate::INVALID_TEXT_REPRESENTATION,
            format!(
                "bad {} record in file '{}' at line {line}: {problem}",
                format.name(),
                self.path().display(),
            ),
        )
        .with_hint(format!(
            "fix the record, or set '{option}' = 'true' to skip bad records"
        ))
    }
}

#[async_trait]
impl SplitReader for FileSource {
    async fn next_batch(&mut self) -> Result<Option<ChangeBatch>> {
        let batch = blocking(&mut self.state, |s| s.read_batch()).await?;
        let s = self.state.as_ref().expect("restored after the read");
        self.position = s.position();
        self.skipped = s.skipped;
        batch.map_err(to_df)
    }

    fn position(&self) -> Vec<u8> {
        self.position.clone()
    }

    fn restore(&mut self, position: &[u8]) -> Result<()> {
        let s = self
            .state
            .as_mut()
            .ok_or_else(|| to_df(SqlError::internal("filesystem source used after a failure")))?;
        let (listing, place) = split_position(position);
        let at = s.share.restore(place).map_err(to_df)?;
        s.go_to(at);
        if let Some(listing) = listing.filter(|l| *l != s.listing) {
            // A split that had read all its files is done, whatever came since; one in
            // the middle of them cannot tell which files are which.
            if s.share.unit() < listing.files {
                return Err(to_df(files_changed(&self.def)));
            }
            s.listing = listing;
            s.finished = true;
        }
        self.position = s.position();
        Ok(())
    }

    fn skipped_records(&self) -> u64 {
        self.skipped
    }
}

// ---- sink ----

struct InProgress {
    temp: PathBuf,
    done: PathBuf,
    file: BufWriter<File>,
}

struct SinkState {
    dir: PathBuf,
    /// `part-<job>-<subtask>-`
    prefix: String,
    extension: &'static str,
    encoder: RecordEncoder,
    next_part: u64,
    current: Option<InProgress>,
}

pub struct FileSink {
    state: Option<SinkState>,
}

fn file_safe(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

impl FileSink {
    pub fn open(def: &TableDef, subtask: usize, job_id: &str) -> SqlResult<Self> {
        let dir = PathBuf::from(
            def.options
                .get("path")
                .ok_or_else(|| invalid("connector 'filesystem' needs option 'path'"))?,
        );
        let format = format_of(def)?;
        let encoder = RecordEncoder::new(def, format)?;
        if dir.is_file() {
            return Err(invalid(format!(
                "sink path '{}' is a file; a filesystem sink writes files into a directory",
                dir.display()
            )));
        }
        fs::create_dir_all(&dir).map_err(|e| io_error("create directory", &dir, e))?;
        let prefix = format!("part-{}-{subtask}-", file_safe(job_id));
        let ext = format.name();
        // Continue after the parts an earlier run made visible; drop what it left in
        // progress (never committed).
        let mut next_part = 0;
        for entry in fs::read_dir(&dir).map_err(|e| io_error("list directory", &dir, e))? {
            let entry = entry.map_err(|e| io_error("list directory", &dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(n) = name
                .strip_prefix(&prefix)
                .and_then(|r| r.strip_suffix(&format!(".{ext}")))
                .and_then(|n| n.parse::<u64>().ok())
            {
                next_part = next_part.max(n + 1);
            } else if name.starts_with(&format!(".{prefix}")) && name.ends_with(".inprogress") {
                fs::remove_file(entry.path())
                    .map_err(|e| io_error("remove file", &entry.path(), e))?;
            }
        }
        Ok(Self {
            state: Some(SinkState {
                dir,
                prefix,
                extension: format.name(),
                encoder,
                next_part,
                current: None,
            }),
        })
    }
}

impl SinkState {
    fn write(&mut self, batch: &RecordBatch) -> SqlResult<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        if self.current.is_none() {
            let name = format!("{}{}.{}", self.prefix, self.next_part, self.extension);
            let temp = self.dir.join(format!(".{name}.inprogress"));
            let file = File::create(&temp).map_err(|e| io_error("create file", &temp, e))?;
            self.current = Some(InProgress {
                temp,
                done: self.dir.join(name),
                file: BufWriter::with_capacity(1 << 16, file),
            });
        }
        let out = self.current.as_mut().expect("created");
        let mut buf = Vec::new();
        self.encoder.write(batch, &mut buf)?;
        out.file
            .write_all(&buf)
            .map_err(|e| io_error("write file", &out.temp, e))?;
        Ok(())
    }

    fn flush(&mut self) -> SqlResult<()> {
        let finished = self.finish()?;
        crate::stream::checkpoint::coordinator::publish_files(&finished)
            .map_err(|e| SqlError::new(sqlstate::IO_ERROR, e.to_string()))
    }

    /// Syncs the part being written and returns it (hidden name, visible name) without
    /// publishing it: that happens when the epoch commits.
    fn finish(&mut self) -> SqlResult<Vec<(PathBuf, PathBuf)>> {
        let Some(mut part) = self.current.take() else {
            return Ok(vec![]);
        };
        part.file
            .flush()
            .map_err(|e| io_error("write file", &part.temp, e))?;
        let file = part.file.get_ref();
        let len = file
            .metadata()
            .map_err(|e| io_error("write file", &part.temp, e))?
            .len();
        if len == 0 {
            fs::remove_file(&part.temp).map_err(|e| io_error("remove file", &part.temp, e))?;
            return Ok(vec![]);
        }
        file.sync_all()
            .map_err(|e| io_error("write file", &part.temp, e))?;
        self.next_part += 1;
        Ok(vec![(part.temp, part.done)])
    }
}

#[async_trait]
impl SinkWriter for FileSink {
    async fn write(&mut self, batch: RecordBatch) -> Result<()> {
        blocking(&mut self.state, move |s| s.write(&batch))
            .await?
            .map_err(to_df)
    }

    async fn flush(&mut self) -> Result<()> {
        blocking(&mut self.state, |s| s.flush())
            .await?
            .map_err(to_df)
    }

    async fn precommit(&mut self) -> Result<Option<Precommit>> {
        let files = blocking(&mut self.state, |s| s.finish())
            .await?
            .map_err(to_df)?;
        Ok(Some(Precommit::Files(files)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connector::factory::test_util::{read_rescaled, table};
    use arrow::array::{Array, AsArray, Int32Array, StringArray, TimestampMillisecondArray};
    use arrow::compute::concat_batches;
    use arrow::datatypes::{Int32Type, TimestampMillisecondType};
    use std::sync::Arc;
    use weir_catalog::SqlType;

    /// A CSV table of [`cols`] over the files of `dir`.
    fn csv_source(dir: &Path) -> TableDef {
        let path = dir.to_str().unwrap();
        table(
            &cols(),
            &[
                ("connector", "filesystem"),
                ("path", path),
                ("format", "csv"),
            ],
        )
    }

    fn cols() -> Vec<(&'static str, SqlType)> {
        vec![
            ("id", SqlType::Int),
            ("name", SqlType::Varchar(None)),
            ("ts", SqlType::Timestamp(3)),
        ]
    }

    async fn read(def: &TableDef, splits: usize) -> (Vec<RecordBatch>, u64) {
        let mut out = vec![];
        let mut skipped = 0;
        for k in 0..splits {
            let mut r = FileSource::open(def, k, splits, 2).unwrap();
            while let Some(b) = r.next_batch().await.unwrap().map(|c| c.rows) {
                assert_eq!(b.schema(), def.physical_schema());
                out.push(b);
            }
            skipped += r.skipped_records();
        }
        (out, skipped)
    }

    fn ids(batches: &[RecordBatch]) -> Vec<i32> {
        let mut v: Vec<i32> = batches
            .iter()
            .flat_map(|b| b.column(0).as_primitive::<Int32Type>().values().to_vec())
            .collect();
        v.sort();
        v
    }

    const MS_2023_11_14_09: i64 = 1_699_952_400_000;

    #[tokio::test]
    async fn reads_csv_files_and_directories_over_splits() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("a.csv"),
            "1,abc,2023-11-14 09:00:00.123\n2,\"x, \"\"y\"\"\",2023-11-14 09:00:01\n\n3,,2023-11-14T09:00:02\n",
        )
        .unwrap();
        fs::write(dir.path().join("b.csv"), "4,d,2023-11-14 09:00:03").unwrap();
        fs::write(dir.path().join(".hidden.csv"), "garbage\n").unwrap();
        fs::write(dir.path().join("_tmp"), "garbage\n").unwrap();
        let def = csv_source(dir.path());
        let (batches, _) = read(&def, 1).await;
        assert_eq!(ids(&batches), vec![1, 2, 3, 4]);
        let first = &batches[0];
        assert_eq!(first.column(1).as_string::<i32>().value(1), "x, \"y\"");
        assert_eq!(
            first
                .column(2)
                .as_primitive::<TimestampMillisecondType>()
                .value(0),
            MS_2023_11_14_09 + 123
        );
        let (three, _) = read(&def, 3).await;
        assert_eq!(ids(&three), vec![1, 2, 3, 4]);

        // A single file.
        let file = dir.path().join("b.csv");
        let def = table(
            &cols(),
            &[
                ("connector", "filesystem"),
                ("path", file.to_str().unwrap()),
                ("format", "csv"),
            ],
        );
        assert_eq!(ids(&read(&def, 1).await.0), vec![4]);
    }

    #[tokio::test]
    async fn reads_json_lines_with_both_timestamp_styles() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("a.json"),
            "{\"id\": 1, \"name\": \"a\", \"ts\": \"2023-11-14 09:00:00.123\"}\n\
             {\"ts\": \"2023-11-14T09:00:00.5\", \"id\": 2, \"other\": true}\n",
        )
        .unwrap();
        let def = table(
            &cols(),
            &[
                ("connector", "filesystem"),
                ("path", dir.path().to_str().unwrap()),
                ("format", "json"),
            ],
        );
        let (batches, _) = read(&def, 1).await;
        assert_eq!(ids(&batches), vec![1, 2]);
        let b = &batches[0];
        let ts = b.column(2).as_primitive::<TimestampMillisecondType>();
        assert_eq!(ts.value(0), MS_2023_11_14_09 + 123);
        assert_eq!(ts.value(1), MS_2023_11_14_09 + 500);
        assert!(b.column(1).is_null(1));
    }

    #[tokio::test]
    async fn bad_records_fail_with_file_and_line_or_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("a.csv"),
            "1,a,2023-11-14 09:00:00\n2,b,2023-11-14 09:00:00\nthree,c,2023-11-14 09:00:00\n4,d,2023-11-14 09:00:00\n5,e\n",
        )
        .unwrap();
        let def = csv_source(dir.path());
        let mut r = FileSource::open(&def, 0, 1, 2).unwrap();
        r.next_batch().await.unwrap().map(|c| c.rows).unwrap();
        let e = SqlError::from(r.next_batch().await.unwrap_err());
        assert_eq!(e.code, sqlstate::INVALID_TEXT_REPRESENTATION);
        assert!(e.message.contains("a.csv' at line 3"), "{}", e.message);
        assert!(
            e.message.contains("'three'") && e.message.contains("\"id\""),
            "{}",
            e.message
        );
        assert!(e.hint.unwrap().contains("csv.ignore-parse-errors"));

        let path = dir.path().to_str().unwrap();
        let def = table(
            &cols(),
            &[
                ("connector", "filesystem"),
                ("path", path),
                ("format", "csv"),
                ("csv.ignore-parse-errors", "true"),
            ],
        );
        let (batches, skipped) = read(&def, 1).await;
        assert_eq!(ids(&batches), vec![1, 2, 4]);
        assert_eq!(skipped, 2);

        fs::write(dir.path().join("a.csv"), "").unwrap();
        fs::write(
            dir.path().join("b.json"),
            "{\"id\": 1}\n{\"id\": \n{\"id\": 3}\n",
        )
        .unwrap();
        let json = |ignore: &str| {
            table(
                &cols(),
                &[
                    ("connector", "filesystem"),
                    ("path", path),
                    ("format", "json"),
                    ("json.ignore-parse-errors", ignore),
                ],
            )
        };
        let (batches, skipped) = read(&json("true"), 1).await;
        assert_eq!((ids(&batches), skipped), (vec![1, 3], 1));
        let mut r = FileSource::open(&json("false"), 0, 1, 10).unwrap();
        let e = SqlError::from(r.next_batch().await.unwrap_err());
        assert!(e.message.contains("b.json' at line 2"), "{}", e.message);
    }

    #[tokio::test]
    async fn debezium_files_give_changes_and_report_bad_events_by_line() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("a.json"),
            "{\"after\": {\"id\": 1, \"name\": \"a\"}, \"op\": \"c\"}\n\n\
             {\"before\": {\"id\": 1, \"name\": \"a\"}, \"after\": {\"id\": 1, \"name\": \"b\"}, \"op\": \"u\"}\n\
             {\"after\": {\"id\": 2}, \"op\": \"d\"}\n\
             {\"before\": {\"id\": 1, \"name\": \"b\"}, \"op\": \"d\"}\n",
        )
        .unwrap();
        let def = |ignore: &str| {
            table(
                &cols(),
                &[
                    ("connector", "filesystem"),
                    ("path", dir.path().to_str().unwrap()),
                    ("format", "debezium-json"),
                    ("debezium-json.ignore-parse-errors", ignore),
                ],
            )
        };
        let mut r = FileSource::open(&def("true"), 0, 1, 10).unwrap();
        let c = r.next_batch().await.unwrap().unwrap();
        assert!(r.next_batch().await.unwrap().is_none());
        assert_eq!(r.skipped_records(), 1);
        let ops: Vec<i8> = c.ops.unwrap().values().to_vec();
        assert_eq!(ops, vec![0, 1, 2, 3]);
        let names = c.rows.column(1).as_string::<i32>();
        assert_eq!(
            (0..4).map(|i| names.value(i)).collect::<Vec<_>>(),
            vec!["a", "a", "b", "b"]
        );
        let mut r = FileSource::open(&def("false"), 0, 1, 10).unwrap();
        let e = SqlError::from(r.next_batch().await.unwrap_err());
        assert_eq!(e.code, sqlstate::INVALID_TEXT_REPRESENTATION);
        assert!(
            e.message.contains("bad debezium-json record in file '")
                && e.message.contains("a.json' at line 4: \"before\" is null"),
            "{}",
            e.message
        );
        assert!(e
            .hint
            .unwrap()
            .contains("debezium-json.ignore-parse-errors"));
        let e = FileSink::open(&def("false"), 0, "j").err().unwrap();
        assert_eq!(e.code, sqlstate::FEATURE_NOT_SUPPORTED);
    }

    fn sample() -> RecordBatch {
        let def = table(&cols(), &[]);
        RecordBatch::try_new(
            def.physical_schema(),
            vec![
                Arc::new(Int32Array::from(vec![1, 2, 3])),
                Arc::new(StringArray::from(vec![
                    Some("a,b"),
                    None,
                    Some("line\nbreak"),
                ])),
                Arc::new(TimestampMillisecondArray::from(vec![
                    MS_2023_11_14_09 + 123,
                    MS_2023_11_14_09,
                    MS_2023_11_14_09 + 1,
                ])),
            ],
        )
        .unwrap()
    }

    #[tokio::test]
    async fn sink_round_trips_and_hides_files_in_progress() {
        for format in ["csv", "json"] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().to_str().unwrap();
            let def = table(
                &cols(),
                &[
                    ("connector", "filesystem"),
                    ("path", path),
                    ("format", format),
                ],
            );
            let mut sink = FileSink::open(&def, 0, "job/1").unwrap();
            sink.write(sample()).await.unwrap();
            // Not visible before the flush.
            assert!(list_files(dir.path()).unwrap().is_empty());
            let hidden = fs::read_dir(dir.path()).unwrap().count();
            assert_eq!(hidden, 1);
            sink.flush().await.unwrap();
            sink.flush().await.unwrap();
            sink.write(sample()).await.unwrap();
            sink.flush().await.unwrap();
            let files = list_files(dir.path()).unwrap();
            let names: Vec<String> = files
                .iter()
                .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
                .collect();
            assert_eq!(
                names,
                vec![
                    format!("part-job_1-0-0.{format}"),
                    format!("part-job_1-0-1.{format}")
                ]
            );
            if format == "csv" {
                let text = fs::read_to_string(&files[0]).unwrap();
                assert!(
                    text.starts_with("1,\"a,b\",2023-11-14 09:00:00.123\n"),
                    "{text}"
                );
            }
            let (batches, _) = read(&def, 2).await;
            let all = concat_batches(&def.physical_schema(), &batches).unwrap();
            let expected = concat_batches(&def.physical_schema(), &[sample(), sample()]).unwrap();
            assert_eq!(all, expected, "{format}");

            // A new run of the same job and subtask continues the numbering.
            let mut sink = FileSink::open(&def, 0, "job/1").unwrap();
            sink.write(sample()).await.unwrap();
            drop(sink);
            let mut sink = FileSink::open(&def, 0, "job/1").unwrap();
            assert_eq!(
                fs::read_dir(dir.path()).unwrap().count(),
                2,
                "stale part removed"
            );
            sink.write(sample()).await.unwrap();
            sink.flush().await.unwrap();
            assert!(dir.path().join(format!("part-job_1-0-2.{format}")).exists());
        }
    }

    #[tokio::test]
    async fn more_types_round_trip() {
        let cols = [
            ("b", SqlType::Boolean),
            ("bi", SqlType::BigInt),
            ("d", SqlType::Double),
            (
                "dec",
                SqlType::Decimal {
                    precision: 10,
                    scale: 2,
                },
            ),
            ("dt", SqlType::Date),
            ("ltz", SqlType::TimestampLtz(3)),
            ("us", SqlType::Timestamp(6)),
        ];
        for format in ["csv", "json"] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().to_str().unwrap();
            let def = table(
                &cols,
                &[
                    ("connector", "datagen"),
                    ("number-of-rows", "50"),
                    ("rows-per-second", "1000000"),
                    ("seed", "7"),
                    ("fields.d.max", "1000"),
                    ("fields.bi.null-rate", "0.2"),
                ],
            );
            let mut gen = crate::connector::datagen::DatagenReader::open(&def, 0, 1, 100).unwrap();
            let data = gen.next_batch().await.unwrap().map(|c| c.rows).unwrap();
            let sink_def = table(&cols, &[("path", path), ("format", format)]);
            let mut sink = FileSink::open(&sink_def, 3, "j").unwrap();
            sink.write(data.clone()).await.unwrap();
            sink.flush().await.unwrap();
            let (back, _) = read(&sink_def, 1).await;
            let back = concat_batches(&sink_def.physical_schema(), &back).unwrap();
            assert_eq!(back, data, "{format}");
        }
    }

    #[tokio::test]
    async fn rescaled_readers_read_every_record_once() {
        // Five files of different lengths; moves land inside files.
        let dir = tempfile::tempdir().unwrap();
        let mut id = 0;
        for (file, lines) in [("a", 7), ("b", 1), ("c", 12), ("d", 0), ("e", 5)] {
            let text: String = (0..lines)
                .map(|_| {
                    id += 1;
                    format!("{id},n,2023-11-14 09:00:00\n")
                })
                .collect();
            fs::write(dir.path().join(format!("{file}.csv")), text).unwrap();
        }
        let def = csv_source(dir.path());
        let straight = read_rescaled(&def, &[(1, 0)], 2).await;
        assert_eq!(straight.len(), 25);
        for layouts in [
            &[(2, 2), (3, 0)][..],
            &[(3, 1), (2, 0), (4, 0), (1, 1), (5, 0)],
            &[(5, 1), (2, 0)],
        ] {
            assert_eq!(
                read_rescaled(&def, layouts, 2).await,
                straight,
                "{layouts:?}"
            );
        }
    }

    #[tokio::test]
    async fn restore_resumes_after_the_last_batch() {
        let dir = tempfile::tempdir().unwrap();
        let lines: String = (1..=7)
            .map(|i| format!("{i},n,2023-11-14 09:00:00\n"))
            .collect();
        fs::write(dir.path().join("a.csv"), &lines).unwrap();
        fs::write(dir.path().join("b.csv"), &lines).unwrap();
        let def = csv_source(dir.path());
        let mut r = FileSource::open(&def, 0, 1, 3).unwrap();
        let mut seen = vec![];
        for _ in 0..3 {
            seen.push(r.next_batch().await.unwrap().map(|c| c.rows).unwrap());
        }
        let pos = r.position();
        let mut rest = vec![];
        while let Some(b) = r.next_batch().await.unwrap().map(|c| c.rows) {
            rest.push(b);
        }
        let done = r.position();
        let mut again = FileSource::open(&def, 0, 1, 3).unwrap();
        again.restore(&pos).unwrap();
        let mut rest2 = vec![];
        while let Some(b) = again.next_batch().await.unwrap().map(|c| c.rows) {
            rest2.push(b);
        }
        assert_eq!(rest, rest2);
        assert_eq!(ids(&seen).len() + ids(&rest).len(), 14);
        // A position stored before listings were hashed (unit count, offset, line)
        // restores as it did: the second file, from its fourth line.
        let offset = lines
            .lines()
            .take(3)
            .map(|l| l.len() as u64 + 1)
            .sum::<u64>();
        let legacy: Vec<u8> = [1u64, offset, 4]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let mut old = FileSource::open(&def, 0, 1, 3).unwrap();
        old.restore(&legacy).unwrap();
        let mut tail = vec![];
        while let Some(b) = old.next_batch().await.unwrap().map(|c| c.rows) {
            tail.push(b);
        }
        assert_eq!(ids(&tail), vec![4, 5, 6, 7]);
        // Another file among them: file 1 is not what it was, and the restore says so.
        fs::write(dir.path().join("0.csv"), &lines).unwrap();
        let mut changed = FileSource::open(&def, 0, 1, 3).unwrap();
        let e = SqlError::from(changed.restore(&pos).unwrap_err());
        assert_eq!(e.code, "55000", "{}", e.message);
        assert!(e.message.contains("are not those table"), "{}", e.message);
        // And so does a rescale merging positions of different listings.
        let now = FileSource::open(&def, 0, 1, 3).unwrap().position();
        let e = merge_positions(&def, &[&pos, &now]).unwrap_err();
        assert_eq!(e.code, "55000");
        // A split that had read all its files is done, whatever came since.
        let mut finished = FileSource::open(&def, 0, 1, 3).unwrap();
        finished.restore(&done).unwrap();
        assert!(finished.next_batch().await.unwrap().is_none());
        assert_eq!(finished.position(), done, "and stays so");
    }
}
