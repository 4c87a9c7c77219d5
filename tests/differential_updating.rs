//! Differential property test for updating queries: random changelogs (inserts, upserts,
//! UPDATEs and DELETEs on keyed tables, with FLUSHes at random points) feed materialized
//! views of unbounded aggregates, TopN, dedup, DISTINCT, UNION ALL and joins (inner,
//! outer, semi, anti, over aggregates) at
//! parallelism 1 and 4; each view must end equal to the same query run in batch by
//! DataFusion over the tables' final rows.
//!
//! Half the views start before any row, half in the middle of the changes (snapshot of
//! what is there, then the rest). Every case has a fixed seed; a failing case prints it.
//! `WEIR_DIFF_CASES` overrides the number of cases and `WEIR_DIFF_SEED` runs one.

mod common;

use std::time::Instant;

use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use tokio_postgres::Client;

use common::{case_seeds, diff, render, rows, try_rows, TestServer};

const DEFAULT_CASES: u64 = 4;
const BASE_SEED: u64 = 0xc4a9_6e10;

/// The query shapes, over t(id, k, v) and u(id, k, w), keyed by id.
const SHAPES: &[(&str, &str)] = &[
    (
        "aggregates",
        "SELECT k, count(*) AS c, sum(v) AS s, min(v) AS lo, max(v) AS hi, \
         count(DISTINCT v) AS d, round(avg(v), 6) AS mean FROM t GROUP BY k",
    ),
    (
        "having",
        "SELECT k, count(*) AS c FROM t GROUP BY k HAVING count(*) > 2",
    ),
    ("global", "SELECT count(*) AS c, sum(v) AS s, max(v) AS hi FROM t"),
    ("distinct", "SELECT DISTINCT k FROM t"),
    (
        "filter and project",
        "SELECT id, v * 2 AS twice FROM t WHERE v > 10",
    ),
    (
        "topn",
        "SELECT k, id, v, rn FROM (SELECT k, id, v, \
         ROW_NUMBER() OVER (PARTITION BY k ORDER BY v DESC, id) AS rn FROM t) WHERE rn <= 3",
    ),
    (
        "global topn",
        "SELECT id, v FROM (SELECT id, v, \
         ROW_NUMBER() OVER (ORDER BY v ASC NULLS LAST, id) AS rn FROM t) WHERE rn <= 4",
    ),
    (
        "dedup keep last",
        "SELECT k, id, v FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY k ORDER BY id DESC) AS rn \
         FROM t) WHERE rn = 1",
    ),
    (
        "union all",
        "SELECT k, v FROM t UNION ALL SELECT k, w FROM u",
    ),
    (
        "aggregate over union",
        "SELECT k, count(*) AS c, sum(v) AS s FROM \
         (SELECT k, v FROM t UNION ALL SELECT k, w FROM u) GROUP BY k",
    ),
    (
        "topn over aggregate",
        "SELECT k, c FROM (SELECT k, c, ROW_NUMBER() OVER (ORDER BY c DESC, k) AS rn \
         FROM (SELECT k, count(*) AS c FROM t GROUP BY k)) WHERE rn <= 2",
    ),
    (
        "inner join",
        "SELECT t.id AS tid, u.id AS uid, t.v, u.w FROM t JOIN u ON t.k = u.k",
    ),
    (
        "left join with a filter",
        "SELECT t.id AS tid, u.id AS uid FROM t LEFT JOIN u ON t.k = u.k AND t.v > u.w",
    ),
    (
        "full join",
        "SELECT t.id AS tid, u.id AS uid, t.k AS tk, u.k AS uk FROM t FULL JOIN u ON t.k = u.k",
    ),
    (
        "semi and anti joins",
        "SELECT id, 'with' AS side FROM t WHERE EXISTS (SELECT 1 FROM u WHERE u.k = t.k) \
         UNION ALL SELECT id, 'without' FROM t WHERE NOT EXISTS (SELECT 1 FROM u WHERE u.k = t.k)",
    ),
    (
        "aggregate over join",
        "SELECT t.k, count(*) AS c, sum(u.w) AS s FROM t JOIN u ON t.k = u.k GROUP BY t.k",
    ),
    (
        "join of aggregates",
        "SELECT a.k, a.c AS tc, b.c AS uc FROM (SELECT k, count(*) AS c FROM t GROUP BY k) a \
         JOIN (SELECT k, count(*) AS c FROM u GROUP BY k) b ON a.k = b.k",
    ),
    (
        "aggregate over aggregate",
        "SELECT c, count(*) AS keys FROM (SELECT k, count(*) AS c FROM t GROUP BY k) GROUP BY c",
    ),
];

