//! Exactly-once recovery: a pipeline killed (SIGKILL, or a crash injected at each phase of
//! a checkpoint) gives the same view rows and sink files as one that ran uninterrupted;
//! a panic in one operator restarts only its job, from its last checkpoint.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{connect, render, rows, try_rows, WeirProcess};
use rand::{RngExt, SeedableRng};
use tokio_postgres::Client;

/// Views and a filesystem sink over the built-in table log and the Nexmark generator: a
/// HOP window aggregate, an unbounded GROUP BY, a join and a windowed INSERT job, which
/// keeps the rows it drops as late in a late-data table; the window aggregate and the
/// join checkpoint unaligned. `settings` are SET first.
async fn create_pipeline(client: &Client, sink_dir: &Path, settings: &[&str]) {
    let settings = settings.iter().map(|s| s.to_string());
    let statements = settings.chain([
        "SET 'parallelism.default' = '2'".to_string(),
        "CREATE TABLE clicks (batch BIGINT, user_id BIGINT, amount BIGINT, ts TIMESTAMP(3), \
         WATERMARK FOR ts AS ts - INTERVAL '1' SECOND)"
            .to_string(),
        "CREATE TABLE users (id BIGINT, name STRING, PRIMARY KEY (id) NOT ENFORCED)".to_string(),
        "INSERT INTO users VALUES (0, 'ada'), (1, 'bob'), (2, 'cy'), (3, 'di')".to_string(),
        "CREATE TABLE bid (auction BIGINT, bidder BIGINT, price BIGINT, date_time TIMESTAMP(3), \
         WATERMARK FOR date_time AS date_time - INTERVAL '4' SECOND) WITH ('connector' = \
         'nexmark', 'nexmark.table' = 'bid', 'nexmark.event.num' = '20000', \
         'nexmark.events-per-second' = '10000')"
            .to_string(),
        // Unaligned checkpoints for these two: barriers overtake what waits at the window
        // aggregate (two source subtasks) and at the join (two inputs).
        "SET 'execution.checkpointing.unaligned' = 'true'".to_string(),
        "CREATE MATERIALIZED VIEW hop_bids AS SELECT window_start, window_end, count(*) AS n, \
         sum(price) AS total FROM TABLE(HOP(TABLE bid, DESCRIPTOR(date_time), INTERVAL '2' \
         SECOND, INTERVAL '10' SECOND)) GROUP BY window_start, window_end"
            .to_string(),
        "CREATE MATERIALIZED VIEW per_user AS SELECT user_id, count(*) AS n, sum(amount) AS total \
         FROM clicks GROUP BY user_id"
            .to_string(),
        "CREATE MATERIALIZED VIEW per_name AS SELECT u.name, count(*) AS n, sum(c.amount) AS \
         total FROM clicks c JOIN users u ON c.user_id % 4 = u.id GROUP BY u.name"
            .to_string(),
        "RESET 'execution.checkpointing.unaligned'".to_string(),
        // A view over an updating view: it goes on from where it was in per_user's
        // changes after each kill.
        "CREATE MATERIALIZED VIEW users_per_count AS SELECT n, count(*) AS users, \
         sum(total) AS total FROM per_user GROUP BY n"
            .to_string(),
        format!(
            "CREATE TABLE tumbles (window_start TIMESTAMP(3), n BIGINT, total BIGINT) WITH \
             ('connector' = 'filesystem', 'path' = '{}', 'format' = 'csv')",
            sink_dir.display()
        ),
        "CREATE TABLE late_clicks (amount BIGINT, late_watermark TIMESTAMP(3), late_operator \
         STRING)"
            .to_string(),
        "SET 'weir.late-data-table' = 'late_clicks'".to_string(),
        "INSERT INTO tumbles SELECT window_start, count(*), sum(amount) FROM \
         TABLE(TUMBLE(TABLE clicks, DESCRIPTOR(ts), INTERVAL '10' SECOND)) \
         GROUP BY window_start, window_end"
            .to_string(),
    ]);
    for s in statements {
        client
            .simple_query(&s)
            .await
            .unwrap_or_else(|e| panic!("{s}: {e}"));
    }
}

