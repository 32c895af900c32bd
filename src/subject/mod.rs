//! NATS subjects: syntax, wildcard matching, the interest trie, and the
//! MQTT topic mapping.
//!
//! Owns: what a valid subject and filter are, whether a filter matches a
//! subject, whether two filters can match a common subject, the interest
//! trie the router looks subscriptions up in ([`trie`]), and the
//! round-tripping map between MQTT topics and NATS subjects ([`mqtt`]), and
//! subject mappings applied to incoming publishes ([`mapping`]).
//!
//! Subjects are `.`-separated non-empty tokens without whitespace. In a
//! filter, the token `*` matches exactly one token and a final `>` matches one
//! or more tokens. Every function here is pure and never panics.

pub mod mapping;
pub mod mqtt;
pub mod trie;

pub use trie::{FastMap, FastSet, SubjectTrie};

/// Whether `s` is a valid subject to publish to (no wildcards).
pub fn valid_subject(s: &str) -> bool {
    valid(s, false)
}

/// Whether `s` is a valid subscription filter (wildcards allowed).
pub fn valid_filter(s: &str) -> bool {
    valid(s, true)
}

fn valid(s: &str, wildcards: bool) -> bool {
    if s.is_empty() {
        return false;
    }
    // Byte-wise (this runs for every publish): tokens split at `.`.
    let mut tokens = s.as_bytes().split(|b| *b == b'.').peekable();
    while let Some(t) = tokens.next() {
        if t.is_empty()
            || t.iter()
                .any(|b| *b == b' ' || *b == b'\t' || *b == b'\r' || *b == b'\n')
        {
            return false;
        }
        match t {
            b"*" if !wildcards => return false,
            b">" if !wildcards || tokens.peek().is_some() => return false,
            _ => {}
        }
    }
    true
}

/// Whether `filter` matches the (literal) `subject`.
pub fn matches(filter: &str, subject: &str) -> bool {
    let mut f = filter.as_bytes().split(|b| *b == b'.');
    let mut s = subject.as_bytes().split(|b| *b == b'.');
    loop {
        match (f.next(), s.next()) {
            (None, None) => return true,
            (Some(b">"), Some(_)) => return true,
            (Some(b"*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            _ => return false,
        }
    }
}

/// Whether some subject could match both filters.
pub fn filters_overlap(a: &str, b: &str) -> bool {
    let mut x = a.split('.');
    let mut y = b.split('.');
    loop {
        match (x.next(), y.next()) {
            (None, None) => return true,
            (Some(">"), Some(_)) | (Some(_), Some(">")) => return true,
            (Some("*"), Some(_)) | (Some(_), Some("*")) => {}
            (Some(p), Some(q)) if p == q => {}
            _ => return false,
        }
    }
}

/// The filter that matches exactly the subjects both filters match, or
/// `None` when no subject matches both (both must be valid filters).
pub fn filter_intersection(a: &str, b: &str) -> Option<String> {
    let x: Vec<&str> = a.split('.').collect();
    let y: Vec<&str> = b.split('.').collect();
    let mut out: Vec<&str> = Vec::with_capacity(x.len().max(y.len()));
    for i in 0.. {
        match (x.get(i).copied(), y.get(i).copied()) {
            (None, None) => break,
            (Some(">"), Some(_)) => {
                out.extend_from_slice(y.get(i..).unwrap_or_default());
                break;
            }
            (Some(_), Some(">")) => {
                out.extend_from_slice(x.get(i..).unwrap_or_default());
                break;
            }
            (Some("*"), Some(t)) | (Some(t), Some("*")) => out.push(t),
            (Some(p), Some(q)) if p == q => out.push(p),
            _ => return None,
        }
    }
    Some(out.join("."))
}

/// Whether every subject matched by `inner` is matched by `outer` (both
/// valid NATS filters).
pub fn filter_within(inner: &str, outer: &str) -> bool {
    let mut i = inner.split('.');
    let mut o = outer.split('.');
    loop {
        match (i.next(), o.next()) {
            (None, None) => return true,
            (Some(_), Some(">")) => return true,
            (Some(">"), Some(_)) => return false,
            (Some(_), Some("*")) => {}
            (Some(a), Some(b)) if a == b && a != "*" => {}
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_within_rules() {
        assert!(filter_within("a.b", "a.b"));
        assert!(filter_within("a.b", "a.*"));
        assert!(filter_within("a.*", "a.*"));
        assert!(filter_within("a.>", "a.>"));
        assert!(filter_within("a.*.c", "a.>"));
        assert!(!filter_within("a.>", "a.*"));
        assert!(!filter_within("a.*", "a.b"));
        assert!(!filter_within("a", "a.>"));
        assert!(!filter_within("a.b.c", "a.*"));
    }

    #[test]
    fn intersection_of_filters() {
        let i = |a, b| filter_intersection(a, b);
        assert_eq!(i("secret.>", ">").as_deref(), Some("secret.>"));
        assert_eq!(i(">", "secret.>").as_deref(), Some("secret.>"));
        assert_eq!(i("secret.>", "secret.a.>").as_deref(), Some("secret.a.>"));
        assert_eq!(i("a.*.c", "a.b.*").as_deref(), Some("a.b.c"));
        assert_eq!(i("a.*", "*.b").as_deref(), Some("a.b"));
        assert_eq!(i("a.>", "*.*.x").as_deref(), Some("a.*.x"));
        assert_eq!(i(">", ">").as_deref(), Some(">"));
        assert_eq!(i("a.b", "a.b").as_deref(), Some("a.b"));
        assert_eq!(i("a.>", "a"), None);
        assert_eq!(i("a.b", "a.c"), None);
        assert_eq!(i("a.*", "a.b.c"), None);
        assert_eq!(i("secret.>", "a.>"), None);
    }

    #[test]
    fn validity() {
        assert!(valid_subject("a.b.c"));
        assert!(!valid_subject("a.*.c"));
        assert!(!valid_subject("a..c"));
        assert!(!valid_subject(".a"));
        assert!(!valid_subject("a b"));
        assert!(valid_filter("a.*.>"));
        assert!(!valid_filter("a.>.b"));
        assert!(valid_filter(">"));
        assert!(valid_filter("a.b*"));
    }

    #[test]
    fn matching() {
        assert!(matches("a.*.c", "a.b.c"));
        assert!(matches("a.>", "a.b.c"));
        assert!(!matches("a.>", "a"));
        assert!(matches(">", "a"));
        assert!(!matches("a.*", "a.b.c"));
        assert!(!matches("a.b", "a.b.c"));
        assert!(matches("a.b", "a.b"));
    }

    #[test]
    fn overlap() {
        assert!(filters_overlap("a.>", "a.b"));
        assert!(filters_overlap("a.*", "*.b"));
        assert!(!filters_overlap("a.*", "a.b.c"));
        assert!(!filters_overlap("a.b", "a.c"));
        assert!(filters_overlap(">", "x.y"));
        assert!(!filters_overlap("a", "a.>"));
    }
}
