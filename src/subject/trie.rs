//! The interest trie: which subscriptions match a subject, fast.
//!
//! Owns: a map from filters to values (subscription ids), organised as a
//! tree of tokens. Each node has literal children, an optional `*` child and
//! a set of values whose filter ends in `>` at that point. A lookup walks
//! the literal and the `*` branch for each token, and collects `>` values
//! along the way; it costs O(tokens × wildcard fan-out), independent of the
//! number of subscriptions.
//!
//! A bounded result cache (subject -> matching values) sits in front of the
//! tree. Invariant: a cached result is always what a fresh walk would
//! return — every insert or remove drops the cached subjects its filter
//! matches (at most [`CACHE_MAX`] filter-matches per change), and the cache
//! is emptied when it is full. Reply inboxes (`_INBOX.…`) are never
//! cached: each is used for one request by convention, so caching them
//! would only evict the subjects that repeat.
//!
//! Filters must be valid ([`super::valid_filter`]); subjects need not be
//! (an invalid subject simply matches what its tokens match). Nothing here
//! panics on any input.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::{Arc, OnceLock};

/// A `HashMap` with [`FastHash`].
pub type FastMap<K, V> = HashMap<K, V, FastHash>;
/// A `HashSet` with [`FastHash`].
pub type FastSet<V> = HashSet<V, FastHash>;

/// The hasher of the per-message maps (subject cache, trie tokens,
/// subscription ids): a multiply-and-rotate hash over 8-byte words with a
/// final avalanche, keyed by a random per-process seed so that peers
/// cannot precompute colliding subjects offline. Several times cheaper
/// than std's SipHash for the short keys used here; zero-sized, so maps
/// stay small (10,000 subscriptions make 30,000 of them).
#[derive(Clone, Copy, Default)]
pub struct FastHash;

fn seed() -> u64 {
    static SEED: OnceLock<u64> = OnceLock::new();
    *SEED.get_or_init(|| fastrand::u64(..) | 1)
}

impl BuildHasher for FastHash {
    type Hasher = FastHasher;
    fn build_hasher(&self) -> FastHasher {
        FastHasher(seed())
    }
}

/// See [`FastHash`].
pub struct FastHasher(u64);

const MUL: u64 = 0x9E37_79B9_7F4A_7C15;

impl FastHasher {
    #[inline]
    fn mix(&mut self, word: u64) {
        self.0 = (self.0 ^ word).wrapping_mul(MUL).rotate_left(29);
    }
}

impl Hasher for FastHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.mix(u64::from_le_bytes(w));
        }
        let tail = chunks.remainder();
        if !tail.is_empty() {
            let mut w = [0u8; 8];
            if let Some(dst) = w.get_mut(..tail.len()) {
                dst.copy_from_slice(tail);
            }
            self.mix(u64::from_le_bytes(w) ^ ((tail.len() as u64) << 59));
        }
    }

    fn write_u8(&mut self, i: u8) {
        self.mix(u64::from(i));
    }

    fn write_u64(&mut self, i: u64) {
        self.mix(i);
    }

    fn write_usize(&mut self, i: usize) {
        self.mix(i as u64);
    }

    fn finish(&self) -> u64 {
        // Avalanche, so that the low bits hashbrown uses depend on all.
        let mut h = self.0;
        h ^= h >> 33;
        h = h.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
        h ^= h >> 33;
        h
    }
}

/// Most cached lookup results. Every subscription change scans the cache
/// (to drop the subjects it affects), so this also bounds that cost.
pub const CACHE_MAX: usize = 1024;

/// Most literal children kept in a plain list before switching to a map.
const FEW: usize = 8;

/// One token position. Memory matters here (10,000 subscriptions to
/// distinct subjects make 20,000 nodes): children are boxed and, while
/// few (most nodes have one), kept in an exact-size list; the value sets
/// exist only on nodes where a filter ends.
struct Node<V> {
    literal: Children<V>,
    star: Option<Box<Node<V>>>,
    values: Option<Box<Values<V>>>,
}

#[derive(Default)]
struct Values<V> {
    /// Values of filters that end at this node.
    here: FastSet<V>,
    /// Values of filters that end with `>` right after this node.
    rest: FastSet<V>,
}

enum Children<V> {
    Few(Vec<(Box<str>, Box<Node<V>>)>),
    Many(FastMap<Box<str>, Box<Node<V>>>),
}

impl<V> Default for Node<V> {
    fn default() -> Self {
        Node {
            literal: Children::Few(Vec::new()),
            star: None,
            values: None,
        }
    }
}

