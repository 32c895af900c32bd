//! `[mappings]`: subject rewrites (`"source" = "dest"` or weighted destinations), validated into [`Mappings`].

use serde::Deserialize;

use super::values::IntOrStr;
use super::{err, ConfigError};
use crate::subject::mapping::{parse_weight, Mapping, Mappings};

/// `"source" = "dest"` or `"source" = [{destination, weight}, …]`.
#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum RawMappingDest {
    One(String),
    Weighted(Vec<RawWeighted>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWeighted {
    destination: String,
    /// `"10%"`, `"10"` or `10`; default 100%.
    weight: Option<IntOrStr>,
}

pub(super) fn validate_mappings(
    raw: std::collections::BTreeMap<String, RawMappingDest>,
) -> Result<Mappings, ConfigError> {
    let mut list = Vec::new();
    for (source, dest) in raw {
        let dests = match dest {
            RawMappingDest::One(d) => vec![(d, 100)],
            RawMappingDest::Weighted(ws) => {
                let mut v = Vec::new();
                for w in ws {
                    let weight = match w.weight {
                        None => Ok(100),
                        Some(IntOrStr::Int(i)) => u8::try_from(i)
                            .ok()
                            .filter(|i| *i <= 100)
                            .ok_or_else(|| format!("weight {i} must be from 0 to 100 (percent)")),
                        Some(IntOrStr::Str(s)) => parse_weight(&s).map_err(|e| e.0),
                    };
                    match weight {
                        Ok(weight) => v.push((w.destination, weight)),
                        Err(e) => return err(format!("mappings.{source:?}: {e}")),
                    }
                }
                v
            }
        };
        match Mapping::new(&source, &dests) {
            Ok(m) => list.push(m),
            Err(e) => return err(format!("mappings.{source:?}: {e}")),
        }
    }
    Mappings::new(list).map_err(|e| ConfigError(format!("mappings: {e}")))
}

#[cfg(test)]
mod tests {
    use crate::config::*;

    #[test]
    fn mappings() {
        let c = Config::parse(
            r#"
[mappings]
"orders.*" = "orders.{{partition(3,1)}}.{{wildcard(1)}}"
"svc" = [{destination = "svc.v1", weight = "90%"}, {destination = "svc.v2", weight = 10}]
"#,
        )
        .unwrap();
        assert_eq!(
            c.mappings.apply("orders.7", || 0).as_deref(),
            Some("orders.0.7") // fnv1a32("7") % 3
        );
        assert_eq!(c.mappings.apply("svc", || 95).as_deref(), Some("svc.v2"));
        assert!(Config::parse("").unwrap().mappings.is_empty());
        let e = Config::parse("[mappings]\n\"a.*\" = \"b.{{wildcard(2)}}\"\n").unwrap_err();
        assert!(
            e.0.contains("mappings.\"a.*\"") && e.0.contains("wildcard 2"),
            "{e}"
        );
        let e = Config::parse(
            "[mappings]\n\"s\" = [{destination = \"a\", weight = \"60%\"}, {destination = \"b\", weight = \"50%\"}]\n",
        )
        .unwrap_err();
        assert!(e.0.contains("more than 100%"), "{e}");
        let e = Config::parse("[mappings]\n\"s\" = [{destination = \"a\", weight = \"x\"}]\n")
            .unwrap_err();
        assert!(
            e.0.contains("mappings.\"s\"") && e.0.contains("percentage"),
            "{e}"
        );
    }
}
