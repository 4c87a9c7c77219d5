//! Runs every `sql-tests/**/*.slt` file over the real pgwire endpoint, once with the
//! extended protocol (prepared statements, binary results) and once with the simple one.
//! The streaming and updating files run a third time against a server process that is
//! killed (SIGKILL) and restarted after every FLUSH, at parallelism 2: each pipeline
//! must resume from its checkpoint and give the same rows. A fourth run rescales every
//! running view and job after every FLUSH (parallelism 2 to 3, 3 to 2, ...), with
//! unaligned checkpoints: each goes on from its checkpoint with its state (and what was
//! in flight) moved between subtasks, and gives the same rows. A fifth keeps their state
//! on disk ('state.backend' = 'sled' with no memory) and gives the same rows (EXPLAIN's
//! notes of what goes to disk aside).

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use sqllogictest::{DBOutput, DefaultColumnType};
use tokio_postgres::types::{FromSql, Type};
use tokio_postgres::{Client, SimpleQueryMessage};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Protocol {
    Extended,
    Simple,
}

struct Weir {
    client: Client,
    protocol: Protocol,
    /// Kill mode: the server is killed and restarted after every FLUSH.
    restarts: Option<Arc<Restarts>>,
    /// Rescale mode: the parallelism every running job is moved to after the next FLUSH.
    rescale_to: Option<usize>,
    /// The session's SET statements, replayed on the new connection after a restart.
    settings: Vec<String>,
}

/// The server process of a kill-mode run.
struct Restarts {
    process: Mutex<Option<common::WeirProcess>>,
    data_dir: PathBuf,
}

impl Restarts {
    fn port(&self) -> u16 {
        self.process.lock().unwrap().as_ref().expect("running").port
    }

    async fn kill_and_restart(self: &Arc<Self>) -> u16 {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut process = this.process.lock().unwrap();
            if let Some(p) = process.take() {
                p.kill_9();
            }
            let started = common::WeirProcess::start(&this.data_dir);
            let port = started.port;
            *process = Some(started);
            port
        })
        .await
        .unwrap()
    }
}

#[derive(Debug)]
struct DbError(tokio_postgres::Error);

impl std::fmt::Display for DbError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.as_db_error() {
            Some(db) => write!(f, "{}: {}", db.code().code(), db.message()),
            None => write!(f, "{}", self.0),
        }
    }
}

impl std::error::Error for DbError {}

#[async_trait]
impl sqllogictest::AsyncDB for Weir {
    type Error = DbError;
    type ColumnType = DefaultColumnType;

    async fn run(&mut self, sql: &str) -> Result<DBOutput<DefaultColumnType>, DbError> {
        let out = match self.protocol {
            Protocol::Extended => self.run_extended(sql).await,
            Protocol::Simple => self.run_simple(sql).await,
        }
        .map_err(DbError)?;
        if self.rescale_to.is_some() && is_flush(sql) {
            self.rescale_all().await?;
        }
        if let Some(restarts) = self.restarts.clone() {
            let statement = sql.trim().trim_end_matches(';').to_ascii_uppercase();
            if statement.starts_with("SET ") || statement.starts_with("RESET ") {
                self.settings.push(sql.to_string());
            }
            if is_flush(sql) {
                let port = restarts.kill_and_restart().await;
                self.client = common::connect(port).await;
                for set in &self.settings {
                    self.client.simple_query(set).await.map_err(DbError)?;
                }
            }
        }
        Ok(out)
    }

    async fn shutdown(&mut self) {}

    fn engine_name(&self) -> &str {
        "weir"
    }

    async fn sleep(dur: std::time::Duration) {
        tokio::time::sleep(dur).await
    }

    fn error_sql_state(err: &DbError) -> Option<String> {
        err.0.code().map(|c| c.code().to_string())
    }
}

fn is_flush(sql: &str) -> bool {
    sql.trim()
        .trim_end_matches(';')
        .eq_ignore_ascii_case("FLUSH")
}

