//! A view or job reading an updating view goes on from its place in that view's changes
//! after a restart, a rescale or from a savepoint.
//!
//! The upstream view's job stores its changes per epoch (folded into its stored rows now
//! and then). A reader records, in its checkpoints, the last upstream epoch it read; it
//! resumes with the stored changes after it, then the live publishes. So that a fold
//! does not remove changes a reader still needs, every reader is registered in the
//! upstream's store with the epoch its newest checkpoint resumes after (written after
//! that checkpoint, so never ahead of it), and folds keep the changes after the lowest.
//! A reader that stops (dropped, stopped, finished) is unregistered; a savepoint taken
//! as it stops is registered in its place, and keeps the changes after it until it is
//! dropped (DROP SAVEPOINT).

use std::sync::Arc;

use datafusion::common::Result;

use super::store::Checkpoints;
use super::SourcePosition;
use crate::stream::graph::{NodeKind, SourceKind, StreamGraph};
use crate::stream::message::Epoch;
use crate::stream::mv::MvState;
use crate::stream::source::followed_position;

/// An updating view a graph follows, and the task that reads it.
#[derive(Clone)]
pub struct FollowedView {
    pub task: usize,
    pub view: Arc<MvState>,
}

/// The updating views `graph` follows, with the tasks (in launch order) that read them.
pub fn followed_views(graph: &StreamGraph) -> Vec<FollowedView> {
    let mut out = Vec::new();
    let mut task = 0;
    for chain in graph.chains() {
        let head = &graph.nodes[chain[0]];
        if let NodeKind::Source(spec) = &head.kind {
            if let SourceKind::View {
                state,
                bounded: false,
            } = &spec.kind
            {
                if state.updating {
                    // A view is read by one subtask.
                    out.extend((task..task + head.parallelism).map(|task| FollowedView {
                        task,
                        view: state.clone(),
                    }));
                }
            }
        }
        task += head.parallelism;
    }
    out
}

/// A position of a reader of an updating view recorded before readers kept their place
/// in its changes (the rows it had delivered, 8 bytes): it cannot go on from it.
const EARLIER_POSITION_BYTES: usize = 8;

/// Where a followed view's reader was in a checkpoint.
enum Place {
    /// It had not started following (or recorded no position): it starts from the rows.
    Unstarted,
    /// Recorded by an earlier version, which kept no place in the view's changes.
    Earlier,
    /// After this epoch of this lineage of the view's checkpoints.
    After { lineage: u64, epoch: Epoch },
}

/// Where each followed view's reader is in `sources` (a checkpoint's source positions,
/// by task).
fn places<'a>(
    followed: &'a [FollowedView],
    sources: &[Option<SourcePosition>],
) -> Result<Vec<(&'a FollowedView, Place)>> {
    followed
        .iter()
        .map(|f| {
            let place = match sources.get(f.task).and_then(Option::as_ref) {
                None => Place::Unstarted,
                Some(s) if s.position.len() == EARLIER_POSITION_BYTES => Place::Earlier,
                Some(s) => match followed_position(&s.position)? {
                    Some((lineage, epoch)) => Place::After { lineage, epoch },
                    None => Place::Unstarted,
                },
            };
            Ok((f, place))
        })
        .collect()
}

/// Where `view`'s job stores its checkpoints and changes.
fn view_log(store: &Arc<dyn weir_catalog::StateStore>, view: &str) -> Checkpoints {
    Checkpoints::new(store.clone(), &format!("view/{view}"))
}

/// Registers `reader` at every view it follows, after the epoch its newest checkpoint's
/// `sources` resume after.
pub fn register_at(
    followed: &[FollowedView],
    reader: &Checkpoints,
    sources: &[Option<SourcePosition>],
) -> Result<()> {
    for (f, place) in places(followed, sources)? {
        let Place::After { lineage, epoch } = place else {
            continue;
        };
        if let Some((log, current)) = f.view.log() {
            if current == lineage {
                log.register_reader(reader, epoch)?;
            }
        }
    }
    Ok(())
}

/// [`register_at`] for a reader restored at `sources`, made durable at once: a start
/// from a savepoint has no earlier registration to fall back on.
pub fn register_restored(
    followed: &[FollowedView],
    reader: &Checkpoints,
    sources: &[Option<SourcePosition>],
) -> Result<()> {
    register_at(followed, reader, sources)?;
    for f in followed {
        if let Some((log, _)) = f.view.log() {
            log.flush()?;
        }
    }
    Ok(())
}

/// Registers a reader starting afresh: it follows each view from its rows as they are
/// published now, or later.
pub fn register_fresh(followed: &[FollowedView], reader: &Checkpoints) -> Result<()> {
    for f in followed {
        if let Some((log, _)) = f.view.log() {
            log.register_reader(reader, f.view.published_epoch())?;
            // Its first checkpoint's registration may be lost in a crash: this one stays.
            log.flush()?;
        }
    }
    Ok(())
}

