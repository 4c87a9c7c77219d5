//! Throughput of the Nexmark bid stream through window aggregates and an unbounded
//! GROUP BY, end to end through a Weir server started in this process.
//!
//! ```sh
//! cargo bench --bench window_throughput --no-run              # build only
//! cargo bench --bench window_throughput                     # 10 M events, parallelism 1 and 2
//! WEIR_BENCH_EVENTS=2000000 cargo bench --bench window_throughput
//! cargo bench --bench window_throughput -- --events 2000000 --parallelism 1 --query tumble
//! cargo bench --bench window_throughput -- --repeat 5 --check  # --check counts results
//! cargo bench --bench window_throughput -- --query hop --checkpoint-interval '1 h'
//! ```
//!
//! The job checkpoints every `--checkpoint-interval` ('execution.checkpointing.interval',
//! default 1 s); a long interval ('1 h') measures it without checkpoints.
//!
//! Each query runs as `INSERT INTO sink SELECT ...` into a blackhole sink with
//! `'table.dml-sync' = 'true'`, so the statement returns when the bounded job finished.
//! Each query and parallelism runs `--repeat` times (default 3); the table shows the
//! median wall time and the median CPU time. Wall time is measured around the statement;
//! CPU time is the whole process's (getrusage(RUSAGE_SELF): every Weir thread plus the
//! idle client). Events are Nexmark events ('nexmark.event.num'); the bid table holds 46
//! of every 50 of them, and the rows/s columns count those bid rows.

use std::time::{Duration, Instant};

// The integration tests' in-process server and row helpers.
#[path = "../tests/common/mod.rs"]
mod common;

use common::{checkpoint_totals, cpu_time, rows, TestServer};

const DEFAULT_EVENTS: u64 = 10_000_000;

struct Query {
    name: &'static str,
    sink_columns: &'static str,
    select: &'static str,
}

const QUERIES: &[Query] = &[
    Query {
        name: "pass-through",
        sink_columns: "auction BIGINT, price BIGINT",
        select: "SELECT auction, price FROM bid",
    },
    Query {
        name: "tumble",
        sink_columns: "window_start TIMESTAMP(3), window_end TIMESTAMP(3), auction BIGINT, \
                       bids BIGINT",
        select: "SELECT window_start, window_end, auction, count(*) AS bids \
                 FROM TABLE(TUMBLE(TABLE bid, DESCRIPTOR(date_time), INTERVAL '10' SECOND)) \
                 GROUP BY window_start, window_end, auction",
    },
    Query {
        name: "hop",
        sink_columns: "window_start TIMESTAMP(3), window_end TIMESTAMP(3), auction BIGINT, \
                       bids BIGINT",
        select: "SELECT window_start, window_end, auction, count(*) AS bids \
                 FROM TABLE(HOP(TABLE bid, DESCRIPTOR(date_time), INTERVAL '2' SECOND, \
                 INTERVAL '10' SECOND)) \
                 GROUP BY window_start, window_end, auction",
    },
    Query {
        name: "group",
        sink_columns: "auction BIGINT, bids BIGINT",
        select: "SELECT auction, count(*) AS bids FROM bid GROUP BY auction",
    },
];

struct Args {
    events: u64,
    parallelism: Vec<usize>,
    queries: Vec<String>,
    /// Runs of each query and parallelism; the table shows the median wall and CPU time.
    repeat: usize,
    /// Also counts each query's result rows (untimed), as a sanity check.
    check: bool,
    checkpoint_interval: String,
}

fn parse_args() -> Args {
    let mut events = std::env::var("WEIR_BENCH_EVENTS")
        .ok()
        .map(|v| {
            v.replace('_', "")
                .parse()
                .expect("WEIR_BENCH_EVENTS is a number")
        })
        .unwrap_or(DEFAULT_EVENTS);
    let mut parallelism = vec![1, 2];
    let mut queries: Vec<String> = QUERIES.iter().map(|q| q.name.to_string()).collect();
    let mut chosen_queries = Vec::new();
    let mut check = false;
    let mut repeat = 3;
    let mut checkpoint_interval = "1 s".to_string();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--events" => {
                events = args
                    .next()
                    .expect("--events N")
                    .replace('_', "")
                    .parse()
                    .expect("--events takes a number")
            }
            "--parallelism" => {
                parallelism = args
                    .next()
                    .expect("--parallelism 1,2")
                    .split(',')
                    .map(|p| p.trim().parse().expect("--parallelism takes numbers"))
                    .collect()
            }
            "--query" => chosen_queries.push(args.next().expect("--query NAME")),
            "--check" => check = true,
            "--checkpoint-interval" => {
                checkpoint_interval = args.next().expect("--checkpoint-interval '1 s'")
            }
            "--repeat" => {
                repeat = args
                    .next()
                    .expect("--repeat N")
                    .parse()
                    .expect("--repeat takes a number")
            }
            // `cargo bench` passes --bench; a filter argument is ignored too.
            _ => {}
        }
    }
    if !chosen_queries.is_empty() {
        queries = chosen_queries;
    }
    Args {
        events,
        parallelism,
        queries,
        repeat: repeat.max(1),
        check,
        checkpoint_interval,
    }
}

