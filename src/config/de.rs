//! The serde deserializer that reads `frond.toml` into the `Raw*` shapes.
//!
//! Owns: walking a parsed `toml_edit` document (spans kept) with serde, and
//! wording the errors: every error names the line and column (the key for an
//! unknown key, the value for a bad value, the table for a missing key) and
//! the key path (`auth.users[0]`, `stream[1].max_bytes`).
//!
//! Why not `toml::from_str`: its deserializer is several types (table,
//! value, array, datetime), and serde's derived code for every config struct
//! was compiled once per type (~130 KiB of the release binary). Here one
//! deserializer ([`Node`]), one map access and one sequence access serve
//! every struct.
//!
//! Invariants: a visitor gets only the kind of node it asked for (a struct
//! a table, a `u64` an integer, ...) and anything else is a type error
//! naming both; integers reach visitors as `i64`, floats as `f64`; a string
//! is also an enum's unit variant; a date-time is refused (no key takes
//! one); values are never borrowed from the text (the shapes are
//! `DeserializeOwned`). The innermost span wins: a node only fills in a span
//! its children did not set.

use std::fmt;
use std::ops::Range;

use serde::de::{self, DeserializeOwned, DeserializeSeed, IntoDeserializer, Unexpected, Visitor};
use toml_edit::{ImDocument, Item, Table, Value};

/// Parse `text` and deserialize it into `T`; the error is worded for the
/// operator (position, the line itself, what is wrong, the key path).
pub(super) fn from_str<T: DeserializeOwned>(text: &str) -> Result<T, String> {
    let doc = ImDocument::parse(text).map_err(|e| e.to_string())?;
    T::deserialize(Node::Table(doc.as_table())).map_err(|e| e.render(text))
}

/// A deserialization error: the message, where, and under which keys.
#[derive(Debug)]
pub(super) struct Error {
    msg: String,
    span: Option<Range<usize>>,
    /// Key path segments, innermost first (`.key` or `[i]`).
    path: Vec<String>,
}

impl de::Error for Error {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Error {
            msg: msg.to_string(),
            span: None,
            path: Vec::new(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.msg)
    }
}

impl std::error::Error for Error {}

impl Error {
    fn at(mut self, span: Option<Range<usize>>) -> Self {
        if self.span.is_none() {
            self.span = span;
        }
        self
    }

    fn under(mut self, segment: String) -> Self {
        self.path.push(segment);
        self
    }

    /// `TOML parse error at line L, column C`, the line with the span
    /// marked, the message and `in `path``, as the parser's own errors read.
    fn render(&self, text: &str) -> String {
        let mut path = String::new();
        for s in self.path.iter().rev() {
            if path.is_empty() {
                path.push_str(s.trim_start_matches('.'));
            } else {
                path.push_str(s);
            }
        }
        let in_path = if path.is_empty() {
            String::new()
        } else {
            format!("in `{path}`\n")
        };
        let start = self.span.as_ref().map(|s| s.start);
        let Some(before) = start.and_then(|s| text.get(..s)) else {
            return format!("{}\n{in_path}", self.msg);
        };
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let line_no = before.matches('\n').count() + 1;
        let col = before[line_start..].chars().count() + 1;
        let line = text[line_start..].split('\n').next().unwrap_or("");
        let line = line.trim_end_matches('\r');
        let end = self.span.as_ref().map_or(before.len(), |s| s.end);
        let width = text
            .get(before.len()..end.min(line_start + line.len()).max(before.len()))
            .map_or(1, |s| s.chars().count().max(1));
        let gutter = " ".repeat(line_no.to_string().len());
        format!(
            "TOML parse error at line {line_no}, column {col}\n{gutter} |\n{line_no} | {line}\n{gutter} | {}{}\n{}\n{in_path}",
            " ".repeat(col - 1),
            "^".repeat(width),
            self.msg
        )
    }
}