/// A data directory with the pipeline created in it (the server is gone), and the sink's.
async fn new_pipeline(settings: &[&str]) -> (tempfile::TempDir, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let sink = tempfile::tempdir().unwrap();
    let weir = WeirProcess::start(dir.path());
    let client = connect(weir.port).await;
    create_pipeline(&client, sink.path(), settings).await;
    weir.kill_9();
    (dir, sink)
}

/// Batch `b` of clicks: time moves on by 2 s per batch, a few rows arrive out of order,
/// and the last one is a day late.
fn clicks_batch(b: u64) -> String {
    let late = format!(
        "({b}, 0, {}, TIMESTAMP '2023-12-31 00:00:00' + INTERVAL '{b}' MILLISECOND)",
        1_000_000 + b
    );
    let values: Vec<String> = (0..20u64)
        .map(|i| {
            let ms = b * 2000 + (i * 97) % 2500;
            format!(
                "({b}, {}, {}, TIMESTAMP '2024-01-01 00:00:00' + INTERVAL '{ms}' MILLISECOND)",
                (b * 7 + i) % 11,
                i + b
            )
        })
        .chain([late])
        .collect();
    format!("INSERT INTO clicks VALUES {}", values.join(", "))
}

/// What the pipeline holds: every view's rows and every sink file's lines, sorted.
async fn results(client: &Client, sink_dir: &Path) -> Vec<(String, Vec<String>)> {
    let mut out = vec![];
    for view in [
        "hop_bids",
        "per_user",
        "per_name",
        "users_per_count",
        "late_clicks",
    ] {
        out.push((
            view.to_string(),
            render(rows(client, &format!("SELECT * FROM {view}")).await),
        ));
    }
    let mut lines = vec![];
    for entry in std::fs::read_dir(sink_dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !name.starts_with('.') {
            lines.extend(
                std::fs::read_to_string(&path)
                    .unwrap()
                    .lines()
                    .map(str::to_string),
            );
        }
    }
    lines.sort();
    out.push(("sink files".to_string(), lines));
    out
}

