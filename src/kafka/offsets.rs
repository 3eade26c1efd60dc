//! Which consumed offsets may be committed.
//!
//! Every record is registered when it is consumed and marked done when all it
//! caused is durable (its rows committed and its records acknowledged by the
//! broker, or its dead letter acknowledged, or nothing to do). Records finish
//! out of order across channels, so a partition's commit position is its
//! first offset that is not done yet.
//!
//! Every record from that one on waits here (and its outputs in the sink),
//! however long that record takes: a held model's channel keeps its
//! partition's position back while the other channels on it flow. So a
//! partition with `max_uncommitted` records waiting is paused, and resumed
//! once it has drained to half that ([`OffsetTracker::pause_if_full`],
//! [`OffsetTracker::take_resumable`]).

use std::collections::VecDeque;

use crate::telemetry::Origin;

#[derive(Debug)]
struct PartitionOffsets {
    topic: String,
    partition: i32,
    /// Bumped at every assignment and revocation: records consumed under an
    /// older generation belong to an assignment that has ended.
    generation: u32,
    /// Whether this instance owns the partition now.
    owned: bool,
    /// The group's committed offset when the partition was last assigned:
    /// records below it had their outputs published before.
    assigned_at: Option<i64>,
    /// Consumed offsets not yet committable, ascending, with their done flag.
    in_flight: VecDeque<(i64, bool)>,
    /// One past the last consumed offset.
    consumed_to: Option<i64>,
    /// The position last handed out for commit.
    committed: Option<i64>,
    /// Whether the consumer was told to pause the partition and not yet to
    /// resume it. Kept across assignments: a partition assigned again is
    /// resumed explicitly, whatever the consumer kept of its pause.
    paused: bool,
}

/// A partition's new commit position, as handed out by
/// [`OffsetTracker::take_commits`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    pub topic: String,
    pub partition: i32,
    /// The next offset to read: everything below it is done.
    pub offset: i64,
    /// The tracker's index and the assignment's generation.
    pub index: u32,
    pub generation: u32,
    /// The position handed out before this one, for [`OffsetTracker::rewind`].
    previous: Option<i64>,
}

#[derive(Debug, Default)]
pub struct OffsetTracker {
    partitions: Vec<PartitionOffsets>,
}

impl OffsetTracker {
    /// The index that [`Origin::partition`] uses for (topic, partition).
    pub fn partition_index(&mut self, topic: &str, partition: i32) -> u32 {
        if let Some(i) = self
            .partitions
            .iter()
            .position(|p| p.partition == partition && p.topic == topic)
        {
            return i as u32;
        }
        self.partitions.push(PartitionOffsets {
            topic: topic.to_owned(),
            partition,
            generation: 0,
            owned: false,
            assigned_at: None,
            in_flight: VecDeque::new(),
            consumed_to: None,
            committed: None,
            paused: false,
        });
        (self.partitions.len() - 1) as u32
    }

    /// The (topic, partition) behind an [`Origin::partition`] index.
    pub fn partition_name(&self, index: u32) -> Option<(&str, i32)> {
        self.partitions
            .get(index as usize)
            .map(|p| (p.topic.as_str(), p.partition))
    }

    /// The generation records consumed from partition `index` now belong to.
    pub fn generation(&self, index: u32) -> u32 {
        self.partitions[index as usize].generation
    }

    /// A partition was assigned with the group's `committed` offset: commits
    /// only move forward from it, even while records below it are consumed
    /// again to refill windows.
    pub fn assigned(&mut self, index: u32, committed: Option<i64>) {
        let p = &mut self.partitions[index as usize];
        p.generation = p.generation.wrapping_add(1);
        p.owned = true;
        p.assigned_at = committed;
        p.in_flight.clear();
        p.consumed_to = None;
        p.committed = committed;
    }

    /// Registers a consumed record.
    pub fn consumed(&mut self, origin: Origin) {
        let p = &mut self.partitions[origin.partition as usize];
        // A rewind (a rebalance handing the partition back) starts over.
        if p.in_flight
            .back()
            .is_some_and(|(last, _)| *last >= origin.offset)
        {
            p.in_flight.clear();
        }
        p.in_flight.push_back((origin.offset, false));
        p.consumed_to = Some(origin.offset + 1);
    }

