//! The Nexmark suite: queries q0–q22 (`benches/nexmark/qN.sql`, Weir's SQL) run over the
//! built-in 'nexmark' generator into blackhole sinks, end to end through a Weir server
//! started in this process, at each parallelism.
//!
//! ```sh
//! cargo bench --bench nexmark                                   # 10 M events, p=1 and 2
//! cargo bench --bench nexmark -- --events 2000000 --parallelism 1 --query q0,q5
//! cargo bench --bench nexmark -- --source csv --path bids.csv   # bids from a CSV file
//! cargo bench --bench nexmark -- --markdown results.md          # also write the table
//! cargo bench --bench nexmark -- --timeout 300                  # stop runs after 300 s
//! cargo bench --bench nexmark -- --checkpoint-interval '1 h'    # default: the server's 1 s
//! cargo bench --bench nexmark -- --set state.backend=sled       # any session setting
//! cargo bench --bench nexmark -- --latency                      # q1, q5, q7 at 200 k events/s
//! cargo bench --bench nexmark -- --latency --rate 500000 --seconds 60 --query q1
//! ```
//!
//! Each query file holds its sink's CREATE TABLE and its INSERT; the runner creates the
//! person, auction and bid tables (and the side input of q13), runs the INSERT with
//! `'table.dml-sync' = 'true'` (it returns when the bounded input is done) and reports
//! events/s (events generated, over all three streams, divided by wall time), events per
//! CPU-second (getrusage: every Weir thread), and peak RSS. Each query and parallelism
//! runs in a fresh process (this program run again with `--child`), so the peak RSS
//! (`/proc/self/status` VmHWM) is that query's alone. A query Weir cannot run is listed
//! with the error it gave.
//! With `--source csv` the bid table reads the given file (columns auction, bidder,
//! price, channel, url, date_time, extra; the first line is data) through the filesystem
//! connector, so parsing is part of the figure and engines can be compared on identical
//! input; queries over person or auction then fail and are listed so.
//!
//! `--latency` runs each query at a fixed input rate instead (`--rate` events/s over all
//! three streams, for `--seconds`; default q1, q5 and q7): the generator paces itself from
//! a base time two seconds ahead, with event times following the wall clock, so an event
//! comes out at its own event time. The input is unbounded (the end of a bounded one
//! would close every open window at once, early); the job is stopped after the run. The
//! query's blackhole names its time column (`'latency.column'`); each row reaching it
//! counts the wall clock minus that time, and the runner reports the 50th and 99th
//! percentiles SHOW JOBS gives at the end of the run:
//! event ingestion to sink, including what windows wait for (q5's rows are timed by their
//! window's end, the newest event they can depend on; q7's by the winning bid's time).

use std::path::PathBuf;
use std::time::{Duration, Instant};

#[path = "../tests/common/mod.rs"]
mod common;

use common::{checkpoint_totals, cpu_time, peak_rss, try_rows, TestServer};

struct Args {
    events: u64,
    parallelism: Vec<usize>,
    queries: Vec<String>,
    csv: Option<PathBuf>,
    markdown: Option<PathBuf>,
    /// Run one query at one parallelism and print its figures (the parent's child).
    child: bool,
    /// A run still going after this long is stopped and reported so.
    timeout: Duration,
    /// 'execution.checkpointing.interval' of the jobs, when not the server's default.
    checkpoint_interval: Option<String>,
    /// Session settings (`--set key=value`) the queries run with.
    settings: Vec<(String, String)>,
    /// Latency mode: the input rate in events per second (all streams) and how long the
    /// query runs (the input is unbounded; a bounded one's end would close every window
    /// at once, early).
    latency_rate: Option<u64>,
    latency_seconds: u64,
}