impl<V> Children<V> {
    fn is_empty(&self) -> bool {
        match self {
            Children::Few(v) => v.is_empty(),
            Children::Many(m) => m.is_empty(),
        }
    }

    fn get(&self, t: &str) -> Option<&Node<V>> {
        match self {
            Children::Few(v) => v.iter().find(|(k, _)| &**k == t).map(|(_, n)| &**n),
            Children::Many(m) => m.get(t).map(|n| &**n),
        }
    }

    fn get_mut(&mut self, t: &str) -> Option<&mut Node<V>> {
        match self {
            Children::Few(v) => v.iter_mut().find(|(k, _)| &**k == t).map(|(_, n)| &mut **n),
            Children::Many(m) => m.get_mut(t).map(|n| &mut **n),
        }
    }

    fn get_or_insert(&mut self, t: &str) -> &mut Node<V> {
        if let Children::Few(v) = self {
            if v.len() >= FEW && !v.iter().any(|(k, _)| &**k == t) {
                let m: FastMap<_, _> = std::mem::take(v).into_iter().collect();
                *self = Children::Many(m);
            }
        }
        match self {
            Children::Few(v) => {
                let i = match v.iter().position(|(k, _)| &**k == t) {
                    Some(i) => i,
                    None => {
                        v.reserve_exact(1);
                        v.push((t.into(), Box::default()));
                        v.len() - 1
                    }
                };
                // `i` was just found in or pushed onto `v`.
                &mut v[i].1
            }
            Children::Many(m) => m.entry(t.into()).or_default(),
        }
    }

    fn remove(&mut self, t: &str) {
        match self {
            Children::Few(v) => {
                v.retain(|(k, _)| &**k != t);
                v.shrink_to_fit();
            }
            Children::Many(m) => {
                m.remove(t);
            }
        }
    }
}

impl<V: Eq + Hash> Node<V> {
    fn is_empty(&self) -> bool {
        self.literal.is_empty()
            && self.star.is_none()
            && self
                .values
                .as_ref()
                .is_none_or(|v| v.here.is_empty() && v.rest.is_empty())
    }

    fn values_mut(&mut self) -> &mut Values<V> {
        self.values.get_or_insert_with(|| {
            Box::new(Values {
                here: FastSet::default(),
                rest: FastSet::default(),
            })
        })
    }

    /// Remove `value` from `here` (or `rest`); drops an empty value box.
    fn remove_value(&mut self, value: &V, rest: bool) -> bool {
        let Some(vals) = self.values.as_mut() else {
            return false;
        };
        let set = if rest { &mut vals.rest } else { &mut vals.here };
        let removed = set.remove(value);
        if vals.here.is_empty() && vals.rest.is_empty() {
            self.values = None;
        }
        removed
    }
}

/// A set of (filter, value) pairs with fast "who matches this subject".
pub struct SubjectTrie<V> {
    root: Node<V>,
    len: usize,
    cache: FastMap<Box<str>, Arc<[V]>>,
    /// The shared result of every lookup that matches nothing (no
    /// allocation per miss).
    empty: Arc<[V]>,
    /// Lookups answered from the cache (for tests and metrics).
    pub cache_hits: u64,
}

impl<V: Copy + Eq + Hash> Default for SubjectTrie<V> {
    fn default() -> Self {
        SubjectTrie::new()
    }
}

impl<V: Copy + Eq + Hash> SubjectTrie<V> {
    pub fn new() -> SubjectTrie<V> {
        SubjectTrie {
            root: Node::default(),
            len: 0,
            cache: FastMap::default(),
            empty: Arc::from(Vec::new()),
            cache_hits: 0,
        }
    }

    /// Number of (filter, value) pairs.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Add `value` under `filter`; false if that pair was already there.
    pub fn insert(&mut self, filter: &str, value: V) -> bool {
        let mut node = &mut self.root;
        let mut tokens = filter.split('.').peekable();
        let mut added = false;
        while let Some(t) = tokens.next() {
            if t == ">" && tokens.peek().is_none() {
                added = node.values_mut().rest.insert(value);
                break;
            }
            node = if t == "*" {
                node.star.get_or_insert_with(Box::default)
            } else {
                node.literal.get_or_insert(t)
            };
            if tokens.peek().is_none() {
                added = node.values_mut().here.insert(value);
            }
        }
        if added {
            self.len += 1;
            self.invalidate(filter);
        }
        added
    }