    /// Marks a record's effects durable (or ready to commit with it).
    /// Records of an ended assignment are ignored.
    pub fn done(&mut self, origin: Origin) {
        let Some(p) = self.partitions.get_mut(origin.partition as usize) else {
            return;
        };
        if p.generation != origin.generation {
            return;
        }
        if let Ok(i) = p
            .in_flight
            .binary_search_by_key(&origin.offset, |(o, _)| *o)
        {
            p.in_flight[i].1 = true;
        }
        while p.in_flight.front().is_some_and(|(_, done)| *done) {
            p.in_flight.pop_front();
        }
    }

    /// Whether `origin`'s outputs are still this instance's to publish: its
    /// partition is owned under the same assignment, and the record was not
    /// below the committed offset at that assignment (its outputs were
    /// published then, by whoever committed it).
    pub fn is_ours_to_publish(&self, origin: Origin) -> bool {
        self.partitions
            .get(origin.partition as usize)
            .is_some_and(|p| {
                p.owned
                    && p.generation == origin.generation
                    && p.assigned_at.is_none_or(|c| origin.offset >= c)
            })
    }

    /// Records consumed and not yet done, over all partitions.
    pub fn outstanding(&self) -> usize {
        self.partitions
            .iter()
            .map(|p| p.in_flight.iter().filter(|(_, d)| !d).count())
            .sum()
    }

    /// Whether partition `index` has `max_uncommitted` records waiting
    /// (consumed, from its oldest unfinished one on) and is not paused yet:
    /// then it is marked paused, and the caller pauses it. Returns how many
    /// wait.
    pub fn pause_if_full(&mut self, index: u32, max_uncommitted: usize) -> Option<usize> {
        let p = &mut self.partitions[index as usize];
        if p.paused || !p.owned || p.in_flight.len() < max_uncommitted {
            return None;
        }
        p.paused = true;
        Some(p.in_flight.len())
    }

    /// Owned partitions marked paused that have drained to half of
    /// `max_uncommitted` records waiting (or were assigned again since),
    /// now marked resumed: the caller resumes them.
    pub fn take_resumable(&mut self, max_uncommitted: usize) -> Vec<(String, i32)> {
        self.partitions
            .iter_mut()
            .filter(|p| p.paused && p.owned && p.in_flight.len() <= max_uncommitted / 2)
            .map(|p| {
                p.paused = false;
                (p.topic.clone(), p.partition)
            })
            .collect()
    }

    /// Owned partitions marked paused.
    pub fn paused(&self) -> usize {
        self.partitions
            .iter()
            .filter(|p| p.paused && p.owned)
            .count()
    }

    fn position(p: &PartitionOffsets) -> Option<i64> {
        p.in_flight.front().map(|(o, _)| *o).or(p.consumed_to)
    }

    /// Positions of owned partitions that moved since the last call.
    pub fn take_commits(&mut self) -> Vec<Commit> {
        let mut commits = Vec::new();
        for (index, p) in self.partitions.iter_mut().enumerate() {
            let position = Self::position(p);
            if p.owned && position > p.committed {
                commits.push(Commit {
                    topic: p.topic.clone(),
                    partition: p.partition,
                    offset: position.expect("checked is_some"),
                    index: index as u32,
                    generation: p.generation,
                    previous: p.committed,
                });
                p.committed = position;
            }
        }
        commits
    }

    /// The commit position of `(topic, partition)` while it is owned.
    pub fn committed(&self, topic: &str, partition: i32) -> Option<i64> {
        self.partitions
            .iter()
            .find(|p| p.partition == partition && p.topic == topic && p.owned)
            .and_then(|p| p.committed)
    }