fn parse_args() -> Args {
    let mut a = Args {
        events: 10_000_000,
        parallelism: vec![1, 2],
        queries: (0..=22).map(|i| format!("q{i}")).collect(),
        csv: None,
        markdown: None,
        child: false,
        timeout: Duration::from_secs(600),
        checkpoint_interval: None,
        settings: Vec::new(),
        latency_rate: None,
        latency_seconds: 0,
    };
    let (mut latency, mut rate, mut seconds, mut queries_given) = (false, 200_000, 60, false);
    let mut source = "nexmark".to_string();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--events" => a.events = value().replace('_', "").parse().expect("a number"),
            "--parallelism" => {
                a.parallelism = value()
                    .split(',')
                    .map(|p| p.trim().parse().expect("numbers"))
                    .collect()
            }
            "--query" => {
                a.queries = value().split(',').map(|q| q.trim().into()).collect();
                queries_given = true;
            }
            "--latency" => latency = true,
            "--rate" => rate = value().replace('_', "").parse().expect("events per second"),
            "--seconds" => seconds = value().parse().expect("seconds"),
            "--source" => source = value(),
            "--path" => a.csv = Some(value().into()),
            "--markdown" => a.markdown = Some(value().into()),
            "--child" => a.child = true,
            "--checkpoint-interval" => a.checkpoint_interval = Some(value()),
            "--set" => {
                let setting = value();
                let (key, value) = setting.split_once('=').expect("--set takes key=value");
                a.settings.push((key.trim().into(), value.trim().into()));
            }
            "--timeout" => {
                a.timeout = Duration::from_secs(value().parse().expect("seconds"));
            }
            _ => {}
        }
    }
    match source.as_str() {
        "nexmark" => a.csv = None,
        "csv" => assert!(a.csv.is_some(), "--source csv needs --path FILE"),
        other => panic!("--source is nexmark or csv, not {other}"),
    }
    if latency {
        assert!(
            a.csv.is_none(),
            "--latency paces the nexmark source; not with --source csv"
        );
        a.latency_rate = Some(rate);
        a.latency_seconds = seconds;
        if !queries_given {
            a.queries = vec!["q1".into(), "q5".into(), "q7".into()];
        }
    }
    a
}

/// The tables the queries read: Nexmark's three streams, and q13's side input.
fn source_tables(args: &Args, side_input: &std::path::Path) -> Vec<String> {
    let bound = match args.latency_rate {
        Some(_) => String::new(),
        None => format!(", 'nexmark.event.num' = '{}'", args.events),
    };
    let watermark = "WATERMARK FOR date_time AS date_time - INTERVAL '4' SECOND";
    // Latency mode: paced, event time following the wall clock from two seconds ahead
    // (the job is running by then).
    let pace = match args.latency_rate {
        Some(rate) => {
            let base = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("a clock after 1970")
                .as_millis()
                + 2000;
            format!(
                ", 'nexmark.events-per-second' = '{rate}', 'nexmark.first-event-rate' = \
                 '{rate}', 'nexmark.base-time' = '{base}'"
            )
        }
        None => String::new(),
    };
    let nexmark =
        |table: &str| format!("'connector' = 'nexmark', 'nexmark.table' = '{table}'{bound}{pace}");
    let bid = match &args.csv {
        Some(path) => format!(
            "'connector' = 'filesystem', 'path' = '{}', 'format' = 'csv'",
            path.display()
        ),
        None => nexmark("bid"),
    };
    vec![
        format!(
            "CREATE TABLE person (id BIGINT, name STRING, email_address STRING, \
             credit_card STRING, city STRING, state STRING, date_time TIMESTAMP(3), \
             extra STRING, {watermark}) WITH ({})",
            nexmark("person")
        ),
        format!(
            "CREATE TABLE auction (id BIGINT, item_name STRING, description STRING, \
             initial_bid BIGINT, reserve BIGINT, date_time TIMESTAMP(3), expires TIMESTAMP(3), \
             seller BIGINT, category BIGINT, extra STRING, {watermark}) WITH ({})",
            nexmark("auction")
        ),
        format!(
            "CREATE TABLE bid (auction BIGINT, bidder BIGINT, price BIGINT, channel STRING, \
             url STRING, date_time TIMESTAMP(3), extra STRING, p_time AS PROCTIME(), \
             {watermark}) WITH ({bid})"
        ),
        format!(
            "CREATE TABLE side_input (key BIGINT, value STRING) WITH ('connector' = \
             'filesystem', 'path' = '{}', 'format' = 'csv')",
            side_input.display()
        ),
    ]
}