    /// Remove the pair; false if it was not there. Empty nodes are pruned.
    pub fn remove(&mut self, filter: &str, value: V) -> bool {
        let tokens: Vec<&str> = filter.split('.').collect();
        let removed = remove_at(&mut self.root, &tokens, &value);
        if removed {
            self.len -= 1;
            self.invalidate(filter);
        }
        removed
    }

    /// Every value whose filter matches `subject` (each once, any order).
    pub fn matches(&mut self, subject: &str) -> Arc<[V]> {
        if let Some(hit) = self.cache.get(subject) {
            self.cache_hits += 1;
            return hit.clone();
        }
        let found = self.lookup(subject);
        let result: Arc<[V]> = if found.is_empty() {
            self.empty.clone()
        } else {
            found.into()
        };
        if subject.starts_with("_INBOX.") {
            return result;
        }
        if self.cache.len() >= CACHE_MAX {
            self.cache.clear();
        }
        self.cache.insert(subject.into(), result.clone());
        result
    }

    /// A fresh walk, bypassing the cache.
    pub fn lookup(&self, subject: &str) -> Vec<V> {
        let mut out = Vec::new();
        collect(&self.root, Some(subject), &mut out);
        dedup(&mut out);
        out
    }

    /// Whether anything matches `subject` (uses the cache when it can).
    pub fn has_interest(&mut self, subject: &str) -> bool {
        !self.matches(subject).is_empty()
    }

    fn invalidate(&mut self, filter: &str) {
        if self.cache.is_empty() {
            return;
        }
        self.cache.retain(|subj, _| !super::matches(filter, subj));
    }
}

/// Walks the tokens of `subject` (`None`: all consumed) from `node`.
fn collect<V: Copy>(node: &Node<V>, subject: Option<&str>, out: &mut Vec<V>) {
    let Some(subject) = subject else {
        if let Some(v) = &node.values {
            out.extend(v.here.iter().copied());
        }
        return;
    };
    // `>` after this node matches one or more remaining tokens.
    if let Some(v) = &node.values {
        out.extend(v.rest.iter().copied());
    }
    let (first, rest) = match subject.split_once('.') {
        Some((first, rest)) => (first, Some(rest)),
        None => (subject, None),
    };
    if let Some(child) = node.literal.get(first) {
        collect(child, rest, out);
    }
    if let Some(star) = &node.star {
        collect(star, rest, out);
    }
}

/// Drops repeated values (one value stored under two filters that both
/// match); order is not kept.
fn dedup<V: Copy + Eq + Hash>(v: &mut Vec<V>) {
    if v.len() <= 16 {
        let mut i = 1;
        while i < v.len() {
            if v.get(..i).is_some_and(|seen| seen.contains(&v[i])) {
                v.swap_remove(i);
            } else {
                i += 1;
            }
        }
    } else {
        let mut seen = FastSet::with_capacity_and_hasher(v.len(), FastHash);
        v.retain(|x| seen.insert(*x));
    }
}