/// One statement of the random changelog.
fn gen_statement(
    rng: &mut SmallRng,
    next_id: &mut i64,
    live: &mut Vec<(&'static str, i64)>,
) -> String {
    let table = if rng.random_bool(0.6) { "t" } else { "u" };
    let keys = 5;
    let k = |rng: &mut SmallRng| {
        if rng.random_bool(0.05) {
            "NULL".to_string()
        } else {
            rng.random_range(0..keys).to_string()
        }
    };
    let v = |rng: &mut SmallRng| {
        if rng.random_bool(0.05) {
            "NULL".to_string()
        } else {
            rng.random_range(-5..30).to_string()
        }
    };
    let ids: Vec<i64> = live
        .iter()
        .filter(|(t, _)| *t == table)
        .map(|(_, id)| *id)
        .collect();
    match rng.random_range(0..10) {
        // New rows, sometimes with an existing id (an upsert).
        0..=4 => {
            let n = rng.random_range(1..12);
            let values: Vec<String> = (0..n)
                .map(|_| {
                    let id = if !ids.is_empty() && rng.random_bool(0.2) {
                        ids[rng.random_range(0..ids.len())]
                    } else {
                        *next_id += 1;
                        live.push((table, *next_id));
                        *next_id
                    };
                    format!("({id}, {}, {})", k(rng), v(rng))
                })
                .collect();
            format!("INSERT INTO {table} VALUES {}", values.join(", "))
        }
        5 | 6 if !ids.is_empty() => {
            let n = rng.random_range(1..4).min(ids.len());
            let gone: Vec<String> = (0..n)
                .map(|_| ids[rng.random_range(0..ids.len())].to_string())
                .collect();
            format!("DELETE FROM {table} WHERE id IN ({})", gone.join(", "))
        }
        7 => format!(
            "DELETE FROM {table} WHERE k = {}",
            rng.random_range(0..keys)
        ),
        8 => {
            let column = if table == "t" { "v" } else { "w" };
            format!(
                "UPDATE {table} SET {column} = {column} + 1 WHERE k = {}",
                rng.random_range(0..keys)
            )
        }
        _ => format!(
            "UPDATE {table} SET k = {} WHERE k = {}",
            rng.random_range(0..keys),
            rng.random_range(0..keys)
        ),
    }
}

async fn create_views(client: &Client, suffix: &str) {
    for (i, (_, query)) in SHAPES.iter().enumerate() {
        for parallelism in [1, 4] {
            client
                .batch_execute(&format!(
                    "SET 'parallelism.default' = '{parallelism}';
                     CREATE MATERIALIZED VIEW v{i}_{suffix}_p{parallelism} AS {query}"
                ))
                .await
                .unwrap_or_else(|e| panic!("{query}: {e}"));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updating_queries_match_batch() {
    let seeds = case_seeds(BASE_SEED, DEFAULT_CASES);
    let started = Instant::now();
    let mut failures = Vec::new();
    let mut checked = 0;
    // Rows each shape's batch query gave over all cases: an empty oracle proves nothing.
    let mut oracle_rows = vec![0; SHAPES.len()];
    for seed in seeds {
        // A server per case: the views of one case do not slow the next.
        let dir = tempfile::tempdir().unwrap();
        let server = TestServer::start(dir.path()).await;
        let client = server.connect().await;
        client
            .batch_execute(
                "CREATE TABLE t (id BIGINT, k INT, v BIGINT, PRIMARY KEY (id) NOT ENFORCED);
                 CREATE TABLE u (id BIGINT, k INT, w BIGINT, PRIMARY KEY (id) NOT ENFORCED)",
            )
            .await
            .unwrap();
        let mut rng = SmallRng::seed_from_u64(seed);
        let statements = rng.random_range(40..120);
        let mut next_id = 0;
        let mut live = Vec::new();
        create_views(&client, "early").await;
        for i in 0..statements {
            if i == statements / 2 {
                create_views(&client, "late").await;
            }
            let sql = gen_statement(&mut rng, &mut next_id, &mut live);
            client
                .batch_execute(&sql)
                .await
                .unwrap_or_else(|e| panic!("seed {seed}: {sql}: {e}"));
            if rng.random_bool(0.15) {
                client.batch_execute("FLUSH").await.unwrap();
            }
        }
        client.batch_execute("FLUSH").await.unwrap();
        for (i, (name, query)) in SHAPES.iter().enumerate() {
            let expected = render(rows(&client, query).await);
            oracle_rows[i] += expected.len();
            for view in [
                format!("v{i}_early_p1"),
                format!("v{i}_early_p4"),
                format!("v{i}_late_p1"),
                format!("v{i}_late_p4"),
            ] {
                let actual = match try_rows(&client, &format!("SELECT * FROM {view}")).await {
                    Ok(r) => render(r),
                    Err(e) => vec![format!("ERROR: {e}")],
                };
                checked += 1;
                if actual != expected {
                    failures.push(format!(
                        "seed {seed} (WEIR_DIFF_SEED={seed}), shape `{name}`, view {view}\n  \
                         query: {query}\n{}",
                        diff(&expected, &actual)
                    ));
                }
            }
        }
        server.stop().await;
    }
    eprintln!(
        "differential (updating): {checked} views checked in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    for ((name, _), n) in SHAPES.iter().zip(&oracle_rows) {
        assert!(*n > 0, "shape `{name}` had no rows in any case");
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
