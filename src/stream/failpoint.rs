//! Failure injection for recovery tests: `WEIR_FAILPOINTS=name=action[@n],...` in the
//! environment makes the n-th time (default: first) the server passes failpoint `name`
//! abort the process (`crash`, as a kill -9 at exactly that moment), panic the task
//! passing it (`panic`), or fail what it is doing with an error (`error`, where the
//! failpoint's caller supports it). Unset, a failpoint costs one relaxed atomic load.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;

/// The places a checkpoint can be interrupted at.
pub mod at {
    /// A task snapshotted and is about to acknowledge the barrier.
    pub const BEFORE_ACK: &str = "checkpoint-before-ack";
    /// A task's thread storing the state its operators keep beyond memory read some of
    /// it and has not acknowledged the barrier.
    pub const STORING_BEYOND_MEMORY: &str = "checkpoint-storing-beyond-memory";
    /// The coordinator is about to write an epoch's snapshots to the store.
    pub const DURING_WRITE: &str = "checkpoint-during-write";
    /// The epoch is committed in the store; the sinks have not published it yet.
    pub const BEFORE_PUBLISH: &str = "checkpoint-before-publish";
    /// A Kafka write-ahead sink wrote half of a committed epoch's messages.
    pub const KAFKA_COMMIT_MIDWAY: &str = "kafka-commit-midway";
    /// An operator processing rows.
    pub const OPERATOR: &str = "operator-process";
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Crash,
    Panic,
    Error,
}

struct Point {
    action: Action,
    at: u64,
    hits: AtomicU64,
}

static ANY: AtomicBool = AtomicBool::new(true);
static POINTS: OnceLock<HashMap<String, Point>> = OnceLock::new();

fn points() -> &'static HashMap<String, Point> {
    POINTS.get_or_init(|| {
        let points = parse(&std::env::var("WEIR_FAILPOINTS").unwrap_or_default());
        ANY.store(!points.is_empty(), Ordering::Relaxed);
        points
    })
}

fn parse(spec: &str) -> HashMap<String, Point> {
    spec.split(',')
        .filter_map(|entry| {
            let (name, rest) = entry.trim().split_once('=')?;
            let (action, at) = match rest.split_once('@') {
                Some((a, n)) => (a, n.parse().ok()?),
                None => (rest, 1),
            };
            let action = match action {
                "crash" => Action::Crash,
                "panic" => Action::Panic,
                "error" => Action::Error,
                _ => return None,
            };
            Some((
                name.to_string(),
                Point {
                    action,
                    at,
                    hits: AtomicU64::new(0),
                },
            ))
        })
        .collect()
}

/// Whether failpoint `name` is set at all (to prepare what it is to interrupt).
pub fn armed(name: &str) -> bool {
    ANY.load(Ordering::Relaxed) && points().contains_key(name)
}

/// Passes failpoint `name`; true when the caller is to fail with an error.
pub fn hit(name: &str) -> bool {
    if !ANY.load(Ordering::Relaxed) {
        return false;
    }
    let Some(point) = points().get(name) else {
        return false;
    };
    if point.hits.fetch_add(1, Ordering::SeqCst) + 1 != point.at {
        return false;
    }
    match point.action {
        Action::Crash => {
            eprintln!("failpoint {name}: crashing");
            std::process::abort();
        }
        Action::Panic => panic!("failpoint {name}"),
        Action::Error => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse() {
        let p = parse("a=crash, b=panic@3,c=nothing,d,e=error@2");
        assert_eq!(p["e"].action, Action::Error);
        assert_eq!(p["e"].at, 2);
        assert_eq!(p["a"].action, Action::Crash);
        assert_eq!(p["a"].at, 1);
        assert_eq!(p["b"].action, Action::Panic);
        assert_eq!(p["b"].at, 3);
        assert!(!p.contains_key("c") && !p.contains_key("d"));
    }
}
