//! What checkpoints cost as state grows, and how long a restart takes to restore it.
//!
//! ```sh
//! cargo bench --bench checkpoints                              # 200,000 new keys/s for 10 s
//! cargo bench --bench checkpoints -- --rate 500000 --seconds 20
//! cargo bench --bench checkpoints -- --set state.backend=sled   # any session setting
//! cargo bench --bench checkpoints -- --rate 500000 --keys 4000000  # random keys of 4 M
//! cargo bench --bench checkpoints -- --window --keys 2000000  # per 1-hour TUMBLE window
//! cargo bench --bench checkpoints -- --window --window-seconds 10  # windows that fire
//! cargo bench --bench checkpoints -- --window --window-seconds 30 --per-window  # a row a window
//! cargo bench --bench checkpoints -- --session --keys 2000000  # per 1-hour SESSION
//! cargo bench --bench checkpoints -- --over-view  # and a view over the view
//! cargo bench --bench checkpoints -- --window-topn  # the top 3 rows per 1-hour window
//! ```
//!
//! A materialized view counts rows per key over a `datagen` sequence, so every row is a
//! new key: state grows at a flat rate. With `--keys N` the keys are random among N
//! instead: state grows to N keys, then only changes (at most the rate's keys an epoch).
//! With `--window` the view counts per key and 1-hour TUMBLE window of the rows' time
//! (the wall clock): no window fires during the run, so its slice states only grow (with
//! `--window-seconds N`, windows of N seconds, which fire 5 s after they end; with
//! `--per-window` the view keeps a row per window, the keys and rows it counted, so its
//! own rows do not weigh in the peak RSS); with
//! `--session`, per key and SESSION window with a gap of 1 hour: no session closes. The
//! process's peak RSS is printed at the end of the run (before the restart). Every second the bench prints the view's latest
//! checkpoint from SHOW CHECKPOINTS (duration, bytes written, operator state). Then the
//! server is shut down and started again on the same data directory; the time until it
//! accepts clients is the recovery time (every view is restored before it listens).
//! With `--window-topn`, the view keeps the 3 rows of highest `v` per TUMBLE window
//! (`--window-seconds`, 1 hour by default): a window TopN buffers its window's rows until
//! it fires. With `--over-view`, a second view counts the first one's keys per count (it reads an
//! updating view); the bench also prints how long after the restart its rows were right.

use std::time::{Duration, Instant};

// The integration tests' in-process server and row helpers.
#[path = "../tests/common/mod.rs"]
mod common;

use common::{rows, TestServer};

struct Args {
    rate: u64,
    seconds: u64,
    /// Random keys among this many, instead of a new key per row.
    keys: Option<u64>,
    /// Count per key and TUMBLE window instead of per key.
    window: bool,
    /// The TUMBLE window's size.
    window_seconds: u64,
    /// With `window`: the view sums each window's rows up into one.
    per_window: bool,
    /// Count per key and SESSION window with a gap of 1 hour instead of per key.
    session: bool,
    /// Session settings for the view (`--set key=value`).
    settings: Vec<(String, String)>,
    /// A second view over the first, counting its keys per count.
    over_view: bool,
    /// The top 3 rows per TUMBLE window instead of counts.
    window_topn: bool,
}

fn parse_args() -> Args {
    let mut args = Args {
        rate: 200_000,
        seconds: 10,
        keys: None,
        window: false,
        window_seconds: 3600,
        per_window: false,
        session: false,
        settings: Vec::new(),
        over_view: false,
        window_topn: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut number = |name: &str| -> u64 {
            it.next()
                .and_then(|v| v.replace('_', "").parse().ok())
                .unwrap_or_else(|| panic!("{name} takes a number"))
        };
        match arg.as_str() {
            "--rate" => args.rate = number("--rate"),
            "--seconds" => args.seconds = number("--seconds"),
            "--keys" => args.keys = Some(number("--keys")),
            "--window" => args.window = true,
            "--window-seconds" => args.window_seconds = number("--window-seconds"),
            "--per-window" => args.per_window = true,
            "--session" => args.session = true,
            "--over-view" => args.over_view = true,
            "--window-topn" => args.window_topn = true,
            "--set" => {
                let setting = it.next().expect("--set takes key=value");
                let (key, value) = setting.split_once('=').expect("--set takes key=value");
                args.settings.push((key.into(), value.into()));
            }
            // `cargo bench` passes --bench; a filter argument is ignored too.
            _ => {}
        }
    }
    args
}

