//! The shape rules of DESIGN.md, checked on the sources (not a runtime
//! test): which module may import which, which modules may touch a clock,
//! the network, the file system or the async runtime, and how long a file
//! or a function may grow.
//!
//! Code after the first top-level `#[cfg(test)]` of a file, files named
//! `*tests.rs` and files in a `tests/` directory under `src/` are test code
//! and exempt.
//!
//! [`DEBT`] lists what broke a rule before the rule was checked (issue 11,
//! the restructure). It may only shrink: a new violation fails, and so does
//! a listed one that no longer exists (delete its line).

use std::path::{Path, PathBuf};

/// A module directory and what its non-test code may use.
struct Rule {
    dir: &'static str,
    /// `crate::<m>` paths allowed besides the module itself.
    may_import: &'static [&'static str],
    /// Substrings that must not appear (clock, I/O, runtime).
    forbidden: &'static [&'static str],
}

const CLOCK: &[&str] = &["Instant::now", "SystemTime::now"];
const IO: &[&str] = &[
    "std::fs",
    "std::net",
    "std::thread",
    "smol",
    "async_io",
    "async_net",
    "Instant::now",
    "SystemTime::now",
];

/// What the sans-IO parts of the JetStream API may use.
const JSAPI: &[&str] = &["auth", "router", "stream", "subject", "wire"];
const JSAPI_IO: &[&str] = &["std::fs", "Instant::now", "SystemTime::now", "unix_nanos"];

