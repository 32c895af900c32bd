//! Subject mappings: rewrite the subject of an incoming publish before it is
//! routed and captured, configured like nats-server's `mappings`.
//!
//! Owns: parsing and validating a mapping (source filter -> one destination,
//! or several weighted destinations), and applying it to a literal subject.
//!
//! Destination tokens are literal, or one of these functions over the
//! source's `*` wildcards (numbered from 1, left to right):
//! - `{{wildcard(n)}}` or `$n`: the token matched by wildcard n;
//! - `{{partition(p, n, m…)}}`: `fnv1a32(token n ++ token m ++ …) % p`, the
//!   same hash (32-bit FNV-1a over the concatenated tokens, no separator)
//!   nats-server uses, so an edge and its hub agree on partitions;
//! - `{{split(n, d)}}`: token n cut at each `d`, empty parts dropped;
//! - `{{splitFromLeft(n, k)}}` / `{{splitFromRight(n, k)}}`: token n cut in
//!   two, k bytes from the left / right (unchanged if it is too short);
//! - `{{sliceFromLeft(n, k)}}` / `{{sliceFromRight(n, k)}}`: token n cut
//!   into k-byte pieces from the left / right, the remainder last / first.
//!
//! A source ending in `>` needs a destination ending in `>`; the tokens it
//! matched are appended. Function names are case-insensitive.
//!
//! Weighted destinations (canary, A/B): each publish picks one by a roll in
//! 0..100; weights sum to at most 100 and the remainder keeps the original
//! subject.
//!
//! Invariants: a [`Mappings`] only holds mappings that validated; applying
//! one never panics (all token indices were checked against the source, and
//! a subject is only transformed after it matched the source); a literal
//! source wins over wildcard sources, and wildcard sources never overlap
//! (config is refused), so at most one mapping applies to a subject.

use std::fmt;

use super::{filters_overlap, matches, valid_filter, valid_subject};

/// One part of a destination: a literal token or a function.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    /// Index into the source's tokens.
    Wildcard(usize),
    Partition {
        buckets: u32,
        tokens: Vec<usize>,
    },
    Split {
        token: usize,
        delim: String,
    },
    SplitFromLeft {
        token: usize,
        at: usize,
    },
    SplitFromRight {
        token: usize,
        at: usize,
    },
    SliceFromLeft {
        token: usize,
        size: usize,
    },
    SliceFromRight {
        token: usize,
        size: usize,
    },
    /// The trailing `>`: the rest of the subject.
    Rest,
}

/// A validated rewrite from a source filter to one destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transform {
    dest: String,
    parts: Vec<Part>,
    /// Number of tokens in the source (the `>` included).
    source_len: usize,
}

/// A mapping: a source filter and its weighted destinations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    source: String,
    /// (transform, weight in percent); weights sum to at most 100.
    dests: Vec<(Transform, u8)>,
}

/// Every configured mapping, ready to apply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mappings {
    literal: Vec<Mapping>,
    wildcard: Vec<Mapping>,
}

/// Why a mapping is refused, worded for the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappingError(pub String);

impl fmt::Display for MappingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn fail<T>(msg: impl Into<String>) -> Result<T, MappingError> {
    Err(MappingError(msg.into()))
}