/// One node of the document. Arrays of tables and inline arrays are both
/// sequences; tables and inline tables are both maps.
#[derive(Clone, Copy)]
enum Node<'a> {
    Table(&'a Table),
    Inline(&'a toml_edit::InlineTable),
    Array(&'a toml_edit::Array),
    Tables(&'a toml_edit::ArrayOfTables),
    Scalar(&'a Value),
    Empty,
}

impl<'a> Node<'a> {
    fn of_item(item: &'a Item) -> Node<'a> {
        match item {
            Item::None => Node::Empty,
            Item::Value(v) => Node::of_value(v),
            Item::Table(t) => Node::Table(t),
            Item::ArrayOfTables(a) => Node::Tables(a),
        }
    }

    fn of_value(value: &'a Value) -> Node<'a> {
        match value {
            Value::Array(a) => Node::Array(a),
            Value::InlineTable(t) => Node::Inline(t),
            v => Node::Scalar(v),
        }
    }

    fn span(self) -> Option<Range<usize>> {
        match self {
            Node::Table(t) => t.span(),
            Node::Inline(t) => t.span(),
            Node::Array(a) => a.span(),
            Node::Tables(a) => a.span(),
            Node::Scalar(v) => v.span(),
            Node::Empty => None,
        }
    }

    fn map(self) -> Map<'a> {
        let entries: Vec<Entry<'a>> = match self {
            Node::Table(t) => t
                .iter()
                .map(|(k, item)| (k, t.key(k).and_then(|k| k.span()), Node::of_item(item)))
                .collect(),
            Node::Inline(t) => t
                .iter()
                .map(|(k, v)| (k, t.key(k).and_then(|k| k.span()), Node::of_value(v)))
                .collect(),
            _ => Vec::new(),
        };
        Map {
            entries: entries.into_iter(),
            value: None,
        }
    }

    fn seq(self) -> Seq<'a> {
        let items: Vec<Node<'a>> = match self {
            Node::Array(a) => a.iter().map(Node::of_value).collect(),
            Node::Tables(a) => a.iter().map(Node::Table).collect(),
            _ => Vec::new(),
        };
        Seq {
            items: items.into_iter(),
            index: 0,
        }
    }
}

/// A deserialize method that reads one kind of node: `$node` patterns are
/// handed to the visitor by `$visit`, anything else is a type error. Each
/// visitor is then compiled only with the `visit_*` it can accept (not all
/// of them through `deserialize_any`).
macro_rules! only {
    ([$($method:ident)*] $arms:tt) => {
        $( only!(@one $method $arms); )*
    };
    (@one $method:ident { $v:ident, $n:ident, $($node:pat => $visit:expr,)* }) => {
        fn $method<V: Visitor<'de>>(self, $v: V) -> Result<V::Value, Error> {
            let $n = self;
            match $n {
                $($node => $visit.map_err(|e: Error| e.at($n.span())),)*
                _ => Err($n.wrong(&$v)),
            }
        }
    };
}

impl Node<'_> {
    /// The type error for a visitor that cannot take this node.
    fn wrong(self, expected: &dyn de::Expected) -> Error {
        let unexpected = match self {
            Node::Table(_) | Node::Inline(_) => Unexpected::Map,
            Node::Array(_) | Node::Tables(_) => Unexpected::Seq,
            Node::Scalar(Value::String(s)) => Unexpected::Str(s.value()),
            Node::Scalar(Value::Integer(i)) => Unexpected::Signed(*i.value()),
            Node::Scalar(Value::Float(f)) => Unexpected::Float(*f.value()),
            Node::Scalar(Value::Boolean(b)) => Unexpected::Bool(*b.value()),
            Node::Scalar(Value::Datetime(_)) => Unexpected::Other("date-time"),
            Node::Scalar(Value::Array(_)) => Unexpected::Seq,
            Node::Scalar(Value::InlineTable(_)) => Unexpected::Map,
            Node::Empty => Unexpected::Unit,
        };
        <Error as de::Error>::invalid_type(unexpected, expected).at(self.span())
    }
}

impl<'de> de::Deserializer<'de> for Node<'_> {
    type Error = Error;

    /// For shapes that take anything (untagged enums).
    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let r = match self {
            Node::Table(_) | Node::Inline(_) => visitor.visit_map(self.map()),
            Node::Array(_) | Node::Tables(_) => visitor.visit_seq(self.seq()),
            Node::Scalar(Value::String(s)) => visitor.visit_str(s.value()),
            Node::Scalar(Value::Integer(i)) => visitor.visit_i64(*i.value()),
            Node::Scalar(Value::Float(f)) => visitor.visit_f64(*f.value()),
            Node::Scalar(Value::Boolean(b)) => visitor.visit_bool(*b.value()),
            // of_value never makes these two; read them as what they are.
            Node::Scalar(Value::Array(a)) => visitor.visit_seq(Node::Array(a).seq()),
            Node::Scalar(Value::InlineTable(t)) => visitor.visit_map(Node::Inline(t).map()),
            Node::Scalar(Value::Datetime(_)) | Node::Empty => return Err(self.wrong(&visitor)),
        };
        r.map_err(|e| e.at(self.span()))
    }

    only!([deserialize_bool] { v, n,
        Node::Scalar(Value::Boolean(b)) => v.visit_bool(*b.value()),
    });

    only!([deserialize_i8 deserialize_i16 deserialize_i32 deserialize_i64 deserialize_i128 deserialize_u8 deserialize_u16 deserialize_u32 deserialize_u64 deserialize_u128] { v, n,
        Node::Scalar(Value::Integer(i)) => v.visit_i64(*i.value()),
    });

    only!([deserialize_f32 deserialize_f64] { v, n,
        Node::Scalar(Value::Float(f)) => v.visit_f64(*f.value()),
        Node::Scalar(Value::Integer(i)) => v.visit_i64(*i.value()),
    });

    only!([deserialize_char deserialize_str deserialize_string deserialize_identifier] { v, n,
        Node::Scalar(Value::String(s)) => v.visit_str(s.value()),
    });

    only!([deserialize_seq] { v, n,
        Node::Array(_) | Node::Tables(_) => v.visit_seq(n.seq()),
    });

    only!([deserialize_map] { v, n,
        Node::Table(_) | Node::Inline(_) => v.visit_map(n.map()),
    });

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.deserialize_map(visitor)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_some(self)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        match self {
            Node::Scalar(Value::String(s)) => visitor
                .visit_enum(s.value().as_str().into_deserializer())
                .map_err(|e: Error| e.at(self.span())),
            _ => Err(self.wrong(&visitor)),
        }
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_unit()
    }

    serde::forward_to_deserialize_any! {
        bytes byte_buf unit unit_struct tuple tuple_struct
    }
}