const RULES: &[Rule] = &[
    Rule {
        dir: "src/wire",
        may_import: &[],
        forbidden: IO,
    },
    Rule {
        dir: "src/subject",
        may_import: &[],
        forbidden: IO,
    },
    Rule {
        dir: "src/store",
        may_import: &["subject"],
        forbidden: CLOCK,
    },
    // stream/ imports only store/ and subject/.
    Rule {
        dir: "src/stream/mod.rs",
        may_import: &["store", "subject"],
        forbidden: &[],
    },
    Rule {
        dir: "src/stream/handle.rs",
        may_import: &["store", "subject"],
        forbidden: &[],
    },
    Rule {
        dir: "src/stream/owner.rs",
        may_import: &["store", "subject"],
        forbidden: &[],
    },
    Rule {
        dir: "src/stream/oneshot.rs",
        may_import: &["store", "subject"],
        forbidden: &[],
    },
    Rule {
        dir: "src/stream/headers.rs",
        may_import: &["store", "subject"],
        forbidden: &[],
    },
    // The one validator for names that become file names.
    Rule {
        dir: "src/stream/names.rs",
        may_import: &[],
        forbidden: IO,
    },
    // consumer.rs: permissions come in as deny lists and a `Receiver` (the
    // API shell's types).
    Rule {
        dir: "src/stream/consumer.rs",
        may_import: &["store", "subject"],
        forbidden: CLOCK,
    },
    // A consumer's backlog (last_per_subject, num_pending): sans-IO.
    Rule {
        dir: "src/stream/backlog.rs",
        may_import: &["store", "subject"],
        forbidden: CLOCK,
    },
    // The sans-IO Stream: the owner thread (owner.rs) reads the clock and
    // passes `now` in.
    Rule {
        dir: "src/stream/rules.rs",
        may_import: &["store", "subject"],
        forbidden: IO,
    },
    Rule {
        dir: "src/stream/limits.rs",
        may_import: &["store", "subject"],
        forbidden: IO,
    },
    Rule {
        dir: "src/stream/dedup.rs",
        may_import: &["store", "subject"],
        forbidden: IO,
    },
    // The hub connection machine: no clock, no sockets, seeded randomness.
    Rule {
        dir: "src/uplink/link.rs",
        may_import: &["uplink", "config", "nkey", "wire"],
        forbidden: IO,
    },
    // state/: durable records on the store's backend. It imports the
    // backend, the consumer state it persists (stream) and the file-name
    // check (names); callers pass the time (a `now` or a `Clock`).
    Rule {
        dir: "src/state",
        may_import: &["store", "subject", "stream"],
        forbidden: CLOCK,
    },
    // The one publish path: sans-IO, takes `now`.
    Rule {
        dir: "src/ingest",
        may_import: &["router", "broker", "mqtt", "stream", "auth", "wire"],
        forbidden: IO,
    },
    // The NATS connection machine.
    Rule {
        dir: "src/nats",
        may_import: &["router", "auth", "subject", "wire"],
        forbidden: IO,
    },
    // The router: callers pass `now` (the routing time of MQTT deliveries).
    Rule {
        dir: "src/router",
        may_import: &["auth", "broker", "stream", "subject"],
        forbidden: CLOCK,
    },
    // The sans-IO MQTT machine: the router's Delivery and the stored
    // session types come from broker/, permissions from auth/.
    Rule {
        dir: "src/mqtt",
        may_import: &["auth", "broker", "close", "router", "subject", "wire"],
        forbidden: IO,
    },
    Rule {
        dir: "src/close.rs",
        may_import: &[],
        forbidden: IO,
    },
    // The JetStream API service: sans-IO but for its edges (task.rs holds
    // the loop and the clock, files.rs the consumer files).
    Rule {
        dir: "src/server/jsapi/mod.rs",
        may_import: JSAPI,
        forbidden: JSAPI_IO,
    },
    Rule {
        dir: "src/server/jsapi/call.rs",
        may_import: JSAPI,
        forbidden: JSAPI_IO,
    },
    Rule {
        dir: "src/server/jsapi/render.rs",
        may_import: JSAPI,
        forbidden: JSAPI_IO,
    },
    Rule {
        dir: "src/server/jsapi/streams.rs",
        may_import: JSAPI,
        forbidden: JSAPI_IO,
    },
    Rule {
        dir: "src/server/jsapi/messages.rs",
        may_import: JSAPI,
        forbidden: JSAPI_IO,
    },
    Rule {
        dir: "src/server/jsapi/consumers.rs",
        may_import: JSAPI,
        forbidden: JSAPI_IO,
    },
    Rule {
        dir: "src/server/jsapi/pull.rs",
        may_import: JSAPI,
        forbidden: JSAPI_IO,
    },
    Rule {
        dir: "src/server/jsapi/backlog.rs",
        may_import: JSAPI,
        forbidden: JSAPI_IO,
    },
    Rule {
        dir: "src/server/jsapi/retention.rs",
        may_import: JSAPI,
        forbidden: JSAPI_IO,
    },
    // The WebSocket codec of a ws:// hub link: sans-IO.
    Rule {
        dir: "src/uplink/ws.rs",
        may_import: &["wire"],
        forbidden: IO,
    },
    // The live bridge machine: no clock, no sockets, injected randomness.
    Rule {
        dir: "src/uplink/bridge.rs",
        may_import: &["uplink", "wire", "subject"],
        forbidden: IO,
    },
    Rule {
        dir: "src/uplink/mirror.rs",
        may_import: &["uplink", "stream", "wire", "subject"],
        forbidden: CLOCK,
    },
    // The rate cap and priority rule: sans-IO, `now` passed in.
    Rule {
        dir: "src/uplink/rate.rs",
        may_import: &["uplink"],
        forbidden: IO,
    },
    // The source-down machine: no clock, no I/O.
    Rule {
        dir: "src/uplink/source.rs",
        may_import: &["uplink", "stream", "wire", "subject", "config"],
        forbidden: IO,
    },
];

const MAX_FILE_LINES: usize = 1200;
const MAX_FN_LINES: usize = 120;