impl Weir {
    /// Moves every running view and job to the next parallelism (3, 2, 3, ...). One whose
    /// operators would connect differently there cannot move in place (0A000) and stays.
    async fn rescale_all(&mut self) -> Result<(), DbError> {
        let to = self.rescale_to.expect("rescale mode");
        let jobs = self
            .client
            .simple_query("SHOW JOBS")
            .await
            .map_err(DbError)?;
        for message in jobs {
            let SimpleQueryMessage::Row(row) = message else {
                continue;
            };
            let (Some(id), Some("RUNNING")) = (row.get(0), row.get(2)) else {
                continue;
            };
            let alter = format!("ALTER JOB '{id}' SET PARALLELISM = {to}");
            if let Err(e) = self.client.simple_query(&alter).await {
                if e.code().map(|c| c.code()) != Some("0A000") {
                    return Err(DbError(e));
                }
            }
        }
        self.rescale_to = Some(if to == 3 { 2 } else { 3 });
        Ok(())
    }

    async fn run_extended(
        &self,
        sql: &str,
    ) -> Result<DBOutput<DefaultColumnType>, tokio_postgres::Error> {
        let statement = self.client.prepare(sql).await?;
        if statement.columns().is_empty() {
            let n = self.client.execute(&statement, &[]).await?;
            return Ok(DBOutput::StatementComplete(n));
        }
        let rows = self.client.query(&statement, &[]).await?;
        let types = vec![DefaultColumnType::Any; statement.columns().len()];
        let rows = rows
            .iter()
            .map(|row| {
                (0..row.len())
                    .map(|i| binary_value_to_text(row, i))
                    .collect()
            })
            .collect();
        Ok(DBOutput::Rows { types, rows })
    }

    async fn run_simple(
        &self,
        sql: &str,
    ) -> Result<DBOutput<DefaultColumnType>, tokio_postgres::Error> {
        let messages = self.client.simple_query(sql).await?;
        let mut columns = None;
        let mut rows = vec![];
        let mut count = 0;
        for message in messages {
            match message {
                SimpleQueryMessage::RowDescription(desc) => columns = Some(desc.len()),
                SimpleQueryMessage::Row(row) => rows.push(
                    (0..row.len())
                        .map(|i| match row.get(i) {
                            None => "NULL".to_string(),
                            Some("") => "(empty)".to_string(),
                            Some(v) => v.to_string(),
                        })
                        .collect(),
                ),
                SimpleQueryMessage::CommandComplete(n) => count = n,
                _ => {}
            }
        }
        Ok(match columns {
            Some(n) => DBOutput::Rows {
                types: vec![DefaultColumnType::Any; n],
                rows,
            },
            None => DBOutput::StatementComplete(count),
        })
    }
}

/// Postgres' text rendering of a binary-format value, so both protocols must agree.
fn binary_value_to_text(row: &tokio_postgres::Row, i: usize) -> String {
    fn get<'a, T: FromSql<'a>>(row: &'a tokio_postgres::Row, i: usize) -> Option<T> {
        row.try_get::<_, Option<T>>(i)
            .unwrap_or_else(|e| panic!("column {i}: {e}"))
    }
    let ty = row.columns()[i].type_().clone();
    let text = match ty {
        Type::BOOL => get::<bool>(row, i).map(|b| if b { "t" } else { "f" }.to_string()),
        Type::INT2 => get::<i16>(row, i).map(|v| v.to_string()),
        Type::INT4 => get::<i32>(row, i).map(|v| v.to_string()),
        Type::INT8 => get::<i64>(row, i).map(|v| v.to_string()),
        Type::OID => get::<u32>(row, i).map(|v| v.to_string()),
        // pgwire's text format writes floats the way ryu does ("1.0"); so does Debug.
        Type::FLOAT4 => get::<f32>(row, i).map(|v| format!("{v:?}")),
        Type::FLOAT8 => get::<f64>(row, i).map(|v| format!("{v:?}")),
        Type::NUMERIC => get::<rust_decimal::Decimal>(row, i).map(|v| v.to_string()),
        Type::DATE => get::<chrono::NaiveDate>(row, i).map(|v| v.to_string()),
        // pgwire's text format always shows six fractional digits; match it.
        Type::TIME => {
            get::<chrono::NaiveTime>(row, i).map(|v| v.format("%H:%M:%S%.6f").to_string())
        }
        Type::TIMESTAMP => get::<chrono::NaiveDateTime>(row, i)
            .map(|v| v.format("%Y-%m-%d %H:%M:%S%.6f").to_string()),
        Type::TIMESTAMPTZ => get::<chrono::DateTime<chrono::Utc>>(row, i)
            .map(|v| v.format("%Y-%m-%d %H:%M:%S%.6f+00").to_string()),
        Type::INTERVAL => get::<pg_interval::Interval>(row, i).map(|v| v.to_postgres()),
        Type::BYTEA => get::<Vec<u8>>(row, i)
            .map(|v| "\\x".to_string() + &v.iter().map(|b| format!("{b:02x}")).collect::<String>()),
        _ => get::<String>(row, i),
    };
    match text {
        None => "NULL".into(),
        Some(s) if s.is_empty() => "(empty)".into(),
        Some(s) => s,
    }
}

