//! Interned subjects and per-subject state (first, last, count).
//!
//! Each distinct subject with at least one live message has one entry and a
//! small integer id; records refer to their subject by id (4 bytes per
//! record in the segment index). Pure data structure, no I/O.
//!
//! Invariants: an entry exists iff `count > 0`; `last` is exact; `first` is
//! a lower bound of the first live sequence (a hint the store makes exact
//! lazily by scanning forward, see `Store::subject_first`). Ids of removed
//! entries are reused, so an id stored for a deleted record means nothing.

use crate::subject::FastMap;

/// State of one subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectEntry {
    pub name: Box<str>,
    /// Lower bound of the first live sequence (exact when `count == 1`:
    /// then it equals `last`).
    pub first: u64,
    pub last: u64,
    pub count: u64,
}

/// Subject name <-> id, with per-subject counts.
#[derive(Debug, Default)]
pub struct SubjectTable {
    ids: FastMap<Box<str>, u32>,
    entries: Vec<Option<SubjectEntry>>,
    free: Vec<u32>,
}

impl SubjectTable {
    /// The id of `name`, if it has live messages.
    pub fn get(&self, name: &str) -> Option<u32> {
        self.ids.get(name).copied()
    }

    pub fn entry(&self, id: u32) -> Option<&SubjectEntry> {
        self.entries.get(id as usize)?.as_ref()
    }

    pub fn entry_mut(&mut self, id: u32) -> Option<&mut SubjectEntry> {
        self.entries.get_mut(id as usize)?.as_mut()
    }

    /// Counts one new message `seq` (the newest so far) on `name`.
    pub fn add(&mut self, name: &str, seq: u64) -> u32 {
        if let Some(id) = self.get(name) {
            if let Some(e) = self.entry_mut(id) {
                if e.count == 0 {
                    e.first = seq;
                }
                e.count += 1;
                e.last = seq;
                return id;
            }
        }
        let entry = SubjectEntry {
            name: name.into(),
            first: seq,
            last: seq,
            count: 1,
        };
        let id = match self.free.pop() {
            Some(id) => {
                if let Some(slot) = self.entries.get_mut(id as usize) {
                    *slot = Some(entry);
                }
                id
            }
            None => {
                self.entries.push(Some(entry));
                (self.entries.len() - 1) as u32
            }
        };
        self.ids.insert(name.into(), id);
        id
    }

    /// Counts one message of subject `id` at sequence `seq` as removed.
    /// Returns the remaining count. The entry is freed at zero.
    pub fn remove(&mut self, id: u32, seq: u64) -> u64 {
        let Some(e) = self.entry_mut(id) else {
            return 0;
        };
        e.count = e.count.saturating_sub(1);
        if e.count == 0 {
            let name = e.name.clone();
            if let Some(slot) = self.entries.get_mut(id as usize) {
                *slot = None;
            }
            self.ids.remove(&name);
            self.free.push(id);
            return 0;
        }
        if seq <= e.first {
            e.first = seq + 1;
        }
        if e.count == 1 {
            // Exact once one is left only if `last` is that one: the
            // caller fixes `last` when it removed the last message.
            if seq != e.last {
                e.first = e.last;
            }
        }
        e.count
    }

    /// Number of subjects with live messages.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Every live subject: (id, entry).
    pub fn iter(&self) -> impl Iterator<Item = (u32, &SubjectEntry)> {
        self.entries
            .iter()
            .enumerate()
            .filter_map(|(i, e)| Some((i as u32, e.as_ref()?)))
    }

    pub fn clear(&mut self) {
        self.ids.clear();
        self.entries.clear();
        self.free.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_remove_reuse() {
        let mut t = SubjectTable::default();
        let a = t.add("a", 1);
        let b = t.add("b", 2);
        assert_eq!(t.add("a", 3), a);
        assert_eq!(
            t.entry(a).map(|e| (e.first, e.last, e.count)),
            Some((1, 3, 2))
        );
        assert_eq!(t.remove(a, 1), 1);
        assert_eq!(t.entry(a).map(|e| (e.first, e.last)), Some((3, 3)));
        assert_eq!(t.remove(b, 2), 0);
        assert!(t.get("b").is_none());
        assert_eq!(t.len(), 1);
        let c = t.add("c", 4);
        assert_eq!(c, b, "freed id reused");
        assert_eq!(t.iter().count(), 2);
    }
}