struct Run {
    query: &'static str,
    parallelism: usize,
    wall: Duration,
    cpu: Duration,
    bids: u64,
}

/// Bid rows among the first `events` Nexmark events: of every 50 event numbers, those
/// from 4 on are bids (one person, three auctions first).
fn bids(events: u64) -> u64 {
    events / 50 * 46 + (events % 50).saturating_sub(4)
}

fn per_second(count: u64, time: Duration) -> String {
    let rate = count as f64 / time.as_secs_f64();
    // Thousands separators keep the figures readable.
    let digits = format!("{:.0}", rate);
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn main() {
    let args = parse_args();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    eprintln!(
        "window_throughput: {} events, parallelism {:?}, queries {:?}, {cores} cores, \
         checkpoints every {}",
        args.events, args.parallelism, args.queries, args.checkpoint_interval
    );
    let runs = runtime.block_on(async {
        let dir = tempfile::tempdir().expect("temp dir");
        let server = TestServer::start(dir.path()).await;
        let client = server.connect().await;
        rows(
            &client,
            &format!(
                "CREATE TABLE bid (auction BIGINT, bidder BIGINT, price BIGINT, channel STRING, \
                 url STRING, date_time TIMESTAMP(3), extra STRING, \
                 WATERMARK FOR date_time AS date_time - INTERVAL '4' SECOND) \
                 WITH ('connector' = 'nexmark', 'nexmark.table' = 'bid', \
                 'nexmark.event.num' = '{}')",
                args.events
            ),
        )
        .await;
        rows(&client, "SET 'table.dml-sync' = 'true'").await;
        rows(
            &client,
            &format!(
                "SET 'execution.checkpointing.interval' = '{}'",
                args.checkpoint_interval
            ),
        )
        .await;
        let mut runs = Vec::new();
        for name in &args.queries {
            let query = QUERIES.iter().find(|q| q.name == name).unwrap_or_else(|| {
                panic!("no query {name}; there are pass-through, tumble, hop, group")
            });
            let sink = format!("sink_{}", query.name.replace('-', "_"));
            rows(
                &client,
                &format!(
                    "CREATE TABLE {sink} ({}) WITH ('connector' = 'blackhole')",
                    query.sink_columns
                ),
            )
            .await;
            for &parallelism in &args.parallelism {
                rows(
                    &client,
                    &format!("SET 'parallelism.default' = '{parallelism}'"),
                )
                .await;
                let statement = format!("INSERT INTO {sink} {}", query.select);
                let (mut walls, mut cpus) = (Vec::new(), Vec::new());
                for _ in 0..args.repeat {
                    let before = checkpoint_totals(&client).await.expect("SHOW CHECKPOINTS");
                    let (wall0, cpu0) = (Instant::now(), cpu_time());
                    rows(&client, &statement).await;
                    let (wall, cpu) = (wall0.elapsed(), cpu_time() - cpu0);
                    let after = checkpoint_totals(&client).await.expect("SHOW CHECKPOINTS");
                    eprintln!(
                        "{} p={parallelism}: {:.2} s wall, {:.2} s CPU, {} checkpoints of {} bytes",
                        query.name,
                        wall.as_secs_f64(),
                        cpu.as_secs_f64(),
                        after.0 - before.0,
                        after.1 - before.1,
                    );
                    walls.push(wall);
                    cpus.push(cpu);
                }
                walls.sort();
                cpus.sort();
                let run = Run {
                    query: query.name,
                    parallelism,
                    wall: walls[walls.len() / 2],
                    cpu: cpus[cpus.len() / 2],
                    bids: bids(args.events),
                };
                runs.push(run);
            }
            if args.check {
                let sum = if query.name == "pass-through" {
                    "count(auction)"
                } else {
                    "sum(bids)"
                };
                let counts = rows(
                    &client,
                    &format!("SELECT count(*), {sum} FROM ({}) AS q", query.select),
                )
                .await;
                eprintln!(
                    "check {}: {} result rows, {sum} = {} ({} bids)",
                    query.name,
                    counts[0][0],
                    counts[0][1],
                    bids(args.events)
                );
            }
        }
        drop(client);
        server.stop().await;
        runs
    });
    println!();
    println!(
        "| query | parallelism | events | bid rows | wall s | CPU s | events/s | events/s per CPU-s | bid rows/s | bid rows/s per CPU-s |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &runs {
        println!(
            "| {} | {} | {} | {} | {:.2} | {:.2} | {} | {} | {} | {} |",
            r.query,
            r.parallelism,
            args.events,
            r.bids,
            r.wall.as_secs_f64(),
            r.cpu.as_secs_f64(),
            per_second(args.events, r.wall),
            per_second(args.events, r.cpu),
            per_second(r.bids, r.wall),
            per_second(r.bids, r.cpu),
        );
    }
}