/// FLUSH until the Nexmark view's job finished (its input is bounded).
async fn settle(client: &Client) {
    for _ in 0..600 {
        client.simple_query("FLUSH").await.unwrap();
        let jobs = rows(client, "SHOW JOBS").await;
        let hop_done = jobs
            .iter()
            .any(|j| j[1].contains("hop_bids") && j[2] == "FINISHED");
        if hop_done {
            client.simple_query("FLUSH").await.unwrap();
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the Nexmark view never finished");
}

fn assert_same(expected: &[(String, Vec<String>)], actual: &[(String, Vec<String>)]) {
    for ((name, e), (_, a)) in expected.iter().zip(actual) {
        assert!(!e.is_empty(), "{name} is empty in the uninterrupted run");
        assert!(e == a, "{name} differs: {}", common::diff(e, a));
    }
}

/// The batches of clicks that made it into the log (an INSERT cut off by a kill may have
/// landed or not).
async fn landed_batches(client: &Client) -> Vec<u64> {
    rows(client, "SELECT DISTINCT batch FROM clicks ORDER BY batch")
        .await
        .into_iter()
        .map(|r| r[0].parse().unwrap())
        .collect()
}

/// The same pipeline run without interruption over `batches`.
async fn uninterrupted(batches: &[u64]) -> Vec<(String, Vec<String>)> {
    let dir = tempfile::tempdir().unwrap();
    let sink = tempfile::tempdir().unwrap();
    let weir = WeirProcess::start(dir.path());
    let client = connect(weir.port).await;
    create_pipeline(&client, sink.path(), &[]).await;
    for b in batches {
        client.simple_query(&clicks_batch(*b)).await.unwrap();
    }
    settle(&client).await;
    results(&client, sink.path()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_kills_lose_and_double_nothing() {
    let seed = std::env::var("WEIR_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7u64);
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let (dir, sink) = new_pipeline(&[]).await;
    let mut next_batch = 0;
    for round in 0..24 {
        // Every fourth run dies inside a checkpoint's store write instead.
        let failpoint = format!("checkpoint-during-write=crash@{}", 2 + round % 3);
        let env: Vec<(&str, &str)> = if round % 4 == 1 {
            vec![("WEIR_FAILPOINTS", failpoint.as_str())]
        } else {
            vec![]
        };
        let weir = WeirProcess::start_with_env(dir.path(), &env);
        let client = connect(weir.port).await;
        let uptime = Duration::from_millis(rng.random_range(150..1400));
        let started = std::time::Instant::now();
        while started.elapsed() < uptime {
            let inserted = client.simple_query(&clicks_batch(next_batch)).await;
            // A batch cut off by the kill may have landed: its number is never used again
            // (landed_batches finds which did).
            next_batch += 1;
            if inserted.is_err() {
                break;
            }
            if rng.random_bool(0.2) && client.simple_query("FLUSH").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(rng.random_range(10..120))).await;
        }
        weir.kill_9();
    }
    let weir = WeirProcess::start(dir.path());
    let client = connect(weir.port).await;
    let batches = landed_batches(&client).await;
    assert!(batches.len() >= 20, "only {} batches landed", batches.len());
    settle(&client).await;
    let chaos = results(&client, sink.path()).await;
    drop(weir);
    assert_same(&uninterrupted(&batches).await, &chaos);
}

/// A crash at each phase of a checkpoint: after the snapshot but before the task's ack,
/// inside the store write, and after the commit before the sinks publish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_at_each_checkpoint_phase_loses_and_doubles_nothing() {
    crash_at_each_checkpoint_phase(&[]).await;
}

/// The same with the GROUP BYs and the join keeping their state on disk (none of it in
/// memory after a batch or a barrier): their checkpoints are chunks in the store, and a
/// restore writes them back to disk. The rows must be those of memory state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_at_each_checkpoint_phase_with_state_in_sled_loses_and_doubles_nothing() {
    crash_at_each_checkpoint_phase(&[
        "SET 'state.backend' = 'sled'",
        "SET 'state.backend.sled.memory' = '0'",
    ])
    .await;
}

async fn crash_at_each_checkpoint_phase(settings: &[&str]) {
    let mut points = vec![
        "checkpoint-before-ack",
        "checkpoint-during-write",
        "checkpoint-before-publish",
    ];
    if !settings.is_empty() {
        // While the state on disk is read and stored, off the task.
        points.push("checkpoint-storing-beyond-memory");
    }
    for point in points {
        let at = 4;
        let (dir, sink) = new_pipeline(settings).await;
        let spec = format!("{point}=crash@{at}");
        let weir = WeirProcess::start_with_env(dir.path(), &[("WEIR_FAILPOINTS", &spec)]);
        let client = connect(weir.port).await;
        let mut crashed = false;
        for b in 0..40 {
            if client.simple_query(&clicks_batch(b)).await.is_err()
                || client.simple_query("FLUSH").await.is_err()
            {
                crashed = true;
                break;
            }
        }
        assert!(crashed, "{spec} never fired");
        drop(weir);
        if !settings.is_empty() {
            // The killed server's scratch directories: the state was on disk.
            let (scratch, bytes) = common::scratch_dirs(dir.path());
            assert!(
                scratch >= 2 && bytes > 0,
                "{spec}: {scratch} scratch directories, {bytes} bytes"
            );
        }
        let weir = WeirProcess::start(dir.path());
        let client = connect(weir.port).await;
        let batches = landed_batches(&client).await;
        settle(&client).await;
        let recovered = results(&client, sink.path()).await;
        drop(weir);
        let expected = uninterrupted(&batches).await;
        for ((name, e), (_, a)) in expected.iter().zip(&recovered) {
            // Every batch has a late row; the crash may come before any window fired.
            if name == "late_clicks" {
                assert!(
                    !e.is_empty(),
                    "{spec}: no late rows in the uninterrupted run"
                );
            }
            assert!(e == a, "{spec}: {name} differs: {}", common::diff(e, a));
        }
    }
}

/// A panic inside one operator, or a checkpoint the store does not confirm, restarts that
/// job from its last checkpoint; the server and the other views go on, and SHOW
/// CHECKPOINTS reports the checkpoints, the failed one with its cause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_or_a_failed_checkpoint_restarts_only_its_job() {
    restarts_only_its_job(
        "operator-process=panic@12,checkpoint-during-write=error@9",
        "",
        "did not confirm",
    )
    .await;
}

/// The same when a task cannot store the state its GROUP BY keeps on disk (read off the
/// task, after the barrier): the checkpoint fails with that cause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_whose_state_on_disk_cannot_be_stored_restarts_only_its_job() {
    restarts_only_its_job(
        "checkpoint-storing-beyond-memory=error@1",
        "SET 'state.backend' = 'sled'; SET 'state.backend.sled.memory' = '0';",
        "could not store its state: Execution error: failpoint checkpoint-storing-beyond-memory",
    )
    .await;
}

