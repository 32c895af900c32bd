//! The `frond` command line: `run`, `status`, `bench`, `check-config`,
//! `keygen`.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use frond::config::Config;

const HELP: &str = "\
frond — small-footprint edge broker: MQTT in, crash-safe local streams,
exactly-once mirror to a NATS JetStream hub.

USAGE:
    frond run [--config FILE]       run the broker (embedded defaults without --config)
    frond status [--config FILE | --http ADDR]
                                    show link state, backlog and stream state
    frond bench mqtt [OPTIONS]      MQTT publish, fan-out, latency, idle-RSS benchmarks
    frond bench nats [OPTIONS]      NATS publish, fan-out, request/reply against any server
    frond check-config FILE         validate a configuration file and exit
    frond keygen FILE               write a new random encryption key (64 hex digits,
                                    mode 0600) for encryption_key_file; never overwrites
    frond --version | --help

BENCH OPTIONS:
    --addr HOST:PORT   broker address (default 127.0.0.1:1883)
    --pubs N           concurrent publishers (default 4)
    --msgs N           messages per publisher (default 25000)
    --size BYTES       payload size (default 100)
    --qos 0|1|2        (default 1; 2: publish mode, persistent sessions)
    --inflight N       unacknowledged QoS 1/2 publishes per publisher (default 100)
    --topic T          topic prefix (default bench); publisher i uses T/i
    --mode M           publish (default), fanout, latency or idle
    --subs N           fanout: subscribers (default 4)
    --rate N           latency: messages per second (default 1000)
    --clients N        idle: connections to hold (default 1000)
    --rss-pid PID      idle: the broker's process id (its VmRSS is reported)

BENCH NATS OPTIONS:
    --addr HOST:PORT   server address (default 127.0.0.1:4222)
    --pubs N           concurrent publishers (default 4)
    --subs N           fan-out subscribers (default 4)
    --msgs N           messages per publisher, and fanned out (default 100000)
    --size BYTES       payload size (default 100)
    --reqs N           sequential requests (default 10000)
    --subscriptions N  also measure the server's RSS with N subscriptions
    --rss-pid PID      the server's process id (for --subscriptions)
    --js               instead: JetStream publishes (reply inbox, PubAck awaited) of
                       --msgs messages on bench.device.NNN, windowed; needs a stream
                       capturing bench.> (nats-server JetStream or frond)
    --window N         PubAcks awaited at once with --js (default 1000)
    --js-subjects N    distinct subjects with --js (default 100)
    --only PART        run only publish, fanout or request

ENVIRONMENT:
    FROND_LOG          log level (error, warn, info, debug, trace); overrides config
";

fn main() -> ExitCode {
    match real_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("frond: {e}");
            ExitCode::from(2)
        }
    }
}

fn real_main() -> Result<ExitCode, String> {
    use lexopt::prelude::*;
    let mut p = lexopt::Parser::from_env();
    let cmd = match p.next().map_err(|e| e.to_string())? {
        Some(Long("version")) | Some(Short('V')) => {
            println!("frond {}", env!("CARGO_PKG_VERSION"));
            return Ok(ExitCode::SUCCESS);
        }
        Some(Long("help")) | Some(Short('h')) | None => {
            print!("{HELP}");
            return Ok(ExitCode::SUCCESS);
        }
        Some(Value(v)) => v.string().map_err(|_| "command is not UTF-8".to_string())?,
        Some(other) => return Err(format!("{}; see frond --help", other.unexpected())),
    };
    match cmd.as_str() {
        "run" => run(&mut p),
        "check-config" => check_config(&mut p),
        "keygen" => keygen(&mut p),
        "status" => status(&mut p),
        "bench" => bench(&mut p),
        other => Err(format!("unknown command {other:?}; see frond --help")),
    }
}

/// `frond run [--config FILE]`.
fn run(p: &mut lexopt::Parser) -> Result<ExitCode, String> {
    use lexopt::prelude::*;
    let mut config: Option<PathBuf> = None;
    while let Some(arg) = p.next().map_err(|e| e.to_string())? {
        match arg {
            Long("config") | Short('c') => {
                config = Some(p.value().map_err(|e| e.to_string())?.into())
            }
            other => return Err(format!("run: {}", other.unexpected())),
        }
    }
    let cfg = load(config.as_deref())?;
    frond::run::run(cfg).map_err(|e| e.to_string())?;
    Ok(ExitCode::SUCCESS)
}

/// `frond check-config FILE`.
fn check_config(p: &mut lexopt::Parser) -> Result<ExitCode, String> {
    let path: PathBuf = p
        .value()
        .map_err(|_| "check-config: give the file to check".to_string())?
        .into();
    load(Some(&path))?;
    println!("{}: ok", path.display());
    Ok(ExitCode::SUCCESS)
}