/// A key, its span, its value.
type Entry<'a> = (&'a str, Option<Range<usize>>, Node<'a>);

struct Map<'a> {
    entries: std::vec::IntoIter<Entry<'a>>,
    /// The value of the key just read, and the key.
    value: Option<(&'a str, Node<'a>)>,
}

impl<'de> de::MapAccess<'de> for Map<'_> {
    type Error = Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Error> {
        let Some((key, span, node)) = self.entries.next() else {
            return Ok(None);
        };
        self.value = Some((key, node));
        let key_de: de::value::StrDeserializer<'_, Error> = key.into_deserializer();
        seed.deserialize(key_de).map(Some).map_err(|e| e.at(span))
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
        let Some((key, node)) = self.value.take() else {
            return Err(de::Error::custom("a value without a key"));
        };
        seed.deserialize(node)
            .map_err(|e| e.at(node.span()).under(format!(".{key}")))
    }
}

struct Seq<'a> {
    items: std::vec::IntoIter<Node<'a>>,
    index: usize,
}

impl<'de> de::SeqAccess<'de> for Seq<'_> {
    type Error = Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Error> {
        let Some(node) = self.items.next() else {
            return Ok(None);
        };
        let i = self.index;
        self.index += 1;
        seed.deserialize(node)
            .map(Some)
            .map_err(|e| e.at(node.span()).under(format!("[{i}]")))
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.items.len())
    }
}

#[cfg(test)]
mod tests {
    use super::super::Config;

    #[test]
    fn errors_name_line_column_and_key_path() {
        let e = Config::parse("[mqtt]\nmax_packet_size = \"1 parsec\"\n")
            .unwrap_err()
            .0;
        assert!(e.contains("line 2, column 19"), "{e}");
        assert!(e.contains("in `mqtt.max_packet_size`"), "{e}");
        assert!(e.contains("parsec"), "{e}");
        let e = Config::parse("[[stream]]\nname = \"A\"\nsubjects = [\"a\", 7]\n")
            .unwrap_err()
            .0;
        assert!(e.contains("line 3, column 18"), "{e}");
        assert!(e.contains("in `stream[0].subjects[1]`"), "{e}");
        // A missing key: the table that lacks it.
        let e = Config::parse("x = 1\n[[stream]]\nsubjects = [\"a\"]\n")
            .unwrap_err()
            .0;
        assert!(e.contains("unknown field `x`"), "{e}");
        assert!(e.contains("line 1, column 1"), "{e}");
        let e = Config::parse("[[stream]]\nsubjects = [\"a\"]\n")
            .unwrap_err()
            .0;
        assert!(e.contains("missing field `name`"), "{e}");
        assert!(e.contains("in `stream[0]`"), "{e}");
        // Syntax errors come from the parser, with their position.
        let e = Config::parse("[mqtt\n").unwrap_err().0;
        assert!(e.contains("line 1"), "{e}");
    }

    #[test]
    fn scalars_options_and_enums() {
        let c = Config::parse(
            "threads = 3\n[[stream]]\nname = \"A\"\nsubjects = [\"a\"]\ndiscard = \"new\"\nmax_age = 90\n",
        )
        .unwrap();
        assert_eq!(c.threads, 3);
        assert_eq!(c.streams[0].discard, crate::stream::Discard::New);
        assert_eq!(c.streams[0].max_age, std::time::Duration::from_secs(90));
        let e =
            Config::parse("[[stream]]\nname = \"A\"\nsubjects = [\"a\"]\ndiscard = \"maybe\"\n")
                .unwrap_err()
                .0;
        assert!(e.contains("maybe") && e.contains("line 4"), "{e}");
        let e = Config::parse("threads = -1\n").unwrap_err().0;
        assert!(e.contains("line 1") && e.contains("in `threads`"), "{e}");
        // Inline tables are tables.
        let c = Config::parse("mqtt = { max_subscriptions = 7 }\n").unwrap();
        assert_eq!(c.mqtt.max_subscriptions, 7);
    }
}