async fn restarts_only_its_job(failpoints: &str, settings: &str, cause: &str) {
    let dir = tempfile::tempdir().unwrap();
    let weir = WeirProcess::start_with_env(dir.path(), &[("WEIR_FAILPOINTS", failpoints)]);
    let client = connect(weir.port).await;
    client.batch_execute(settings).await.unwrap();
    client
        .batch_execute(
            "SET 'parallelism.default' = '1';
             CREATE TABLE t (k BIGINT, v BIGINT);
             CREATE MATERIALIZED VIEW sums AS SELECT k, sum(v) AS s, count(*) AS n FROM t GROUP BY k;
             CREATE MATERIALIZED VIEW total AS SELECT count(*) AS n FROM t;
             CREATE MATERIALIZED VIEW over_sums AS SELECT count(*) AS keys, sum(s) AS s, \
             sum(n) AS n FROM sums",
        )
        .await
        .unwrap();
    let mut expected: std::collections::BTreeMap<i64, (i64, i64)> = Default::default();
    for b in 0..20i64 {
        let values: Vec<String> = (0..5)
            .map(|i| format!("({}, {})", i % 3, b * 10 + i))
            .collect();
        client
            .simple_query(&format!("INSERT INTO t VALUES {}", values.join(", ")))
            .await
            .unwrap();
        for i in 0..5 {
            let e = expected.entry(i % 3).or_default();
            e.0 += b * 10 + i;
            e.1 += 1;
        }
        client.simple_query("FLUSH").await.unwrap();
    }
    let sums = rows(&client, "SELECT k, s, n FROM sums ORDER BY k").await;
    let want: Vec<Vec<String>> = expected
        .iter()
        .map(|(k, (s, n))| vec![k.to_string(), s.to_string(), n.to_string()])
        .collect();
    assert_eq!(sums, want);
    assert_eq!(
        rows(&client, "SELECT n FROM total").await,
        vec![vec!["100"]]
    );
    // A view over the updating view, restarted or not, counts each change once.
    let all: i64 = expected.values().map(|(s, _)| s).sum();
    assert_eq!(
        rows(&client, "SELECT * FROM over_sums").await,
        vec![vec!["3".to_string(), all.to_string(), "100".to_string()]]
    );
    let jobs = rows(&client, "SHOW JOBS").await;
    assert!(jobs.iter().all(|j| j[2] == "RUNNING"), "{jobs:?}");
    // One connection to one server process answered throughout: the server never
    // restarted, only the job did.
    let checkpoints = try_rows(&client, "SHOW CHECKPOINTS").await.unwrap();
    assert!(
        checkpoints
            .iter()
            .any(|c| c[1] == "materialized view sums" && c[8] == "COMPLETED"),
        "{checkpoints:?}"
    );
    assert!(checkpoints
        .iter()
        .any(|c| c[7].contains("GroupAggregate=") && c[6].parse::<i64>().unwrap() > 0));
    assert!(
        checkpoints
            .iter()
            .any(|c| c[8].starts_with("FAILED: ") && c[8].contains(cause)),
        "{checkpoints:?}"
    );
}