/// Compares line by line; a value spanning lines (SHOW CREATE TABLE) is split into
/// its lines, and each line is compared after the runner's normalisation.
fn validate_lines(
    normalizer: sqllogictest::Normalizer,
    actual: &[Vec<String>],
    expected: &[String],
) -> bool {
    let actual: Vec<String> = actual
        .iter()
        .flat_map(|row| {
            let line = row.join(" ");
            line.lines()
                .map(|l| normalizer(&l.to_string()))
                .collect::<Vec<_>>()
        })
        .collect();
    let expected: Vec<String> = expected.iter().map(normalizer).collect();
    actual == expected
}

fn slt_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .expect("sql-tests exists")
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            slt_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "slt") {
            out.push(path);
        }
    }
}

async fn run_all(protocol: Protocol) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("sql-tests");
    let mut files = vec![];
    slt_files(&root, &mut files);
    assert!(!files.is_empty(), "no .slt files under {}", root.display());
    let mut failures = vec![];
    for file in selected(&files) {
        let dir = tempfile::tempdir().unwrap();
        let server = common::TestServer::start(dir.path()).await;
        let port = server.port;
        let mut runner = sqllogictest::Runner::new(move || async move {
            Ok(Weir {
                client: common::connect(port).await,
                protocol,
                restarts: None,
                rescale_to: None,
                settings: vec![],
            })
        });
        runner.with_validator(validate_lines);
        // A Kafka cluster of librdkafka's own (in this process) for the Kafka files.
        let kafka = rdkafka::mocking::MockCluster::new(1).expect("mock kafka cluster");
        runner.set_var("KAFKA_BOOTSTRAP".into(), kafka.bootstrap_servers());
        runner.add_label(match protocol {
            Protocol::Extended => "extended",
            Protocol::Simple => "simple",
        });
        if let Err(e) = runner.run_file_async(file).await {
            failures.push(format!("{}: {}", file.display(), e.display(true)));
        }
        server.stop().await;
        drop(kafka);
    }
    assert_passed(&failures, "");
}

/// The files whose path contains SLT_FILTER (all when it is unset).
fn selected(files: &[PathBuf]) -> Vec<&PathBuf> {
    let filter = std::env::var("SLT_FILTER").unwrap_or_default();
    files
        .iter()
        .filter(|f| f.to_string_lossy().contains(&filter))
        .collect()
}

fn assert_passed(failures: &[String], how: &str) {
    assert!(
        failures.is_empty(),
        "{} file(s) failed{how}:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

/// The streaming and updating files: pipelines with a final result.
fn pipelines_with_a_final_result() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("sql-tests");
    let mut files = vec![];
    slt_files(&root.join("streaming"), &mut files);
    slt_files(&root.join("updating"), &mut files);
    // A subscription's cursor lives in its connection: it cannot outlive the server.
    files.retain(|f| !f.ends_with("subscribe.slt"));
    files
}

/// The streaming pipelines with a final result, rescaled at every FLUSH.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_sql_tests_give_the_same_rows_when_rescaled_at_every_flush() {
    // Unaligned checkpoints here (the kill-mode run keeps aligned ones): what is in
    // flight at the checkpoint a rescale starts from moves with its keys.
    run_pipelines_in_process(
        "SET 'parallelism.default' = '2'; SET 'execution.checkpointing.unaligned' = 'true'",
        Some(3),
        ("rescales", " when rescaled"),
        validate_lines,
    )
    .await;
}