/// What one query did at one parallelism.
enum Outcome {
    Ran {
        wall: Duration,
        cpu: Duration,
        peak_rss: Option<u64>,
        /// Latency mode: the 50th and 99th percentile, milliseconds.
        latency: Option<(u64, u64)>,
    },
    Failed(String),
}

/// Runs a statement; an error as its SQLSTATE and message.
async fn run(client: &tokio_postgres::Client, sql: &str) -> Result<(), String> {
    try_rows(client, sql)
        .await
        .map(|_| ())
        .map_err(|e| match e.as_db_error() {
            Some(db) => format!("{}: {}", db.code().code(), db.message()),
            None => e.to_string(),
        })
}

fn statements(text: &str) -> Vec<String> {
    let without_comments: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n");
    without_comments
        .split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

fn mib(bytes: u64) -> String {
    format!("{:.0} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn per_second(count: u64, time: Duration) -> String {
    format!("{:.2} M", count as f64 / time.as_secs_f64() / 1e6)
}

fn main() {
    let args = parse_args();
    if args.child {
        let (query, parallelism) = (&args.queries[0], args.parallelism[0]);
        match run_query(&args, query, parallelism) {
            Outcome::Ran {
                wall,
                cpu,
                peak_rss,
                latency,
            } => {
                let (p50, p99) = latency.map_or((-1, -1), |(a, b)| (a as i64, b as i64));
                println!(
                    "RAN {} {} {} {p50} {p99}",
                    wall.as_secs_f64(),
                    cpu.as_secs_f64(),
                    peak_rss.unwrap_or(0)
                )
            }
            Outcome::Failed(e) => println!("FAILED {}", e.replace('\n', " ")),
        }
        return;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let input = match args.latency_rate {
        Some(rate) => format!("{rate} events/s for {} s", args.latency_seconds),
        None => format!("{} events", args.events),
    };
    eprintln!(
        "nexmark: {input}, parallelism {:?}, {cores} cores, source {}",
        args.parallelism,
        args.csv
            .as_ref()
            .map_or("nexmark".to_string(), |p| format!("csv {}", p.display()))
    );
    let mut results: Vec<(String, usize, Outcome)> = vec![];
    for query in &args.queries {
        for &parallelism in &args.parallelism {
            let outcome = in_child(&args, query, parallelism);
            match &outcome {
                Outcome::Ran {
                    wall,
                    cpu,
                    peak_rss,
                    latency,
                } => eprintln!(
                    "{query} p={parallelism}: {:.2} s wall, {:.2} s CPU, peak RSS {}{}",
                    wall.as_secs_f64(),
                    cpu.as_secs_f64(),
                    peak_rss.map_or("?".into(), mib),
                    latency.map_or(String::new(), |(p50, p99)| format!(
                        ", latency p50 {p50} ms, p99 {p99} ms"
                    ))
                ),
                Outcome::Failed(e) => eprintln!("{query} p={parallelism}: {e}"),
            }
            results.push((query.clone(), parallelism, outcome));
        }
    }
    let table = match args.latency_rate {
        Some(rate) => latency_table(&results, rate),
        None => throughput_table(&results, args.events),
    };
    println!("\n{table}");
    if let Some(path) = &args.markdown {
        std::fs::write(path, &table).expect("markdown file");
    }
}

/// A markdown table: query and parallelism, then `cells` of each run (a failed run
/// says why across them).
fn markdown_table(
    header: &[&str],
    results: &[(String, usize, Outcome)],
    cells: impl Fn(&Outcome) -> Vec<String>,
) -> String {
    let mut table = format!(
        "| query | parallelism | {} |\n|---|---|{}\n",
        header.join(" | "),
        "---|".repeat(header.len())
    );
    for (query, parallelism, outcome) in results {
        let row = match outcome {
            Outcome::Failed(e) => {
                let mut row = vec![format!("not run: {}", e.replace('|', "/"))];
                row.resize(header.len(), String::new());
                row
            }
            ran => cells(ran),
        };
        table.push_str(&format!(
            "| {query} | {parallelism} | {} |\n",
            row.join(" | ")
        ));
    }
    table
}

fn throughput_table(results: &[(String, usize, Outcome)], events: u64) -> String {
    let header = ["events/s", "events/s per core", "peak RSS", "wall"];
    markdown_table(&header, results, |outcome| match outcome {
        Outcome::Ran {
            wall,
            cpu,
            peak_rss,
            ..
        } => vec![
            per_second(events, *wall),
            per_second(events, *cpu),
            peak_rss.map_or("?".into(), mib),
            format!("{:.2} s", wall.as_secs_f64()),
        ],
        Outcome::Failed(_) => vec![],
    })
}

fn latency_table(results: &[(String, usize, Outcome)], rate: u64) -> String {
    let header = [
        "input events/s",
        "latency p50",
        "latency p99",
        "CPU",
        "peak RSS",
    ];
    markdown_table(&header, results, |outcome| match outcome {
        Outcome::Ran {
            wall,
            cpu,
            peak_rss,
            latency,
        } => {
            let ms = |v: Option<u64>| v.map_or("?".into(), |v| format!("{v} ms"));
            vec![
                rate.to_string(),
                ms(latency.map(|l| l.0)),
                ms(latency.map(|l| l.1)),
                format!(
                    "{:.0} % of a core",
                    100.0 * cpu.as_secs_f64() / wall.as_secs_f64()
                ),
                peak_rss.map_or("?".into(), mib),
            ]
        }
        Outcome::Failed(_) => vec![],
    })
}

/// Runs one query at one parallelism in a fresh process of this program.
fn in_child(args: &Args, query: &str, parallelism: usize) -> Outcome {
    let mut command = std::process::Command::new(std::env::current_exe().expect("this program"));
    command.args([
        "--child",
        "--events",
        &args.events.to_string(),
        "--query",
        query,
        "--parallelism",
        &parallelism.to_string(),
    ]);
    if let Some(interval) = &args.checkpoint_interval {
        command.arg("--checkpoint-interval").arg(interval);
    }
    if let Some(path) = &args.csv {
        command.arg("--source").arg("csv").arg("--path").arg(path);
    }
    for (key, value) in &args.settings {
        command.arg("--set").arg(format!("{key}={value}"));
    }
    if let Some(rate) = args.latency_rate {
        command.args(["--latency", "--rate", &rate.to_string()]);
        command.args(["--seconds", &args.latency_seconds.to_string()]);
    }
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("the child runs");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("the child's status") {
            break status;
        }
        if started.elapsed() > args.timeout {
            let _ = child.kill();
            let _ = child.wait();
            return Outcome::Failed(format!(
                "did not finish within {} s",
                args.timeout.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut stdout = String::new();
    use std::io::Read as _;
    child
        .stdout
        .take()
        .expect("piped")
        .read_to_string(&mut stdout)
        .expect("the child's output");
    for line in stdout.lines() {
        if let Some(figures) = line.strip_prefix("RAN ") {
            let f: Vec<f64> = figures
                .split_whitespace()
                .map(|v| v.parse().expect("a figure"))
                .collect();
            return Outcome::Ran {
                wall: Duration::from_secs_f64(f[0]),
                cpu: Duration::from_secs_f64(f[1]),
                peak_rss: (f[2] > 0.0).then_some(f[2] as u64),
                latency: (f[3] >= 0.0).then_some((f[3] as u64, f[4] as u64)),
            };
        }
        if let Some(e) = line.strip_prefix("FAILED ") {
            return Outcome::Failed(e.to_string());
        }
    }
    Outcome::Failed(format!("the run ended without a result ({status})"))
}

/// This process's part: a server, the source tables, one query.
fn run_query(args: &Args, query: &str, parallelism: usize) -> Outcome {
    let queries_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/nexmark");
    let text = match std::fs::read_to_string(queries_dir.join(format!("{query}.sql"))) {
        Ok(text) => text,
        Err(e) => return Outcome::Failed(format!("{query}.sql: {e}")),
    };
    let statements = statements(&text);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async {
        let dir = tempfile::tempdir().expect("temp dir");
        let side_input = dir.path().join("side_input.csv");
        let rows: String = (0..10_000).map(|k| format!("{k},value-{k}\n")).collect();
        std::fs::write(&side_input, rows).expect("side input");
        let server = TestServer::start(&dir.path().join("data")).await;
        let client = server.connect().await;
        for sql in source_tables(args, &side_input) {
            run(&client, &sql).await.expect("source tables");
        }
        // Latency mode reads the ended job's figures from SHOW JOBS, which forgets a
        // job the INSERT waited for.
        if args.latency_rate.is_none() {
            run(&client, "SET 'table.dml-sync' = 'true'").await.unwrap();
        }
        if let Some(interval) = &args.checkpoint_interval {
            let set = format!("SET 'execution.checkpointing.interval' = '{interval}'");
            run(&client, &set).await.unwrap();
        }
        for (key, value) in &args.settings {
            if let Err(e) = run(&client, &format!("SET '{key}' = '{value}'")).await {
                return Outcome::Failed(e);
            }
        }
        run(
            &client,
            &format!("SET 'parallelism.default' = '{parallelism}'"),
        )
        .await
        .unwrap();
        let (setup, insert) = statements.split_at(statements.len() - 1);
        for sql in setup {
            if let Err(e) = run(&client, sql).await {
                return Outcome::Failed(e);
            }
        }
        let (wall0, cpu0) = (Instant::now(), cpu_time());
        let mut ran = run(&client, &insert[0]).await.map(|()| None);
        if let (Ok(_), Some(_)) = (&ran, args.latency_rate) {
            // Two seconds until the first events are due, then the run.
            tokio::time::sleep(Duration::from_secs(2 + args.latency_seconds)).await;
            ran = running_job_latency(&client).await.map(Some);
        }
        let outcome = match ran {
            Ok(latency) => Outcome::Ran {
                wall: wall0.elapsed(),
                cpu: cpu_time() - cpu0,
                peak_rss: peak_rss(),
                latency,
            },
            Err(e) => Outcome::Failed(e),
        };
        if let Ok((checkpoints, bytes)) = checkpoint_totals(&client).await {
            eprintln!("{query}: {checkpoints} checkpoints of {bytes} bytes in all");
        }
        server.stop().await;
        outcome
    })
}

/// The only job's latency percentiles from SHOW JOBS; the job is stopped.
async fn running_job_latency(client: &tokio_postgres::Client) -> Result<(u64, u64), String> {
    let rows = client
        .simple_query("SHOW JOBS")
        .await
        .map_err(|e| e.to_string())?;
    let Some(job) = rows.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(row) => Some(row),
        _ => None,
    }) else {
        return Err("the job is gone from SHOW JOBS".into());
    };
    if job.get("state") != Some("RUNNING") {
        return Err(format!("the job is {:?}", job.get("state")));
    }
    let percentile = |column: &str| {
        job.get(column)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("no {column}: does the sink name its 'latency.column'?"))
    };
    let latency = (percentile("latency_p50_ms")?, percentile("latency_p99_ms")?);
    let stop = format!("STOP JOB '{}'", job.get("job_id").unwrap_or_default());
    run(client, &stop).await?;
    Ok(latency)
}
