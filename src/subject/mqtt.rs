//! MQTT topic names and filters <-> NATS subjects.
//!
//! Levels map to tokens (`a/b` -> `a.b`), `+` -> `*`, `#` -> `>`, as
//! nats-server does, so the hub sees the subjects a nats-server leaf would
//! produce for ordinary topics. Unlike nats-server, every topic the MQTT
//! specification allows has a subject, and the mapping round-trips:
//!
//! | in an MQTT level | in the NATS token |
//! | --- | --- |
//! | empty level      | `/`            (nats-server does the same) |
//! | `.`              | `//`           (nats-server does the same) |
//! | `%`              | `%25` |
//! | space, tab, CR, LF | `%20`, `%09`, `%0D`, `%0A` |
//! | a level that is exactly `*` or `>` | `%2A`, `%3E` |
//!
//! Invariant: `subject_to_topic(topic_to_subject(t)) == t` for every valid
//! topic name `t`. Subjects from NATS clients that contain `%` or `/` are
//! decoded best-effort (an undecodable escape is kept literally).

/// Map a valid MQTT topic name (no wildcards) to a NATS subject.
pub fn topic_to_subject(topic: &str) -> String {
    let mut out = String::with_capacity(topic.len() + 4);
    for (i, level) in topic.split('/').enumerate() {
        if i > 0 {
            out.push('.');
        }
        encode_level(level, &mut out);
    }
    out
}

/// [`topic_to_subject`] of an owned topic name: one that needs no escape
/// and has no empty level (the common case) becomes its subject in place,
/// its `/` turned into `.`, without a new allocation.
pub fn topic_into_subject(mut topic: String) -> String {
    let b = topic.as_bytes();
    let mut prev = b'/';
    let mut plain = !b.is_empty();
    for &c in b {
        let escaped = matches!(c, b'.' | b'%' | b' ' | b'\t' | b'\r' | b'\n' | b'*' | b'>');
        if escaped || (c == b'/' && prev == b'/') {
            plain = false;
            break;
        }
        prev = c;
    }
    if !plain || prev == b'/' {
        return topic_to_subject(&topic);
    }
    let mut at = 0;
    while let Some(i) = topic.get(at..).and_then(|t| t.find('/')) {
        topic.replace_range(at + i..at + i + 1, ".");
        at += i + 1;
    }
    topic
}

fn encode_level(level: &str, out: &mut String) {
    match level {
        "" => out.push('/'),
        "*" => out.push_str("%2A"),
        ">" => out.push_str("%3E"),
        _ => {
            for c in level.chars() {
                match c {
                    '.' => out.push_str("//"),
                    '%' => out.push_str("%25"),
                    ' ' => out.push_str("%20"),
                    '\t' => out.push_str("%09"),
                    '\r' => out.push_str("%0D"),
                    '\n' => out.push_str("%0A"),
                    c => out.push(c),
                }
            }
        }
    }
}

/// Map a NATS subject back to an MQTT topic name.
pub fn subject_to_topic(subject: &str) -> String {
    let mut out = String::with_capacity(subject.len());
    subject_to_topic_into(subject, &mut out);
    out
}

/// [`subject_to_topic`] into `out` (cleared first), so a caller that maps
/// many subjects reuses one buffer.
pub fn subject_to_topic_into(subject: &str, out: &mut String) {
    out.clear();
    if !subject.bytes().any(|b| b == b'/' || b == b'%') {
        // No escapes and no empty levels: only the separators change.
        for (i, token) in subject.split('.').enumerate() {
            if i > 0 {
                out.push('/');
            }
            out.push_str(token);
        }
        return;
    }
    for (i, token) in subject.split('.').enumerate() {
        if i > 0 {
            out.push('/');
        }
        if token == "/" {
            continue; // empty level
        }
        let b = token.as_bytes();
        let mut j = 0;
        while j < b.len() {
            if b[j] == b'/' && b.get(j + 1) == Some(&b'/') {
                out.push('.');
                j += 2;
            } else if b[j] == b'%' && j + 2 < b.len() {
                match hex_byte(b[j + 1], b[j + 2]) {
                    Some(v @ (b'%' | b' ' | b'\t' | b'\r' | b'\n' | b'*' | b'>')) => {
                        out.push(v as char);
                        j += 3;
                    }
                    _ => {
                        out.push('%');
                        j += 1;
                    }
                }
            } else {
                // Copy one whole UTF-8 character starting at j.
                let rest = &token[j..];
                match rest.chars().next() {
                    Some(c) => {
                        out.push(c);
                        j += c.len_utf8();
                    }
                    None => break,
                }
            }
        }
    }
}

fn hex_byte(h: u8, l: u8) -> Option<u8> {
    let v = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'A'..=b'F' => Some(c - b'A' + 10),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    Some(v(h)? << 4 | v(l)?)
}

/// Map a valid MQTT topic filter to the NATS filters that together match
/// the same topics: `a/#` becomes `a` and `a.>` (MQTT's `#` also matches the
/// parent level); `#` alone becomes `>`.
pub fn filter_to_subjects(filter: &str) -> Vec<String> {
    let mut out = String::with_capacity(filter.len() + 4);
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        match *level {
            "+" => out.push('*'),
            "#" => out.push('>'),
            l => encode_level(l, &mut out),
        }
    }
    if levels.len() > 1 && levels.last() == Some(&"#") {
        let parent = out[..out.len() - 2].to_string();
        vec![parent, out]
    } else {
        vec![out]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_topics_match_nats_server() {
        assert_eq!(topic_to_subject("plant/line1/temp"), "plant.line1.temp");
        assert_eq!(topic_to_subject("/a"), "/.a");
        assert_eq!(topic_to_subject("a.b/c"), "a//b.c");
    }

    #[test]
    fn owned_topics_map_as_borrowed_ones() {
        for t in [
            "a",
            "a/b",
            "a/b/c",
            "sensors/room-1/temp",
            "a.b",
            "/a",
            "a/",
            "a//b",
            "/",
            "*",
            "a/*/b",
            "a/>",
            "a*b",
            "x y",
            "50%",
            "a/\u{e9}t\u{e9}/c",
            "\u{1F600}/x",
            "",
        ] {
            assert_eq!(
                topic_into_subject(t.to_string()),
                topic_to_subject(t),
                "{t:?}"
            );
        }
    }

    #[test]
    fn round_trip() {
        for t in [
            "a",
            "a/b",
            "/",
            "//",
            "a//b",
            "/a/",
            "a.b",
            "..",
            "with space/x",
            "100%",
            "%20",
            "*",
            ">",
            "a/*/>",
            "tab\there",
            "ünïcødé/✓",
            "a%2Ab",
            "x/%",
        ] {
            let s = topic_to_subject(t);
            assert!(crate::subject::valid_subject(&s), "{t:?} -> {s:?} invalid");
            assert_eq!(subject_to_topic(&s), t, "via {s:?}");
        }
    }

    #[test]
    fn filters() {
        assert_eq!(filter_to_subjects("a/+/c"), vec!["a.*.c"]);
        assert_eq!(filter_to_subjects("#"), vec![">"]);
        assert_eq!(filter_to_subjects("a/#"), vec!["a", "a.>"]);
        assert_eq!(filter_to_subjects("a/+/#"), vec!["a.*", "a.*.>"]);
    }
}