fn main() {
    let args = parse_args();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async {
        let dir = tempfile::tempdir().expect("temp dir");
        let server = TestServer::start(dir.path()).await;
        let client = server.connect().await;
        let settings = args
            .settings
            .iter()
            .map(|(k, v)| format!("SET '{k}' = '{v}'"));
        for statement in settings.chain([
            "SET 'parallelism.default' = '1'".to_string(),
            create_table(&args),
            if args.window_topn {
                format!(
                    "CREATE MATERIALIZED VIEW per_key AS SELECT window_start, k, v AS n FROM \
                     (SELECT window_start, window_end, k, v, ROW_NUMBER() OVER (PARTITION BY \
                     window_start, window_end ORDER BY v DESC) AS rn FROM TABLE(TUMBLE(TABLE \
                     gen, DESCRIPTOR(ts), INTERVAL '{}' SECOND))) WHERE rn <= 3",
                    args.window_seconds
                )
            } else if args.window {
                let per_key = format!(
                    "SELECT window_start, k, count(*) AS n, \
                     sum(v) AS total FROM TABLE(TUMBLE(TABLE gen, DESCRIPTOR(ts), \
                     INTERVAL '{}' SECOND)) GROUP BY window_start, window_end, k",
                    args.window_seconds
                );
                if args.per_window {
                    format!(
                        "CREATE MATERIALIZED VIEW per_key AS SELECT window_start, \
                         count(*) AS k, sum(n) AS n FROM ({per_key}) GROUP BY window_start"
                    )
                } else {
                    format!("CREATE MATERIALIZED VIEW per_key AS {per_key}")
                }
            } else if args.session {
                "CREATE MATERIALIZED VIEW per_key AS SELECT window_start, k, count(*) AS n, \
                 sum(v) AS total FROM TABLE(SESSION(TABLE gen PARTITION BY k, DESCRIPTOR(ts), \
                 INTERVAL '1' HOUR)) GROUP BY window_start, window_end, k"
                    .to_string()
            } else {
                "CREATE MATERIALIZED VIEW per_key AS SELECT k, count(*) AS n, sum(v) AS total \
                 FROM gen GROUP BY k"
                    .to_string()
            },
        ]) {
            rows(&client, &statement).await;
        }
        if args.over_view {
            rows(
                &client,
                "CREATE MATERIALIZED VIEW over_view AS SELECT n, count(*) AS keys FROM per_key \
                 GROUP BY n",
            )
            .await;
        }
        println!("| second | epoch | checkpoint ms | bytes written | operator state |");
        println!("|---:|---:|---:|---:|---|");
        let started = Instant::now();
        for second in 1..=args.seconds {
            tokio::time::sleep_until(
                tokio::time::Instant::from_std(started) + Duration::from_secs(second),
            )
            .await;
            let checkpoints = rows(&client, "SHOW CHECKPOINTS").await;
            if let Some(c) = checkpoints.iter().rev().find(|c| c[1].contains("per_key")) {
                println!("| {second} | {} | {} | {} | {} |", c[2], c[4], c[6], c[7]);
            }
        }
        rows(&client, "FLUSH").await;
        let keys = rows(&client, "SELECT count(*) FROM per_key").await[0][0].clone();
        let bytes = rows(&client, "SHOW CHECKPOINTS").await;
        let last = bytes
            .iter()
            .rev()
            .find(|c| c[1].contains("per_key"))
            .map(|c| c[6].clone())
            .unwrap_or_default();
        let peak = common::peak_rss().unwrap_or(0);
        drop(client);
        server.stop().await;
        let on_disk = bytes_under(dir.path());

        let restart = Instant::now();
        let server = TestServer::start(dir.path()).await;
        let recovery = restart.elapsed();
        let client = server.connect().await;
        let restored = rows(&client, "SELECT count(*) FROM per_key").await[0][0].clone();
        let over_view = if args.over_view {
            // Until the view over the view counts every key of the view.
            loop {
                let counted = rows(&client, "SELECT sum(keys) FROM over_view").await[0][0].clone();
                if counted == restored || restart.elapsed() > Duration::from_secs(600) {
                    break format!(
                        "; the view over it right after {:.2} s",
                        restart.elapsed().as_secs_f64()
                    );
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        } else {
            String::new()
        };
        println!();
        println!(
            "{keys} keys, last checkpoint {last} bytes, {:.0} MiB in the data directory, \
             peak RSS {:.0} MiB; restart to serving: {:.2} s ({restored} keys in the view \
             right after){over_view}",
            on_disk as f64 / (1 << 20) as f64,
            peak as f64 / (1 << 20) as f64,
            recovery.as_secs_f64()
        );
        drop(client);
        server.stop().await;
    });
}

/// Bytes of every file under `dir`.
fn bytes_under(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(m) if m.is_dir() => bytes_under(&entry.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// The datagen table the view reads: a new key per row, or random keys among
/// `--keys`; with `--window` or `--session`, a time column of the wall clock's time.
fn create_table(args: &Args) -> String {
    let mut options = vec![format!("'rows-per-second' = '{}'", args.rate)];
    options.push(match args.keys {
        Some(n) => format!(
            "'fields.k.kind' = 'random', 'fields.k.min' = '0', 'fields.k.max' = '{}'",
            n.max(1) - 1
        ),
        None => format!(
            "'fields.k.kind' = 'sequence', 'fields.k.start' = '0', 'fields.k.end' = '{}'",
            i64::MAX / 2
        ),
    });
    let mut columns = "k BIGINT, v BIGINT".to_string();
    if args.window || args.session || args.window_topn {
        columns.push_str(", ts TIMESTAMP(3), WATERMARK FOR ts AS ts - INTERVAL '5' SECOND");
        options.push("'fields.ts.max-past' = '0'".into());
    }
    format!(
        "CREATE TABLE gen ({columns}) WITH ('connector' = 'datagen', {}, 'seed' = '1')",
        options.join(", ")
    )
}