/// The streaming pipelines with a final result, with their state on disk: the sled state
/// backend with no memory, so every operator that can keeps all its state there between
/// batches or barriers. EXPLAIN's notes of where state goes are left out of both sides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_sql_tests_give_the_same_rows_with_state_on_disk() {
    run_pipelines_in_process(
        "SET 'parallelism.default' = '2'; SET 'state.backend' = 'sled'; \
         SET 'state.backend.sled.memory' = '0'",
        None,
        ("state-on-disk", " with state on disk"),
        validate_lines_without_disk_notes,
    )
    .await;
}

/// Runs each streaming pipeline with a final result against a server in this process,
/// each connection set up by `settings`, moving every job to the next parallelism after
/// each FLUSH when `rescale_to` is given; `label` is the run's sqllogictest label and
/// how a failure names it.
async fn run_pipelines_in_process(
    settings: &'static str,
    rescale_to: Option<usize>,
    (label, how): (&str, &str),
    validator: sqllogictest::Validator,
) {
    let mut failures = vec![];
    for file in selected(&pipelines_with_a_final_result()) {
        let dir = tempfile::tempdir().unwrap();
        let server = common::TestServer::start(dir.path()).await;
        let port = server.port;
        let mut runner = sqllogictest::Runner::new(move || async move {
            let client = common::connect(port).await;
            client.simple_query(settings).await.map_err(DbError)?;
            Ok(Weir {
                client,
                protocol: Protocol::Simple,
                restarts: None,
                rescale_to,
                settings: vec![],
            })
        });
        runner.with_validator(validator);
        runner.add_label("simple");
        runner.add_label(label);
        if let Err(e) = runner.run_file_async(file).await {
            failures.push(format!("{}: {}", file.display(), e.display(true)));
        }
        server.stop().await;
    }
    assert_passed(&failures, how);
}

/// [`validate_lines`] with EXPLAIN's notes of what the sled backend keeps on disk taken
/// out of both sides.
fn validate_lines_without_disk_notes(
    normalizer: sqllogictest::Normalizer,
    actual: &[Vec<String>],
    expected: &[String],
) -> bool {
    static NOTES: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
        regex::Regex::new(
            r", on disk beyond [^,\]]+ per input| \((?:frozen ones|the sessions|on disk beyond) [^)]*\)",
        )
        .expect("a valid pattern")
    });
    let strip = |line: &str| NOTES.replace_all(line, "").into_owned();
    let actual: Vec<Vec<String>> = actual
        .iter()
        .map(|row| row.iter().map(|v| strip(v)).collect())
        .collect();
    let expected: Vec<String> = expected.iter().map(|l| strip(l)).collect();
    validate_lines(normalizer, &actual, &expected)
}

/// The streaming pipelines with a final result, killed and resumed at every FLUSH.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_sql_tests_survive_kill_9_at_every_flush() {
    let files = pipelines_with_a_final_result();
    let mut failures = vec![];
    for file in selected(&files) {
        let dir = tempfile::tempdir().unwrap();
        let restarts = Arc::new(Restarts {
            process: Mutex::new(Some(common::WeirProcess::start(dir.path()))),
            data_dir: dir.path().to_path_buf(),
        });
        let shared = restarts.clone();
        let mut runner = sqllogictest::Runner::new(move || {
            let restarts = shared.clone();
            async move {
                let parallelism = "SET 'parallelism.default' = '2'".to_string();
                let client = common::connect(restarts.port()).await;
                client.simple_query(&parallelism).await.map_err(DbError)?;
                Ok(Weir {
                    client,
                    protocol: Protocol::Simple,
                    restarts: Some(restarts),
                    rescale_to: None,
                    settings: vec![parallelism],
                })
            }
        });
        runner.with_validator(validate_lines);
        runner.add_label("simple");
        runner.add_label("restarts");
        if let Err(e) = runner.run_file_async(file).await {
            failures.push(format!("{}: {}", file.display(), e.display(true)));
        }
        drop(runner);
        restarts.process.lock().unwrap().take();
    }
    assert_passed(&failures, " after restarts");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_tests_over_extended_protocol() {
    run_all(Protocol::Extended).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_tests_over_simple_protocol() {
    run_all(Protocol::Simple).await;
}
