//! Differential property test: for randomized insert-only input with no late rows, each
//! window query shape gives the same final rows streaming (window TVFs, run by Weir's
//! streaming engine at parallelism 1 and 4) as DataFusion gives in batch over the same
//! log tables with a query that uses no window TVF.
//!
//! Every case has a fixed seed; a failing case prints it, its parameters and the rows
//! that differ. `WEIR_DIFF_CASES` overrides the number of cases and `WEIR_DIFF_SEED`
//! runs a single case.

mod common;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Instant;

use chrono::DateTime;
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use tokio_postgres::Client;

use common::{case_seeds, diff, render, rows, try_rows, TestServer};

const DEFAULT_CASES: u64 = 10;
const BASE_SEED: u64 = 0x5eed_d1ff;
/// 2024-01-01 00:00:00 UTC in epoch milliseconds.
const BASE_MS: i64 = 1_704_067_200_000;

#[derive(Clone, Debug)]
struct Row {
    id: i64,
    k: Option<i32>,
    v: Option<i64>,
    ts: i64,
}

/// One randomized input: two tables with the same watermark delay, in insertion order.
struct Case {
    seed: u64,
    delay_s: i64,
    t: Vec<Row>,
    u: Vec<Row>,
    /// Sizes of the multi-row INSERTs, per table.
    t_batches: Vec<usize>,
    u_batches: Vec<usize>,
    tumble_s: i64,
    /// (slide, size) in seconds.
    hop: (i64, i64),
    /// (slide, size) in seconds for the HOP TopN and window join, which pay per window
    /// fired (a 1 s slide over minutes of rows takes seconds in a debug build).
    hop_rows: (i64, i64),
    /// (step, size) in seconds.
    cumulate: (i64, i64),
}

fn ts_literal(ms: i64) -> String {
    let dt = DateTime::from_timestamp_millis(ms).expect("timestamp in range");
    format!("TIMESTAMP '{}'", dt.format("%Y-%m-%d %H:%M:%S%.3f"))
}

/// Rows of one table: timestamps over a few minutes (some on whole seconds, so rows land
/// on window boundaries), a few keys, small values (so TopN has ties), then an insertion
/// order whose out-of-orderness stays strictly below the watermark delay.
fn gen_rows(
    rng: &mut SmallRng,
    first_id: i64,
    n: usize,
    keys: i32,
    span_ms: i64,
    delay_ms: i64,
) -> Vec<Row> {
    let start = BASE_MS + rng.random_range(0..60_000i64);
    let mut rows: Vec<(i64, Row)> = (0..n)
        .map(|i| {
            let mut ts = start + rng.random_range(0..span_ms);
            if rng.random_bool(0.3) {
                ts -= ts % 1000;
            }
            let row = Row {
                id: first_id + i as i64,
                k: (!rng.random_bool(0.03)).then(|| rng.random_range(0..keys)),
                v: (!rng.random_bool(0.05)).then(|| rng.random_range(-20..60i64)),
                ts,
            };
            // Sorting by ts + jitter with jitter < delay keeps every row within
            // delay - 1 ms of the largest timestamp before it.
            // Sometimes the most a row may lag: exactly 1 ms ahead of the watermark.
            let jitter = if rng.random_bool(0.2) {
                delay_ms - 1
            } else {
                rng.random_range(0..delay_ms)
            };
            (row.ts + jitter, row)
        })
        .collect();
    rows.sort_by_key(|(key, r)| (*key, r.id));
    let rows: Vec<Row> = rows.into_iter().map(|(_, r)| r).collect();
    assert_no_late_rows(&rows, delay_ms);
    rows
}

/// The watermark a row meets is max(ts before it) - delay; a window [s, e) containing the
/// row has fired when e - 1 ms <= that watermark. Since e - 1 ms >= ts, a row is on time
/// in every window containing it (TUMBLE, HOP or CUMULATE) when ts > watermark.
fn assert_no_late_rows(rows: &[Row], delay_ms: i64) {
    let mut max_ts = i64::MIN;
    for r in rows {
        if max_ts != i64::MIN {
            assert!(r.ts > max_ts - delay_ms, "generator made a late row: {r:?}");
        }
        max_ts = max_ts.max(r.ts);
    }
}