    /// Takes back commits that did not happen (an aborted transaction, a
    /// failed commit), so the next [`OffsetTracker::take_commits`] hands them
    /// out again; those of ended assignments are dropped.
    pub fn rewind(&mut self, commits: &[Commit]) {
        for c in commits {
            let p = &mut self.partitions[c.index as usize];
            if p.generation == c.generation && p.committed == Some(c.offset) {
                p.committed = c.previous;
            }
        }
    }

    /// A partition was revoked: what is still in flight will be processed
    /// again by whoever owns it next, so none of it is published from here.
    pub fn revoke(&mut self, topic: &str, partition: i32) {
        if let Some(p) = self
            .partitions
            .iter_mut()
            .find(|p| p.partition == partition && p.topic == topic)
        {
            Self::end_assignment(p);
        }
    }

    /// Every partition's assignment ends at once (the sink gives them up to
    /// start again from the committed offsets): nothing in flight is
    /// published or committed from here.
    pub fn revoke_all(&mut self) {
        self.partitions.iter_mut().for_each(Self::end_assignment);
    }

    fn end_assignment(p: &mut PartitionOffsets) {
        p.generation = p.generation.wrapping_add(1);
        p.owned = false;
        p.assigned_at = None;
        p.in_flight.clear();
        p.consumed_to = None;
        p.committed = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record of generation 1, what the first assignment gives.
    fn at(partition: u32, offset: i64) -> Origin {
        Origin {
            partition,
            generation: 1,
            offset,
        }
    }

    fn positions(commits: Vec<Commit>) -> Vec<(String, i32, i64)> {
        let mut v: Vec<_> = commits
            .into_iter()
            .map(|c| (c.topic, c.partition, c.offset))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn commits_stop_at_the_first_record_not_done() {
        let mut t = OffsetTracker::default();
        let p = t.partition_index("telemetry.acs", 0);
        t.assigned(p, None);
        for offset in 10..15 {
            t.consumed(at(p, offset));
        }
        assert_eq!(
            positions(t.take_commits()),
            vec![("telemetry.acs".into(), 0, 10)]
        );
        t.done(at(p, 11));
        t.done(at(p, 12));
        assert_eq!(
            positions(t.take_commits()),
            vec![],
            "10 is not done: the position stays"
        );
        t.done(at(p, 10));
        assert_eq!(
            positions(t.take_commits()),
            vec![("telemetry.acs".into(), 0, 13)]
        );
        t.done(at(p, 14));
        t.done(at(p, 13));
        assert_eq!(
            positions(t.take_commits()),
            vec![("telemetry.acs".into(), 0, 15)]
        );
        assert_eq!(t.outstanding(), 0);
    }

    #[test]
    fn partitions_are_independent() {
        let mut t = OffsetTracker::default();
        let a = t.partition_index("t", 0);
        let b = t.partition_index("t", 1);
        assert_eq!(t.partition_index("t", 1), b);
        t.assigned(a, None);
        t.assigned(b, None);
        t.consumed(at(a, 0));
        t.consumed(at(b, 5));
        t.done(at(b, 5));
        let commits = positions(t.take_commits());
        assert_eq!(commits, vec![("t".into(), 0, 0), ("t".into(), 1, 6)]);
        assert_eq!(t.outstanding(), 1);
    }

    #[test]
    fn commits_never_go_below_the_offset_committed_at_assignment() {
        let mut t = OffsetTracker::default();
        let p = t.partition_index("t", 0);
        t.assigned(p, Some(20));
        for offset in 10..25 {
            t.consumed(at(p, offset));
        }
        for offset in 10..22 {
            t.done(at(p, offset));
        }
        assert_eq!(positions(t.take_commits()), vec![("t".into(), 0, 22)]);
        t.assigned(p, Some(22));
        t.consumed(at(p, 15));
        assert_eq!(
            positions(t.take_commits()),
            vec![],
            "refilling from 15 commits nothing"
        );
        assert_eq!(t.partition_name(p), Some(("t", 0)));
    }

    #[test]
    fn an_ended_assignment_publishes_and_commits_nothing() {
        let mut t = OffsetTracker::default();
        let p = t.partition_index("t", 0);
        t.assigned(p, Some(5));
        let old = Origin {
            generation: t.generation(p),
            ..at(p, 7)
        };
        t.consumed(old);
        assert!(t.is_ours_to_publish(old));
        assert!(
            !t.is_ours_to_publish(Origin { offset: 4, ..old }),
            "below the committed offset: published by whoever committed it"
        );
        t.revoke("t", 0);
        assert!(!t.is_ours_to_publish(old), "revoked");
        t.done(old);
        assert_eq!(positions(t.take_commits()), vec![], "not owned");
        t.assigned(p, Some(5));
        assert!(
            !t.is_ours_to_publish(old),
            "assigned again: a new generation"
        );
        t.consumed(Origin {
            generation: t.generation(p),
            ..old
        });
        t.done(old);
        assert_eq!(
            positions(t.take_commits()),
            vec![("t".into(), 0, 7)],
            "the old generation's done is ignored: 7 is not done"
        );
    }

    #[test]
    fn rewound_commits_are_handed_out_again() {
        let mut t = OffsetTracker::default();
        let p = t.partition_index("t", 0);
        t.assigned(p, Some(3));
        let g = t.generation(p);
        for offset in 3..6 {
            t.consumed(Origin {
                generation: g,
                ..at(p, offset)
            });
            t.done(Origin {
                generation: g,
                ..at(p, offset)
            });
        }
        let commits = t.take_commits();
        assert_eq!(positions(commits.clone()), vec![("t".into(), 0, 6)]);
        assert_eq!(positions(t.take_commits()), vec![]);
        t.rewind(&commits);
        assert_eq!(positions(t.take_commits()), vec![("t".into(), 0, 6)]);
        t.rewind(&commits);
        t.revoke("t", 0);
        t.assigned(p, Some(3));
        t.rewind(&commits);
        assert_eq!(
            positions(t.take_commits()),
            vec![],
            "a rewind of an ended assignment is dropped"
        );
    }

    #[test]
    fn a_partition_pauses_when_records_wait_behind_an_unfinished_one_and_resumes_once_drained() {
        let mut t = OffsetTracker::default();
        let p = t.partition_index("t", 0);
        let q = t.partition_index("t", 1);
        t.assigned(p, None);
        t.assigned(q, None);
        // Offset 0 is held (a held model's record); 1.. finish at once.
        t.consumed(at(p, 0));
        for offset in 1..4 {
            t.consumed(at(p, offset));
            t.done(at(p, offset));
            assert_eq!(t.pause_if_full(p, 5), None, "{offset}: 4 wait at most");
        }
        t.consumed(at(p, 4));
        t.done(at(p, 4));
        assert_eq!(t.pause_if_full(p, 5), Some(5), "0 and the 4 behind it");
        assert_eq!(t.pause_if_full(p, 5), None, "paused already");
        assert_eq!(t.paused(), 1);
        for offset in 0..10 {
            t.consumed(at(q, offset));
            t.done(at(q, offset));
            assert_eq!(t.pause_if_full(q, 5), None, "nothing waits on partition 1");
        }
        assert_eq!(t.take_resumable(5), vec![], "offset 0 still holds 5 back");
        t.done(at(p, 0));
        assert_eq!(t.take_resumable(5), vec![("t".to_owned(), 0)]);
        assert_eq!(t.take_resumable(5), vec![], "resumed once");
        assert_eq!(
            positions(t.take_commits()),
            vec![("t".into(), 0, 5), ("t".into(), 1, 10)]
        );

        // Paused, revoked, assigned again: resumed explicitly, since the
        // consumer may have kept the pause.
        for offset in 5..10 {
            t.consumed(at(p, offset));
        }
        assert_eq!(t.pause_if_full(p, 5), Some(5));
        t.revoke("t", 0);
        assert_eq!(t.take_resumable(5), vec![], "not owned: nothing to resume");
        t.assigned(p, Some(5));
        assert_eq!(t.take_resumable(5), vec![("t".to_owned(), 0)]);
        assert_eq!(t.paused(), 0);
    }
}