/// 32-bit FNV-1a.
pub fn fnv1a32(bytes: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in bytes {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

impl Transform {
    /// Validate `dest` against `source`.
    pub fn new(source: &str, dest: &str) -> Result<Transform, MappingError> {
        if !valid_filter(source) {
            return fail(format!("source {source:?} is not a valid subject filter"));
        }
        let stoks: Vec<&str> = source.split('.').collect();
        // Wildcard number (1-based) -> source token index.
        let wildcards: Vec<usize> = stoks
            .iter()
            .enumerate()
            .filter(|(_, t)| **t == "*")
            .map(|(i, _)| i)
            .collect();
        let source_fwc = stoks.last() == Some(&">");
        if dest.is_empty() {
            return fail("destination is empty");
        }
        let dtoks: Vec<&str> = dest.split('.').collect();
        let mut parts = Vec::new();
        let last = dtoks.len() - 1;
        for (i, tok) in dtoks.iter().enumerate() {
            let part = parse_token(tok, &wildcards)?;
            if part == Part::Rest && i != last {
                return fail(format!("destination {dest:?}: '>' must be the last token"));
            }
            if let Part::Literal(l) = &part {
                if l == "*" || l.is_empty() || l.bytes().any(|b| b.is_ascii_whitespace()) {
                    return fail(format!(
                        "destination {dest:?}: token {tok:?} is not allowed (no '*', empty tokens or spaces)"
                    ));
                }
            }
            parts.push(part);
        }
        let dest_fwc = parts.last() == Some(&Part::Rest);
        if source_fwc != dest_fwc {
            return fail(format!(
                "destination {dest:?}: a source ending in '>' needs a destination ending in '>' and the other way round"
            ));
        }
        Ok(Transform {
            dest: dest.to_string(),
            parts,
            source_len: stoks.len(),
        })
    }

    /// The destination as configured.
    pub fn dest(&self) -> &str {
        &self.dest
    }

    /// Rewrite `subject`, which must match the source filter (the caller
    /// checks); a subject with fewer tokens yields `None`, never a panic.
    pub fn apply(&self, subject: &str) -> Option<String> {
        let toks: Vec<&str> = subject.split('.').collect();
        let mut out = String::with_capacity(subject.len() + 8);
        for part in &self.parts {
            let piece = match part {
                Part::Literal(l) => l.clone(),
                Part::Wildcard(i) => (*toks.get(*i)?).to_string(),
                Part::Partition { buckets, tokens } => {
                    let mut key = Vec::new();
                    for i in tokens {
                        key.extend_from_slice(toks.get(*i)?.as_bytes());
                    }
                    (fnv1a32(&key) % (*buckets).max(1)).to_string()
                }
                Part::Split { token, delim } => {
                    let t = toks.get(*token)?;
                    let pieces: Vec<&str> =
                        t.split(delim.as_str()).filter(|p| !p.is_empty()).collect();
                    if pieces.is_empty() {
                        // Nothing but delimiters: keep the token (a
                        // subject has no empty tokens).
                        (*t).to_string()
                    } else {
                        pieces.join(".")
                    }
                }
                Part::SplitFromLeft { token, at } => {
                    let t = toks.get(*token)?;
                    cut(t, *at)
                }
                Part::SplitFromRight { token, at } => {
                    let t = toks.get(*token)?;
                    match t.len().checked_sub(*at) {
                        Some(p) => cut(t, p),
                        None => (*t).to_string(),
                    }
                }
                Part::SliceFromLeft { token, size } => {
                    let t = toks.get(*token)?;
                    slice(t, *size, 0)
                }
                Part::SliceFromRight { token, size } => {
                    let t = toks.get(*token)?;
                    let rem = if *size > 0 { t.len() % size } else { 0 };
                    slice(t, *size, rem)
                }
                Part::Rest => {
                    let rest = toks.get(self.source_len - 1..)?;
                    rest.join(".")
                }
            };
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(&piece);
        }
        Some(out)
    }
}

/// `t` cut at byte `at` into two tokens, if `0 < at < len` on a char
/// boundary; else unchanged.
fn cut(t: &str, at: usize) -> String {
    match (t.get(..at), t.get(at..)) {
        (Some(a), Some(b)) if !a.is_empty() && !b.is_empty() => format!("{a}.{b}"),
        _ => t.to_string(),
    }
}

/// `t` in pieces of `size` bytes; the first piece is `first` bytes when
/// non-zero (slice from right), a short remainder goes last otherwise.
/// Unchanged when `size` is 0, not smaller than the token, or a cut would
/// split a character.
fn slice(t: &str, size: usize, first: usize) -> String {
    if size == 0 || size >= t.len() {
        return t.to_string();
    }
    let mut pieces = Vec::new();
    let mut pos = 0;
    if first > 0 {
        pieces.push(t.get(..first));
        pos = first;
    }
    while pos < t.len() {
        let end = (pos + size).min(t.len());
        pieces.push(t.get(pos..end));
        pos = end;
    }
    match pieces.into_iter().collect::<Option<Vec<&str>>>() {
        Some(p) => p.join("."),
        None => t.to_string(),
    }
}

/// Parse one destination token.
fn parse_token(tok: &str, wildcards: &[usize]) -> Result<Part, MappingError> {
    let index = |n: &str| -> Result<usize, MappingError> {
        let n: usize = match n.trim().parse() {
            Ok(n) => n,
            Err(_) => return fail(format!("{tok:?}: {n:?} is not a wildcard number")),
        };
        match n.checked_sub(1).and_then(|i| wildcards.get(i)) {
            Some(i) => Ok(*i),
            None => fail(format!(
                "{tok:?}: wildcard {n} does not exist; the source has {} '*' wildcard(s), numbered from 1",
                wildcards.len()
            )),
        }
    };
    let int = |n: &str| -> Result<usize, MappingError> {
        match n.trim().parse() {
            Ok(n) => Ok(n),
            Err(_) => fail(format!("{tok:?}: {n:?} is not a number")),
        }
    };
    if tok == ">" {
        return Ok(Part::Rest);
    }
    if let Some(n) = tok.strip_prefix('$') {
        if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) {
            return Ok(Part::Wildcard(index(n)?));
        }
        return Ok(Part::Literal(tok.to_string()));
    }
    let Some(inner) = tok.strip_prefix("{{").and_then(|t| t.strip_suffix("}}")) else {
        if tok.contains("{{") || tok.contains("}}") {
            return fail(format!(
                "{tok:?}: a mapping function must be the whole token, like {{{{wildcard(1)}}}}"
            ));
        }
        return Ok(Part::Literal(tok.to_string()));
    };
    let inner = inner.trim();
    let (name, args) = match (inner.find('('), inner.strip_suffix(')')) {
        (Some(open), Some(body)) => (inner[..open].trim(), body.get(open + 1..).unwrap_or("")),
        _ => return fail(format!("{tok:?}: expected {{{{function(arguments)}}}}")),
    };
    let args: Vec<&str> = args.split(',').map(str::trim).collect();
    let want = |n: usize| -> Result<(), MappingError> {
        if args.len() != n || args.iter().any(|a| a.is_empty()) {
            return fail(format!("{tok:?}: {name} takes {n} argument(s)"));
        }
        Ok(())
    };
    let name_lc = name.to_ascii_lowercase();
    let part = match name_lc.as_str() {
        "wildcard" => {
            want(1)?;
            Part::Wildcard(index(args[0])?)
        }
        "partition" => {
            if args.len() < 2 || args.iter().any(|a| a.is_empty()) {
                return fail(format!(
                    "{tok:?}: partition takes the number of partitions and one or more wildcard numbers"
                ));
            }
            let buckets = int(args[0])?;
            if buckets == 0 || buckets > u32::MAX as usize {
                return fail(format!("{tok:?}: the number of partitions must be at least 1"));
            }
            let tokens = args[1..].iter().map(|a| index(a)).collect::<Result<_, _>>()?;
            Part::Partition {
                buckets: buckets as u32,
                tokens,
            }
        }
        "split" => {
            want(2)?;
            let delim = args[1];
            if delim.contains('.') || delim.bytes().any(|b| b.is_ascii_whitespace()) {
                return fail(format!("{tok:?}: the split delimiter may not contain '.' or spaces"));
            }
            Part::Split {
                token: index(args[0])?,
                delim: delim.to_string(),
            }
        }
        "splitfromleft" | "splitfromright" | "slicefromleft" | "slicefromright" => {
            want(2)?;
            let token = index(args[0])?;
            let k = int(args[1])?;
            if k == 0 {
                return fail(format!("{tok:?}: the position or size must be at least 1"));
            }
            match name_lc.as_str() {
                "splitfromleft" => Part::SplitFromLeft { token, at: k },
                "splitfromright" => Part::SplitFromRight { token, at: k },
                "slicefromleft" => Part::SliceFromLeft { token, size: k },
                _ => Part::SliceFromRight { token, size: k },
            }
        }
        _ => {
            return fail(format!(
                "{tok:?}: unknown function {name:?}; use wildcard, partition, split, splitFromLeft, splitFromRight, sliceFromLeft or sliceFromRight"
            ))
        }
    };
    Ok(part)
}

/// Parse a weight: `"10%"`, `"10"` (percent).
pub fn parse_weight(s: &str) -> Result<u8, MappingError> {
    let n = s.trim().strip_suffix('%').unwrap_or(s.trim()).trim();
    match n.parse::<u8>() {
        Ok(w) if w <= 100 => Ok(w),
        _ => fail(format!("weight {s:?} must be a percentage from 0% to 100%")),
    }
}

impl Mapping {
    /// A mapping from `source` to weighted destinations `(dest, percent)`.
    pub fn new(source: &str, dests: &[(String, u8)]) -> Result<Mapping, MappingError> {
        if dests.is_empty() {
            return fail("no destination given");
        }
        let total: u32 = dests.iter().map(|(_, w)| u32::from(*w)).sum();
        if total > 100 {
            return fail(format!("weights add up to {total}%, more than 100%"));
        }
        let mut out = Vec::new();
        for (d, w) in dests {
            out.push((Transform::new(source, d)?, *w));
        }
        Ok(Mapping {
            source: source.to_string(),
            dests: out,
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// The transform chosen by `roll` (0..100), or `None` when the roll
    /// falls into the remainder that keeps the original subject.
    fn pick(&self, roll: u8) -> Option<&Transform> {
        let mut acc = 0u32;
        for (t, w) in &self.dests {
            acc += u32::from(*w);
            if u32::from(roll) < acc {
                return Some(t);
            }
        }
        None
    }
}

impl Mappings {
    /// Collect mappings; refuses overlapping wildcard sources.
    pub fn new(list: Vec<Mapping>) -> Result<Mappings, MappingError> {
        let mut m = Mappings::default();
        for map in list {
            if valid_subject(&map.source) {
                if m.literal.iter().any(|o| o.source == map.source) {
                    return fail(format!("source {:?} is mapped twice", map.source));
                }
                m.literal.push(map);
            } else {
                if let Some(o) = m
                    .wildcard
                    .iter()
                    .find(|o| filters_overlap(&o.source, &map.source))
                {
                    return fail(format!(
                        "sources {:?} and {:?} overlap; a subject may match one wildcard mapping only",
                        o.source, map.source
                    ));
                }
                m.wildcard.push(map);
            }
        }
        Ok(m)
    }

    pub fn is_empty(&self) -> bool {
        self.literal.is_empty() && self.wildcard.is_empty()
    }

    /// The mapped subject, or `None` to keep `subject`. `roll` picks among
    /// weighted destinations and is called only when one must be picked.
    pub fn apply(&self, subject: &str, roll: impl FnOnce() -> u8) -> Option<String> {
        let map = self
            .literal
            .iter()
            .find(|m| m.source == subject)
            .or_else(|| self.wildcard.iter().find(|m| matches(&m.source, subject)))?;
        let t = match map.dests.as_slice() {
            [(t, 100)] => t,
            _ => map.pick(roll())?,
        };
        t.apply(subject)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tr(src: &str, dest: &str, subj: &str) -> String {
        Transform::new(src, dest).unwrap().apply(subj).unwrap()
    }

    #[test]
    fn fnv_known_values() {
        // Published FNV-1a 32-bit test vectors.
        assert_eq!(fnv1a32(b""), 0x811c9dc5);
        assert_eq!(fnv1a32(b"a"), 0xe40c292c);
        assert_eq!(fnv1a32(b"foobar"), 0xbf9cf968);
    }

    #[test]
    fn wildcard_and_dollar() {
        assert_eq!(
            tr("a.*.*", "b.{{wildcard(2)}}.{{wildcard(1)}}", "a.x.y"),
            "b.y.x"
        );
        assert_eq!(tr("a.*.*", "b.$2.$1", "a.x.y"), "b.y.x");
        assert_eq!(tr("a.*", "b.{{ Wildcard( 1 ) }}", "a.x"), "b.x");
        assert_eq!(tr("a.*.>", "b.$1.>", "a.x.y.z"), "b.x.y.z");
        assert_eq!(tr("a.b", "c.d", "a.b"), "c.d");
        assert_eq!(tr("a.>", "c.>", "a.b.c"), "c.b.c");
        // `$foo` is a literal, as in nats-server.
        assert_eq!(tr("a", "$foo.x", "a"), "$foo.x");
    }

    #[test]
    fn partition() {
        let t = Transform::new("orders.*", "orders.{{partition(3,1)}}.{{wildcard(1)}}").unwrap();
        for i in 0..20 {
            let s = format!("orders.{i}");
            let p = fnv1a32(i.to_string().as_bytes()) % 3;
            assert_eq!(t.apply(&s).unwrap(), format!("orders.{p}.{i}"));
        }
        // Several tokens: concatenated without separator.
        let t = Transform::new("a.*.*", "{{partition(10,1,2)}}").unwrap();
        assert_eq!(t.apply("a.x.y").unwrap(), (fnv1a32(b"xy") % 10).to_string());
        assert!(Transform::new("a.*", "{{partition(3)}}").is_err());
        assert!(Transform::new("a.*", "{{partition(0,1)}}").is_err());
    }

    #[test]
    fn split() {
        assert_eq!(tr("a.*", "{{split(1,-)}}", "a.x-y--z-"), "x.y.z");
        assert_eq!(tr("a.*", "b.{{split(1,-)}}.c", "a.xyz"), "b.xyz.c");
        assert_eq!(tr("a.*", "{{split(1,-)}}", "a.---"), "---");
        assert!(Transform::new("a.*", "{{split(1,.)}}").is_err());
    }

    #[test]
    fn split_from_left_right() {
        assert_eq!(tr("a.*", "{{splitFromLeft(1,2)}}", "a.abcdef"), "ab.cdef");
        assert_eq!(tr("a.*", "{{splitFromRight(1,2)}}", "a.abcdef"), "abcd.ef");
        assert_eq!(tr("a.*", "{{splitFromLeft(1,9)}}", "a.abc"), "abc");
        assert_eq!(tr("a.*", "{{splitFromRight(1,3)}}", "a.abc"), "abc");
    }

    #[test]
    fn slice_from_left_right() {
        assert_eq!(tr("a.*", "{{sliceFromLeft(1,2)}}", "a.abcde"), "ab.cd.e");
        assert_eq!(tr("a.*", "{{sliceFromRight(1,2)}}", "a.abcde"), "a.bc.de");
        assert_eq!(tr("a.*", "{{sliceFromLeft(1,2)}}", "a.abcd"), "ab.cd");
        assert_eq!(tr("a.*", "{{sliceFromRight(1,2)}}", "a.abcd"), "ab.cd");
        assert_eq!(tr("a.*", "{{sliceFromLeft(1,5)}}", "a.abc"), "abc");
        // A cut inside a character leaves the token whole.
        assert_eq!(tr("a.*", "{{sliceFromLeft(1,1)}}", "a.é"), "é");
    }

    #[test]
    fn invalid() {
        for (s, d) in [
            ("a.*", "{{wildcard(2)}}"),
            ("a.*", "$0"),
            ("a.*", "{{nope(1)}}"),
            ("a.*", "x{{wildcard(1)}}"),
            ("a.*", "{{wildcard(1,2)}}"),
            ("a.>", "b"),
            ("a", "b.>"),
            ("a", "{{wildcard(1)}}"),
            ("a", "b.*"),
            ("a", "b..c"),
            ("a..b", "c"),
            ("a.*", "{{splitFromLeft(1,0)}}"),
        ] {
            assert!(Transform::new(s, d).is_err(), "{s} -> {d}");
        }
    }

    #[test]
    fn weights() {
        assert_eq!(parse_weight("90%").unwrap(), 90);
        assert_eq!(parse_weight("10").unwrap(), 10);
        assert!(parse_weight("101%").is_err());
        assert!(parse_weight("x").is_err());
        let m = Mapping::new("svc", &[("svc.v1".into(), 90), ("svc.v2".into(), 5)]).unwrap();
        let ms = Mappings::new(vec![m]).unwrap();
        assert_eq!(ms.apply("svc", || 0).as_deref(), Some("svc.v1"));
        assert_eq!(ms.apply("svc", || 89).as_deref(), Some("svc.v1"));
        assert_eq!(ms.apply("svc", || 90).as_deref(), Some("svc.v2"));
        assert_eq!(ms.apply("svc", || 94).as_deref(), Some("svc.v2"));
        assert_eq!(ms.apply("svc", || 95), None);
        assert_eq!(ms.apply("other", || 0), None);
        assert!(Mapping::new("svc", &[("a".into(), 60), ("b".into(), 41)]).is_err());
        // Statistically about right with a real roll.
        let mut v2 = 0;
        for _ in 0..10_000 {
            if ms.apply("svc", || fastrand::u8(..100)).as_deref() == Some("svc.v2") {
                v2 += 1;
            }
        }
        assert!((300..=700).contains(&v2), "{v2}");
    }

    #[test]
    fn selection() {
        let one = |s: &str, d: &str| Mapping::new(s, &[(d.to_string(), 100)]).unwrap();
        let ms = Mappings::new(vec![one("a.*", "w.$1"), one("a.b", "lit")]).unwrap();
        assert_eq!(ms.apply("a.b", || 0).as_deref(), Some("lit"));
        assert_eq!(ms.apply("a.c", || 0).as_deref(), Some("w.c"));
        assert_eq!(ms.apply("a.c.d", || 0), None);
        assert!(Mappings::new(vec![one("a.*", "x"), one("*.b", "y")]).is_err());
        assert!(Mappings::new(vec![one("a", "x"), one("a", "y")]).is_err());
    }
}