fn gen_batches(rng: &mut SmallRng, n: usize) -> Vec<usize> {
    let mut out = Vec::new();
    let mut left = n;
    while left > 0 {
        let max = *[1usize, 7, 40, 150].get(rng.random_range(0..4)).unwrap();
        let b = rng.random_range(1..=max).min(left);
        out.push(b);
        left -= b;
    }
    out
}

fn gen_case(seed: u64) -> Case {
    let mut rng = SmallRng::seed_from_u64(seed);
    let delay_s = [1i64, 2, 5][rng.random_range(0..3)];
    let keys = rng.random_range(1..=4);
    let span_ms = rng.random_range(60_000..=240_000i64);
    let n = rng.random_range(50..=400usize);
    let m = rng.random_range(50..=200usize);
    let t = gen_rows(&mut rng, 0, n, keys, span_ms, delay_s * 1000);
    let u = gen_rows(&mut rng, 100_000, m, keys, span_ms, delay_s * 1000);
    let t_batches = gen_batches(&mut rng, t.len());
    let u_batches = gen_batches(&mut rng, u.len());
    let tumble_s = [5i64, 10, 30][rng.random_range(0..3)];
    let hop = [(5i64, 15i64), (10, 10), (4, 10), (1, 3)][rng.random_range(0..4)];
    let hop_rows = [(5i64, 15i64), (10, 10), (4, 10)][rng.random_range(0..3)];
    let cumulate = [(5i64, 20i64), (2, 10), (10, 60)][rng.random_range(0..3)];
    Case {
        seed,
        delay_s,
        t,
        u,
        t_batches,
        u_batches,
        tumble_s,
        hop,
        hop_rows,
        cumulate,
    }
}

async fn load(client: &Client, table: &str, delay_s: i64, rows: &[Row], batches: &[usize]) {
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (id BIGINT, k INT, v BIGINT, ts TIMESTAMP(3), \
             WATERMARK FOR ts AS ts - INTERVAL '{delay_s}' SECOND)"
        ))
        .await
        .unwrap();
    let mut at = 0;
    for &b in batches {
        let mut sql = format!("INSERT INTO {table} VALUES ");
        for (i, r) in rows[at..at + b].iter().enumerate() {
            if i > 0 {
                sql.push_str(", ");
            }
            let null = || "NULL".to_string();
            let k = r.k.map_or_else(null, |k| k.to_string());
            let v = r.v.map_or_else(null, |v| v.to_string());
            write!(sql, "({}, {k}, {v}, {})", r.id, ts_literal(r.ts)).unwrap();
        }
        client
            .batch_execute(&sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        at += b;
    }
    assert_eq!(at, rows.len());
}

/// `(start, end)` of every window of the given shape that can hold a row of `rows`.
fn hop_windows(rows: &[&[Row]], slide: i64, size: i64) -> Vec<(i64, i64)> {
    let (lo, hi) = ts_range(rows);
    let mut s = (lo - size).div_euclid(slide) * slide;
    let mut out = Vec::new();
    while s <= hi {
        if s + size > lo {
            out.push((s, s + size));
        }
        s += slide;
    }
    out
}

fn cumulate_windows(rows: &[&[Row]], step: i64, size: i64) -> Vec<(i64, i64)> {
    let (lo, hi) = ts_range(rows);
    let mut s = lo.div_euclid(size) * size;
    let mut out = Vec::new();
    while s <= hi {
        let mut e = s + step;
        while e <= s + size {
            out.push((s, e));
            e += step;
        }
        s += size;
    }
    out
}

fn ts_range(rows: &[&[Row]]) -> (i64, i64) {
    let all = rows.iter().flat_map(|r| r.iter());
    let lo = all.clone().map(|r| r.ts).min().unwrap();
    let hi = all.map(|r| r.ts).max().unwrap();
    (lo, hi)
}