fn remove_at<V: Eq + Hash>(node: &mut Node<V>, tokens: &[&str], value: &V) -> bool {
    let Some((first, rest)) = tokens.split_first() else {
        return false;
    };
    if *first == ">" && rest.is_empty() {
        return node.remove_value(value, true);
    }
    let child = if *first == "*" {
        match node.star.as_deref_mut() {
            Some(c) => c,
            None => return false,
        }
    } else {
        match node.literal.get_mut(first) {
            Some(c) => c,
            None => return false,
        }
    };
    let removed = if rest.is_empty() {
        child.remove_value(value, false)
    } else {
        remove_at(child, rest, value)
    };
    if removed && child.is_empty() {
        if *first == "*" {
            node.star = None;
        } else {
            node.literal.remove(first);
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::subject::matches;

    fn sorted(v: &[u32]) -> Vec<u32> {
        let mut v = v.to_vec();
        v.sort_unstable();
        v
    }

    #[test]
    fn basics() {
        let mut t = SubjectTrie::new();
        assert!(t.insert("a.b.c", 1));
        assert!(t.insert("a.*.c", 2));
        assert!(t.insert("a.>", 3));
        assert!(t.insert(">", 4));
        assert!(t.insert("*", 5));
        assert!(!t.insert("a.>", 3));
        assert_eq!(t.len(), 5);
        assert_eq!(sorted(&t.matches("a.b.c")), vec![1, 2, 3, 4]);
        assert_eq!(sorted(&t.matches("a")), vec![4, 5]);
        assert_eq!(sorted(&t.matches("a.b")), vec![3, 4]);
        assert_eq!(sorted(&t.matches("x.y")), vec![4]);
        assert!(t.remove("a.>", 3));
        assert!(!t.remove("a.>", 3));
        assert!(!t.remove("nope.x", 3));
        assert_eq!(sorted(&t.matches("a.b.c")), vec![1, 2, 4]);
        for (f, v) in [("a.b.c", 1), ("a.*.c", 2), (">", 4), ("*", 5)] {
            assert!(t.remove(f, v));
        }
        assert!(t.is_empty());
        assert!(t.root.is_empty(), "empty nodes are pruned");
    }

    #[test]
    fn cache_is_invalidated_by_changes() {
        let mut t = SubjectTrie::new();
        t.insert("a.*", 1u32);
        assert_eq!(sorted(&t.matches("a.x")), vec![1]);
        assert_eq!(sorted(&t.matches("a.x")), vec![1]);
        assert_eq!(t.cache_hits, 1);
        t.insert("a.x", 2);
        assert_eq!(sorted(&t.matches("a.x")), vec![1, 2]);
        t.remove("a.*", 1);
        assert_eq!(sorted(&t.matches("a.x")), vec![2]);
        // An unrelated change keeps the entry.
        let hits = t.cache_hits;
        t.insert("b.>", 3);
        assert_eq!(sorted(&t.matches("a.x")), vec![2]);
        assert_eq!(t.cache_hits, hits + 1);
    }

    /// Random filters and subjects over a tiny alphabet (so that they
    /// collide often); the trie (with its cache) must agree with the naive
    /// matcher after every change.
    #[test]
    fn randomized_against_naive_matcher() {
        // A tiny alphabet (collisions), then one past the list -> map switch.
        let small: &[&str] = &["a", "b", "c"];
        let large: &[&str] = &["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k"];
        for toks in [small, large] {
            randomized_run(toks);
        }
    }

    fn randomized_run(toks: &[&str]) {
        let mut rng = fastrand::Rng::with_seed(7);
        let token = |rng: &mut fastrand::Rng, wild: bool| -> String {
            if wild && rng.u8(..4) == 0 {
                "*".into()
            } else {
                toks[rng.usize(..toks.len())].into()
            }
        };
        let filter = |rng: &mut fastrand::Rng| -> String {
            let n = rng.usize(1..5);
            let mut parts: Vec<String> = (0..n).map(|_| token(rng, true)).collect();
            if rng.u8(..4) == 0 {
                parts.push(">".into());
            }
            parts.join(".")
        };
        let subject = |rng: &mut fastrand::Rng| -> String {
            let n = rng.usize(1..6);
            (0..n)
                .map(|_| token(rng, false))
                .collect::<Vec<_>>()
                .join(".")
        };
        let mut trie = SubjectTrie::new();
        let mut naive: Vec<(String, u32)> = Vec::new();
        for step in 0..4000u32 {
            if naive.is_empty() || rng.u8(..3) != 0 {
                let f = filter(&mut rng);
                let v = rng.u32(..50);
                let fresh = !naive.iter().any(|(g, w)| *g == f && *w == v);
                assert_eq!(trie.insert(&f, v), fresh, "insert {f} {v}");
                if fresh {
                    naive.push((f, v));
                }
            } else {
                let i = rng.usize(..naive.len());
                let (f, v) = naive.swap_remove(i);
                assert!(trie.remove(&f, v), "remove {f} {v}");
            }
            assert_eq!(trie.len(), naive.len());
            for _ in 0..4 {
                let s = subject(&mut rng);
                let mut want: Vec<u32> = naive
                    .iter()
                    .filter(|(f, _)| matches(f, &s))
                    .map(|(_, v)| *v)
                    .collect();
                want.sort_unstable();
                want.dedup();
                assert_eq!(sorted(&trie.matches(&s)), want, "step {step} subject {s}");
            }
        }
        assert!(trie.cache_hits > 0);
    }

    #[test]
    fn many_subscriptions() {
        // 100,000 subscriptions of devices (lookup speed is measured by
        // `frond bench nats`, not asserted here).
        let mut t = SubjectTrie::new();
        for i in 0..100_000u32 {
            t.insert(&format!("dev.{i}.cmd.>"), i);
        }
        t.insert("dev.*.status", 1_000_000);
        t.insert(">", 1_000_001);
        for i in 0..100_000u32 {
            let m = t.lookup(&format!("dev.{i}.cmd.reboot"));
            assert_eq!(m.len(), 2);
        }
        for i in 0..100_000u32 {
            assert!(t.remove(&format!("dev.{i}.cmd.>"), i));
        }
        assert_eq!(t.len(), 2);
    }
}