/// Known violations, to be removed by the restructure (issue 11).
const DEBT: &[&str] = &[];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    if dir.is_file() {
        out.push(dir.to_path_buf());
        return;
    }
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The file's non-test lines, or nothing for a test file.
fn code_lines(path: &Path) -> Vec<String> {
    let name = path.file_name().unwrap().to_string_lossy();
    let in_tests_dir = path
        .strip_prefix(root())
        .ok()
        .and_then(Path::parent)
        .is_some_and(|d| d.components().any(|c| c.as_os_str() == "tests"));
    if name.ends_with("tests.rs") || in_tests_dir {
        return Vec::new();
    }
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .take_while(|l| !l.starts_with("#[cfg(test)]"))
        .map(str::to_string)
        .collect()
}

fn rel(path: &Path) -> String {
    path.strip_prefix(root())
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

/// `(name, lines)` of each function: from its `fn` line to the closing
/// brace at the same indentation (rustfmt's layout).
fn functions(lines: &[String]) -> Vec<(String, usize)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let l = &lines[i];
        let t = l.trim_start();
        let indent = &l[..l.len() - t.len()];
        let t = t
            .trim_start_matches("pub(crate) ")
            .trim_start_matches("pub(super) ")
            .trim_start_matches("pub ")
            .trim_start_matches("const ")
            .trim_start_matches("async ")
            .trim_start_matches("unsafe ");
        if let Some(rest) = t.strip_prefix("fn ") {
            if !l.trim_end().ends_with(';') {
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                let close = format!("{indent}}}");
                let end = (i + 1..lines.len())
                    .find(|&j| lines[j] == close)
                    .unwrap_or(lines.len() - 1);
                out.push((name, end - i + 1));
                i = end;
            }
        }
        i += 1;
    }
    out
}

#[test]
fn imports_clock_and_io_follow_the_module_rules() {
    let mut bad = Vec::new();
    for rule in RULES {
        let mut files = Vec::new();
        rust_files(&root().join(rule.dir), &mut files);
        let own = rule
            .dir
            .trim_start_matches("src/")
            .split('/')
            .next()
            .unwrap()
            .trim_end_matches(".rs");
        for f in files {
            for (n, line) in code_lines(&f).iter().enumerate() {
                let code = line.split("//").next().unwrap_or("");
                for (at, _) in code.match_indices("crate::") {
                    let m: String = code[at + 7..]
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    if m != own && !rule.may_import.contains(&m.as_str()) {
                        bad.push(format!("{}:{}: imports crate::{m}", rel(&f), n + 1));
                    }
                }
                for x in rule.forbidden {
                    if code.contains(x) {
                        bad.push(format!("{}:{}: uses {x}", rel(&f), n + 1));
                    }
                }
            }
        }
    }
    assert!(bad.is_empty(), "module rules broken:\n{}", bad.join("\n"));
}

#[test]
fn files_and_functions_stay_small() {
    let mut files = Vec::new();
    rust_files(&root().join("src"), &mut files);
    let mut found = Vec::new();
    for f in files {
        let lines = code_lines(&f);
        if lines.len() > MAX_FILE_LINES {
            found.push((format!("file {}", rel(&f)), lines.len()));
        }
        for (name, n) in functions(&lines) {
            if n > MAX_FN_LINES {
                found.push((format!("fn {} {name}", rel(&f)), n));
            }
        }
    }
    let new: Vec<String> = found
        .iter()
        .filter(|(k, _)| !DEBT.contains(&k.as_str()))
        .map(|(k, n)| format!("{k}: {n} lines"))
        .collect();
    assert!(
        new.is_empty(),
        "over {MAX_FILE_LINES} lines per file / {MAX_FN_LINES} per function (outside tests):\n{}",
        new.join("\n")
    );
    let paid: Vec<&&str> = DEBT
        .iter()
        .filter(|d| !found.iter().any(|(k, _)| k == *d))
        .collect();
    assert!(
        paid.is_empty(),
        "no longer too long — delete from DEBT: {paid:?}"
    );
}