/// A batch relation `w(ws, we)` of explicit windows, for HOP and CUMULATE.
fn windows_relation(windows: &[(i64, i64)]) -> String {
    let values: Vec<String> = windows
        .iter()
        .map(|&(s, e)| format!("({}, {})", ts_literal(s), ts_literal(e)))
        .collect();
    format!("(VALUES {}) AS w(ws, we)", values.join(", "))
}

struct Shape {
    name: String,
    streaming: String,
    batch: String,
}

fn shapes(case: &Case, t: &str, u: &str, view: &str) -> Vec<Shape> {
    let tumble = |table: &str| {
        format!(
            "TABLE(TUMBLE(TABLE {table}, DESCRIPTOR(ts), INTERVAL '{}' SECOND))",
            case.tumble_s
        )
    };
    // The same windows in batch: date_bin is aligned on the epoch like TUMBLE.
    let binned = |table: &str| {
        format!(
            "(SELECT *, date_bin(INTERVAL '{s} seconds', ts, TIMESTAMP '1970-01-01 00:00:00') AS ws, \
             date_bin(INTERVAL '{s} seconds', ts, TIMESTAMP '1970-01-01 00:00:00') + INTERVAL '{s} seconds' AS we \
             FROM {table})",
            s = case.tumble_s
        )
    };
    let hop_of = |table: &str, (slide, size): (i64, i64)| {
        format!(
            "TABLE(HOP(TABLE {table}, DESCRIPTOR(ts), INTERVAL '{slide}' SECOND, INTERVAL '{size}' SECOND))"
        )
    };
    // One list of windows covering both tables, so the join's windows agree.
    let hop_batch_of = |table: &str, (slide, size): (i64, i64)| {
        let w = windows_relation(&hop_windows(&[&case.t, &case.u], slide * 1000, size * 1000));
        format!("(SELECT * FROM {table} JOIN {w} ON {table}.ts >= w.ws AND {table}.ts < w.we)")
    };
    let (slide, size) = case.hop;
    let hop = hop_of(t, case.hop);
    let hop_batch = hop_batch_of(t, case.hop);
    let (slide2, size2) = case.hop_rows;
    let hop2 = hop_of(t, case.hop_rows);
    let hop2_batch = hop_batch_of(t, case.hop_rows);
    let (step, csize) = case.cumulate;
    let cumulate = format!(
        "TABLE(CUMULATE(TABLE {t}, DESCRIPTOR(ts), INTERVAL '{step}' SECOND, INTERVAL '{csize}' SECOND))"
    );
    let cum_w = windows_relation(&cumulate_windows(&[&case.t], step * 1000, csize * 1000));
    let cum_batch = format!("(SELECT * FROM {t} JOIN {cum_w} ON {t}.ts >= w.ws AND {t}.ts < w.we)");

    let per_key_aggs = "count(*), count(v), sum(v), min(v), max(v), avg(v), count(DISTINCT v)";
    vec![
        Shape {
            name: format!("tumble {}s per key", case.tumble_s),
            streaming: format!(
                "SELECT window_start, window_end, k, {per_key_aggs} FROM {} GROUP BY window_start, window_end, k",
                tumble(t)
            ),
            batch: format!("SELECT ws, we, k, {per_key_aggs} FROM {} GROUP BY ws, we, k", binned(t)),
        },
        Shape {
            name: format!("hop slide {slide}s size {size}s per key"),
            streaming: format!(
                "SELECT window_start, window_end, k, count(*), sum(v), min(v), max(v) FROM {hop} \
                 GROUP BY window_start, window_end, k"
            ),
            batch: format!("SELECT ws, we, k, count(*), sum(v), min(v), max(v) FROM {hop_batch} GROUP BY ws, we, k"),
        },
        Shape {
            name: format!("cumulate step {step}s size {csize}s per key"),
            streaming: format!(
                "SELECT window_start, window_end, k, count(*), sum(v), max(v), count(DISTINCT v) FROM {cumulate} \
                 GROUP BY window_start, window_end, k"
            ),
            batch: format!(
                "SELECT ws, we, k, count(*), sum(v), max(v), count(DISTINCT v) FROM {cum_batch} GROUP BY ws, we, k"
            ),
        },
        Shape {
            name: format!("tumble {}s global", case.tumble_s),
            streaming: format!(
                "SELECT window_start, window_end, count(*), sum(v), min(v), max(v), avg(v) FROM {} \
                 GROUP BY window_start, window_end",
                tumble(t)
            ),
            batch: format!(
                "SELECT ws, we, count(*), sum(v), min(v), max(v), avg(v) FROM {} GROUP BY ws, we",
                binned(t)
            ),
        },
        Shape {
            name: format!("hop slide {slide}s size {size}s global"),
            streaming: format!(
                "SELECT window_start, window_end, count(*), sum(v) FROM {hop} GROUP BY window_start, window_end"
            ),
            batch: format!("SELECT ws, we, count(*), sum(v) FROM {hop_batch} GROUP BY ws, we"),
        },
        Shape {
            name: format!("tumble {}s top 2 by v desc, id", case.tumble_s),
            streaming: format!(
                "SELECT window_start, window_end, id, k, v, rn FROM (\
                 SELECT *, ROW_NUMBER() OVER (PARTITION BY window_start, window_end ORDER BY v DESC, id) AS rn \
                 FROM {}) WHERE rn <= 2",
                tumble(t)
            ),
            batch: format!(
                "SELECT ws, we, id, k, v, rn FROM (\
                 SELECT *, ROW_NUMBER() OVER (PARTITION BY ws, we ORDER BY v DESC, id) AS rn \
                 FROM {}) WHERE rn <= 2",
                binned(t)
            ),
        },
        Shape {
            name: format!("tumble {}s top 2 per key by v desc, id", case.tumble_s),
            streaming: format!(
                "SELECT window_start, window_end, id, k, v, rn FROM (\
                 SELECT *, ROW_NUMBER() OVER (PARTITION BY window_start, window_end, k ORDER BY v DESC, id) AS rn \
                 FROM {}) WHERE rn <= 2",
                tumble(t)
            ),
            batch: format!(
                "SELECT ws, we, id, k, v, rn FROM (\
                 SELECT *, ROW_NUMBER() OVER (PARTITION BY ws, we, k ORDER BY v DESC, id) AS rn \
                 FROM {}) WHERE rn <= 2",
                binned(t)
            ),
        },
        Shape {
            name: format!("tumble {}s window join", case.tumble_s),
            streaming: format!(
                "SELECT a.window_start, a.window_end, a.k, a.id, a.v, b.id, b.v FROM {} a JOIN {} b \
                 ON a.window_start = b.window_start AND a.window_end = b.window_end AND a.k = b.k",
                tumble(t),
                tumble(u)
            ),
            batch: format!(
                "SELECT a.ws, a.we, a.k, a.id, a.v, b.id, b.v FROM {} a JOIN {} b \
                 ON a.ws = b.ws AND a.k = b.k",
                binned(t),
                binned(u)
            ),
        },
        Shape {
            name: format!("tumble {}s window left join", case.tumble_s),
            streaming: format!(
                "SELECT a.window_start, a.window_end, a.k, a.id, b.id FROM {} a LEFT JOIN {} b \
                 ON a.window_start = b.window_start AND a.window_end = b.window_end AND a.k = b.k",
                tumble(u),
                tumble(t)
            ),
            batch: format!(
                "SELECT a.ws, a.we, a.k, a.id, b.id FROM {} a LEFT JOIN {} b ON a.ws = b.ws AND a.k = b.k",
                binned(u),
                binned(t)
            ),
        },
        Shape {
            name: format!("tumble {}s aggregate over window aggregate", case.tumble_s),
            streaming: format!(
                "SELECT window_start, window_end, count(*), sum(c), max(s), min(s) FROM (\
                 SELECT window_start, window_end, k, count(*) AS c, sum(v) AS s FROM {} \
                 GROUP BY window_start, window_end, k) GROUP BY window_start, window_end",
                tumble(t)
            ),
            batch: format!(
                "SELECT ws, we, count(*), sum(c), max(s), min(s) FROM (\
                 SELECT ws, we, k, count(*) AS c, sum(v) AS s FROM {} GROUP BY ws, we, k) GROUP BY ws, we",
                binned(t)
            ),
        },
        Shape {
            name: format!("hop slide {slide2}s size {size2}s top 2 by v desc, id"),
            streaming: format!(
                "SELECT window_start, window_end, id, v FROM (\
                 SELECT *, ROW_NUMBER() OVER (PARTITION BY window_start, window_end ORDER BY v DESC, id) AS rn \
                 FROM {hop2}) WHERE rn <= 2"
            ),
            batch: format!(
                "SELECT ws, we, id, v FROM (\
                 SELECT *, ROW_NUMBER() OVER (PARTITION BY ws, we ORDER BY v DESC, id) AS rn \
                 FROM {hop2_batch}) WHERE rn <= 2"
            ),
        },
        Shape {
            name: format!("tumble {}s dedup: first row per key by ts, id", case.tumble_s),
            streaming: format!(
                "SELECT window_start, window_end, k, id, v FROM (\
                 SELECT *, ROW_NUMBER() OVER (PARTITION BY window_start, window_end, k ORDER BY ts, id) AS rn \
                 FROM {}) WHERE rn = 1",
                tumble(t)
            ),
            batch: format!(
                "SELECT ws, we, k, id, v FROM (\
                 SELECT *, ROW_NUMBER() OVER (PARTITION BY ws, we, k ORDER BY ts, id) AS rn \
                 FROM {}) WHERE rn = 1",
                binned(t)
            ),
        },
        Shape {
            name: format!("tumble {}s top 2 keys by count after window aggregate", case.tumble_s),
            streaming: format!(
                "SELECT window_start, window_end, k, c, rn FROM (\
                 SELECT *, ROW_NUMBER() OVER (PARTITION BY window_start, window_end ORDER BY c DESC, k) AS rn FROM (\
                 SELECT window_start, window_end, k, count(*) AS c FROM {} GROUP BY window_start, window_end, k)\
                 ) WHERE rn <= 2",
                tumble(t)
            ),
            batch: format!(
                "SELECT ws, we, k, c, rn FROM (\
                 SELECT *, ROW_NUMBER() OVER (PARTITION BY ws, we ORDER BY c DESC, k) AS rn FROM (\
                 SELECT ws, we, k, count(*) AS c FROM {} GROUP BY ws, we, k)\
                 ) WHERE rn <= 2",
                binned(t)
            ),
        },
        Shape {
            name: format!("hop slide {slide2}s size {size2}s window join"),
            streaming: format!(
                "SELECT a.window_start, a.window_end, a.k, a.id, b.id FROM {} a JOIN {} b \
                 ON a.window_start = b.window_start AND a.window_end = b.window_end AND a.k = b.k",
                hop_of(t, case.hop_rows),
                hop_of(u, case.hop_rows)
            ),
            batch: format!(
                "SELECT a.ws, a.we, a.k, a.id, b.id FROM {} a JOIN {} b ON a.ws = b.ws AND a.k = b.k",
                hop_batch_of(t, case.hop_rows),
                hop_batch_of(u, case.hop_rows)
            ),
        },
        Shape {
            name: format!("cumulate step {step}s size {csize}s global"),
            streaming: format!(
                "SELECT window_start, window_end, count(*), min(v), avg(v) FROM {cumulate} \
                 GROUP BY window_start, window_end"
            ),
            batch: format!("SELECT ws, we, count(*), min(v), avg(v) FROM {cum_batch} GROUP BY ws, we"),
        },
        Shape {
            name: format!("tumble {}s counts summed per {}s window on window_time", case.tumble_s, 3 * case.tumble_s),
            streaming: format!(
                "SELECT window_start, window_end, k, sum(c), max(c) FROM \
                 TABLE(TUMBLE(TABLE {view}, DESCRIPTOR(rowtime), INTERVAL '{}' SECOND)) \
                 GROUP BY window_start, window_end, k",
                3 * case.tumble_s
            ),
            batch: format!(
                "SELECT ws3, ws3 + INTERVAL '{s3} seconds', k, sum(c), max(c) FROM (\
                 SELECT date_bin(INTERVAL '{s3} seconds', ws, TIMESTAMP '1970-01-01 00:00:00') AS ws3, k, count(*) AS c \
                 FROM {} GROUP BY ws, k) GROUP BY ws3, k",
                binned(t),
                s3 = 3 * case.tumble_s
            ),
        },
    ]
}