/// Why a reader restored at `sources` cannot go on from its place in a view it follows,
/// if so.
pub fn unresumable(
    followed: &[FollowedView],
    sources: &[Option<SourcePosition>],
) -> Result<Option<String>> {
    for (f, place) in places(followed, sources)? {
        match place {
            Place::Unstarted => {}
            Place::Earlier => {
                return Ok(Some(
                    "it was checkpointed by an earlier version of Weir, which did not record \
                     where it was in the changes of the views it reads"
                        .into(),
                ))
            }
            Place::After { lineage, epoch } => {
                if let Err(why) = f.view.resumable(lineage, epoch)? {
                    return Ok(Some(format!(
                        "where it was in a view it reads (after that view's epoch {epoch}) is \
                         gone: {why}"
                    )));
                }
            }
        }
    }
    Ok(None)
}

/// Unregisters `reader` at each of `views` (by name): it was removed.
pub fn unregister(
    store: &Arc<dyn weir_catalog::StateStore>,
    views: impl IntoIterator<Item = String>,
    reader: &Checkpoints,
) -> Result<()> {
    for view in views {
        view_log(store, &view).unregister_reader(reader)?;
    }
    Ok(())
}

/// The views (of `views`, by name) where `reader` is registered, and the epoch each keeps
/// its changes after for it.
pub fn pinned_by(
    store: &Arc<dyn weir_catalog::StateStore>,
    views: &[String],
    reader: &Checkpoints,
) -> Result<Vec<(String, Epoch)>> {
    let mut out = Vec::new();
    for view in views {
        if let Some(epoch) = view_log(store, view).reader_epoch(reader)? {
            out.push((view.clone(), epoch));
        }
    }
    Ok(out)
}

/// Registers savepoint `savepoint` of `reader` (stopping) at each of `views` (by name)
/// where `reader` is registered, at the same epoch: the views keep their changes after
/// it for a start from the savepoint. Returns each view's name and that epoch.
pub fn pin_for_savepoint(
    store: &Arc<dyn weir_catalog::StateStore>,
    views: impl IntoIterator<Item = String>,
    reader: &Checkpoints,
    savepoint: &Checkpoints,
) -> Result<Vec<(String, Epoch)>> {
    let views: Vec<String> = views.into_iter().collect();
    let pinned = pinned_by(store, &views, reader)?;
    for (view, epoch) in &pinned {
        let log = view_log(store, view);
        log.register_reader(savepoint, *epoch)?;
        log.flush()?;
    }
    Ok(pinned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use weir_catalog::{MemoryStore, StateStore};

    fn position(bytes: Vec<u8>) -> Option<SourcePosition> {
        Some(SourcePosition {
            position: bytes,
            watermark: 0,
        })
    }

    #[test]
    fn a_reader_goes_on_only_from_a_place_its_view_still_keeps() {
        let store: Arc<dyn StateStore> = Arc::new(MemoryStore::default());
        let log = Checkpoints::new(store.clone(), "view/v");
        let lineage = log.lineage().unwrap();
        let schema = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, true)]));
        let view = MvState::new(schema, true);
        view.set_log(log.clone(), lineage);
        let followed = vec![FollowedView { task: 1, view }];
        let at = |lineage: u64, epoch: Epoch| {
            vec![
                None,
                position([lineage.to_be_bytes(), epoch.to_be_bytes()].concat()),
            ]
        };
        let reader = Checkpoints::new(store, "job/r");
        assert_eq!(unresumable(&followed, &at(lineage, 4)).unwrap(), None);
        assert_eq!(
            unresumable(&followed, &at(0, 0)).unwrap(),
            None,
            "not following yet"
        );
        register_at(&followed, &reader, &at(lineage, 4)).unwrap();
        assert_eq!(log.reader_epoch(&reader).unwrap(), Some(4));

        log.compact_view(9, &[]).unwrap();
        // The registered reader's changes are kept; an earlier place is gone.
        assert_eq!(unresumable(&followed, &at(lineage, 4)).unwrap(), None);
        let why = unresumable(&followed, &at(lineage, 3)).unwrap().unwrap();
        assert!(why.contains("folded"), "{why}");
        let why = unresumable(&followed, &at(lineage + 1, 4))
            .unwrap()
            .unwrap();
        assert!(why.contains("rebuilt"), "{why}");
        // A reader checkpointed before places were recorded (rows delivered).
        let earlier = vec![None, position(7u64.to_be_bytes().to_vec())];
        let why = unresumable(&followed, &earlier).unwrap().unwrap();
        assert!(why.contains("earlier version"), "{why}");
        register_at(&followed, &reader, &earlier).unwrap();
        assert_eq!(
            log.reader_epoch(&reader).unwrap(),
            Some(4),
            "left as it was"
        );
    }
}
