//! Which consumed offsets may be committed.
//!
//! Every record is registered when it is consumed and marked done when all it
//! caused is durable (its rows committed and its records acknowledged by the
//! broker, or its dead letter acknowledged, or nothing to do). Records finish
//! out of order across channels, so a partition's commit position is its
//! first offset that is not done yet.

use std::collections::VecDeque;

use crate::telemetry::Origin;

#[derive(Debug)]
struct PartitionOffsets {
    topic: String,
    partition: i32,
    /// Consumed offsets not yet committable, ascending, with their done flag.
    in_flight: VecDeque<(i64, bool)>,
    /// One past the last consumed offset.
    consumed_to: Option<i64>,
    /// The position last handed out for commit.
    committed: Option<i64>,
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
            in_flight: VecDeque::new(),
            consumed_to: None,
            committed: None,
        });
        (self.partitions.len() - 1) as u32
    }

    /// The (topic, partition) behind an [`Origin::partition`] index.
    pub fn partition_name(&self, index: u32) -> Option<(&str, i32)> {
        self.partitions
            .get(index as usize)
            .map(|p| (p.topic.as_str(), p.partition))
    }

    /// A partition was assigned with the group's `committed` offset: commits
    /// only move forward from it, even while records below it are consumed
    /// again to refill windows.
    pub fn assigned(&mut self, index: u32, committed: Option<i64>) {
        let p = &mut self.partitions[index as usize];
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

    /// Marks a record's effects durable.
    pub fn done(&mut self, origin: Origin) {
        let Some(p) = self.partitions.get_mut(origin.partition as usize) else {
            return;
        };
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

    /// Records consumed and not yet done, over all partitions.
    pub fn outstanding(&self) -> usize {
        self.partitions
            .iter()
            .map(|p| p.in_flight.iter().filter(|(_, d)| !d).count())
            .sum()
    }

    fn position(p: &PartitionOffsets) -> Option<i64> {
        p.in_flight.front().map(|(o, _)| *o).or(p.consumed_to)
    }

    /// Positions that moved since the last call: (topic, partition, offset to commit).
    pub fn take_commits(&mut self) -> Vec<(String, i32, i64)> {
        let mut commits = Vec::new();
        for p in &mut self.partitions {
            let position = Self::position(p);
            if position > p.committed {
                p.committed = position;
                commits.push((
                    p.topic.clone(),
                    p.partition,
                    position.expect("checked is_some"),
                ));
            }
        }
        commits
    }

    /// Forgets a partition that was revoked: what is still in flight will be
    /// processed again by whoever owns it next.
    pub fn revoke(&mut self, topic: &str, partition: i32) {
        if let Some(p) = self
            .partitions
            .iter_mut()
            .find(|p| p.partition == partition && p.topic == topic)
        {
            p.in_flight.clear();
            p.consumed_to = None;
            p.committed = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_stop_at_the_first_record_not_done() {
        let mut t = OffsetTracker::default();
        let p = t.partition_index("telemetry.acs", 0);
        for offset in 10..15 {
            t.consumed(Origin {
                partition: p,
                offset,
            });
        }
        assert_eq!(t.take_commits(), vec![("telemetry.acs".into(), 0, 10)]);
        t.done(Origin {
            partition: p,
            offset: 11,
        });
        t.done(Origin {
            partition: p,
            offset: 12,
        });
        assert_eq!(
            t.take_commits(),
            vec![],
            "10 is not done: the position stays"
        );
        t.done(Origin {
            partition: p,
            offset: 10,
        });
        assert_eq!(t.take_commits(), vec![("telemetry.acs".into(), 0, 13)]);
        t.done(Origin {
            partition: p,
            offset: 14,
        });
        t.done(Origin {
            partition: p,
            offset: 13,
        });
        assert_eq!(t.take_commits(), vec![("telemetry.acs".into(), 0, 15)]);
        assert_eq!(t.outstanding(), 0);
    }

    #[test]
    fn partitions_are_independent() {
        let mut t = OffsetTracker::default();
        let a = t.partition_index("t", 0);
        let b = t.partition_index("t", 1);
        assert_eq!(t.partition_index("t", 1), b);
        t.consumed(Origin {
            partition: a,
            offset: 0,
        });
        t.consumed(Origin {
            partition: b,
            offset: 5,
        });
        t.done(Origin {
            partition: b,
            offset: 5,
        });
        let mut commits = t.take_commits();
        commits.sort();
        assert_eq!(commits, vec![("t".into(), 0, 0), ("t".into(), 1, 6)]);
        assert_eq!(t.outstanding(), 1);
    }

    #[test]
    fn commits_never_go_below_the_offset_committed_at_assignment() {
        let mut t = OffsetTracker::default();
        let p = t.partition_index("t", 0);
        t.assigned(p, Some(20));
        for offset in 10..25 {
            t.consumed(Origin {
                partition: p,
                offset,
            });
        }
        for offset in 10..22 {
            t.done(Origin {
                partition: p,
                offset,
            });
        }
        assert_eq!(t.take_commits(), vec![("t".into(), 0, 22)]);
        t.assigned(p, Some(22));
        t.consumed(Origin {
            partition: p,
            offset: 15,
        });
        assert_eq!(
            t.take_commits(),
            vec![],
            "refilling from 15 commits nothing"
        );
        assert_eq!(t.partition_name(p), Some(("t", 0)));
    }
}