/// The inner windows of the cascade shape: per-key counts with their window_time.
fn cascade_view(case: &Case, t: &str, view: &str) -> String {
    format!(
        "CREATE VIEW {view} AS SELECT window_start AS inner_start, window_end AS inner_end, \
         window_time AS rowtime, k, count(*) AS c \
         FROM TABLE(TUMBLE(TABLE {t}, DESCRIPTOR(ts), INTERVAL '{}' SECOND)) \
         GROUP BY window_start, window_end, window_time, k",
        case.tumble_s
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn window_queries_match_batch() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let client = server.connect().await;

    let seeds = case_seeds(BASE_SEED, DEFAULT_CASES);

    let started = Instant::now();
    let mut failures = Vec::new();
    let mut checked = 0;
    let mut timing: BTreeMap<usize, (String, f64, f64)> = BTreeMap::new();
    for seed in seeds {
        let case = gen_case(seed);
        let (t, u) = (format!("t_{seed}"), format!("u_{seed}"));
        load(&client, &t, case.delay_s, &case.t, &case.t_batches).await;
        load(&client, &u, case.delay_s, &case.u, &case.u_batches).await;
        let view = format!("c_{seed}");
        client
            .batch_execute(&cascade_view(&case, &t, &view))
            .await
            .unwrap();
        for (i, shape) in shapes(&case, &t, &u, &view).into_iter().enumerate() {
            let clock = Instant::now();
            let expected = render(rows(&client, &shape.batch).await);
            // Every shape has rows for this input; an empty oracle would prove nothing.
            assert!(
                !expected.is_empty(),
                "seed {seed}: no batch rows for `{}`",
                shape.name
            );
            timing.entry(i).or_insert((shape.name.clone(), 0.0, 0.0)).1 +=
                clock.elapsed().as_secs_f64();
            let clock = Instant::now();
            for parallelism in [1, 4] {
                client
                    .batch_execute(&format!("SET 'parallelism.default' = '{parallelism}'"))
                    .await
                    .unwrap();
                let actual = match try_rows(&client, &shape.streaming).await {
                    Ok(r) => render(r),
                    Err(e) => vec![format!("ERROR: {e}")],
                };
                checked += 1;
                if actual != expected {
                    failures.push(format!(
                        "seed {} (WEIR_DIFF_SEED={0}), shape `{}`, parallelism {parallelism}, \
                         delay {}s, {} + {} rows\n  streaming: {}\n  batch: {}\n{}",
                        case.seed,
                        shape.name,
                        case.delay_s,
                        case.t.len(),
                        case.u.len(),
                        shape.streaming,
                        if shape.batch.len() > 400 {
                            &shape.batch[..400]
                        } else {
                            &shape.batch
                        },
                        diff(&expected, &actual)
                    ));
                }
            }
            timing.get_mut(&i).unwrap().2 += clock.elapsed().as_secs_f64();
        }
        client
            .batch_execute(&format!("DROP VIEW {view}; DROP TABLE {t}; DROP TABLE {u}"))
            .await
            .unwrap();
    }
    eprintln!(
        "differential: {checked} streaming runs checked in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    eprintln!("time per shape (named after the first case's windows):");
    for (name, batch, streaming) in timing.values() {
        eprintln!("  {name}: batch {batch:.1}s, streaming {streaming:.1}s");
    }
    server.stop().await;
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