/// `frond keygen FILE`.
fn keygen(p: &mut lexopt::Parser) -> Result<ExitCode, String> {
    let path: PathBuf = p
        .value()
        .map_err(|_| "keygen: give the key file to create".to_string())?
        .into();
    frond::store::crypt::generate_key_file(&path)?;
    println!(
        "{}: new key written (keep a copy: without it the encrypted streams cannot be read)",
        path.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// `frond status [--config FILE | --http ADDR]`.
fn status(p: &mut lexopt::Parser) -> Result<ExitCode, String> {
    use lexopt::prelude::*;
    let mut config: Option<PathBuf> = None;
    let mut http: Option<String> = None;
    while let Some(arg) = p.next().map_err(|e| e.to_string())? {
        match arg {
            Long("config") | Short('c') => {
                config = Some(p.value().map_err(|e| e.to_string())?.into())
            }
            Long("http") => http = Some(string(p.value())?),
            other => return Err(format!("status: {}", other.unexpected())),
        }
    }
    let addr = match http {
        Some(a) => a,
        None => load(config.as_deref())?
            .http
            .listen
            .ok_or("the configuration disables [http]; nothing to ask")?,
    };
    let body = frond::server::http::get(&addr, "/varz")?;
    print!("{}", frond::run::format_status(&body));
    Ok(ExitCode::SUCCESS)
}

/// `frond bench mqtt|nats [OPTIONS]`.
fn bench(p: &mut lexopt::Parser) -> Result<ExitCode, String> {
    let what = string(p.value())
        .map_err(|_| "bench: say what to benchmark: frond bench mqtt|nats".to_string())?;
    let report = match what.as_str() {
        "nats" => bench_nats(p)?,
        "mqtt" => bench_mqtt(p)?,
        _ => {
            return Err(format!(
                "bench: unknown benchmark {what:?}; try: frond bench mqtt or frond bench nats"
            ))
        }
    };
    println!("{report}");
    Ok(ExitCode::SUCCESS)
}

fn bench_nats(p: &mut lexopt::Parser) -> Result<String, String> {
    use lexopt::prelude::*;
    let mut b = frond::bench::NatsBench::default();
    while let Some(arg) = p.next().map_err(|e| e.to_string())? {
        match arg {
            Long("addr") => b.addr = string(p.value())?,
            Long("pubs") => b.pubs = num(p.value())?,
            Long("subs") => b.subs = num(p.value())?,
            Long("msgs") => b.msgs = num(p.value())?,
            Long("size") => b.size = num(p.value())?,
            Long("reqs") => b.reqs = num(p.value())?,
            Long("subscriptions") => b.subscriptions = num(p.value())?,
            Long("rss-pid") => b.rss_pid = Some(num(p.value())?),
            Long("js") => b.js = true,
            Long("window") => b.window = num(p.value())?,
            Long("js-subjects") => b.js_subjects = num(p.value())?,
            Long("only") => b.only = Some(string(p.value())?),
            other => return Err(format!("bench: {}", other.unexpected())),
        }
    }
    b.run()
}

fn bench_mqtt(p: &mut lexopt::Parser) -> Result<String, String> {
    use lexopt::prelude::*;
    let mut b = frond::bench::MqttBench::default();
    while let Some(arg) = p.next().map_err(|e| e.to_string())? {
        match arg {
            Long("addr") => b.addr = string(p.value())?,
            Long("pubs") => b.pubs = num(p.value())?,
            Long("msgs") => b.msgs = num(p.value())?,
            Long("size") => b.size = num(p.value())?,
            Long("qos") => b.qos = num(p.value())?,
            Long("inflight") => b.inflight = num(p.value())?,
            Long("topic") => b.topic = string(p.value())?,
            Long("mode") => b.mode = string(p.value())?.parse()?,
            Long("subs") => b.subs = num(p.value())?,
            Long("rate") => b.rate = num(p.value())?,
            Long("clients") => b.clients = num(p.value())?,
            Long("rss-pid") => b.rss_pid = Some(num(p.value())?),
            other => return Err(format!("bench: {}", other.unexpected())),
        }
    }
    b.run()
}

fn string(v: Result<std::ffi::OsString, lexopt::Error>) -> Result<String, String> {
    v.map_err(|e| e.to_string())?
        .into_string()
        .map_err(|_| "argument is not UTF-8".to_string())
}

fn num<T: std::str::FromStr>(v: Result<std::ffi::OsString, lexopt::Error>) -> Result<T, String> {
    let s = string(v)?;
    s.parse()
        .map_err(|_| format!("{s:?} is not a valid number"))
}

fn load(path: Option<&std::path::Path>) -> Result<Config, String> {
    match path {
        Some(p) => Config::load(p).map_err(|e| e.to_string()),
        None => Config::parse("").map_err(|e| e.to_string()),
    }
}
