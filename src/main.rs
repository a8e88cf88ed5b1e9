// mimalloc: +75% throughput over glibc malloc for the gateway in benches/load.rs at about the same
// idle memory per connection (see BENCHMARKS.md).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// Causeway: API gateway and policy proxy for cloud ERPs.
#[derive(Parser)]
#[command(name = "causeway", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway from a configuration directory (causeway.yaml, routes/, policies/).
    Serve {
        /// Configuration directory.
        #[arg(long, short = 'c', default_value = ".")]
        config: PathBuf,
        /// Graceful upgrade: take over the listeners of the running instance, which is then
        /// sent SIGQUIT (see README).
        #[arg(long, short = 'u')]
        upgrade: bool,
    },
    /// Validate every file of a configuration directory; prints `file:line:column: message`
    /// for each problem and exits non-zero if there is any.
    Check {
        #[arg(long, short = 'c', default_value = ".")]
        config: PathBuf,
        /// For a pipeline without the production environment: no DNS lookups, and unset
        /// environment variables (and missing certificate files) are warnings.
        #[arg(long)]
        offline: bool,
        /// Print the effective configuration (environment expanded, defaults filled in,
        /// secrets masked) after checking it.
        #[arg(long)]
        print: bool,
    },
    /// List what changes from one configuration directory to another (routes, policies,
    /// upstreams with their budgets, settings), for review before a change is promoted. Exits 0
    /// when nothing changed, 1 when something did, 2 when a directory cannot be read.
    Diff {
        /// The configuration in force.
        old: PathBuf,
        /// The configuration to promote.
        new: PathBuf,
    },
    /// Ask a running gateway's admin listener whether it is ready (`/readyz`); exits 0 when it
    /// is. For container health checks, which have no curl.
    Health {
        /// The admin listener, e.g. 127.0.0.1:9090.
        #[arg(long, default_value = "127.0.0.1:9090", env = "CAUSEWAY_ADMIN_ADDRESS")]
        admin: String,
        /// `/healthz` (the process answers) instead of `/readyz`.
        #[arg(long)]
        live: bool,
    },
    /// Bring the order store's schema (SQLite or PostgreSQL, as configured) up to date, then
    /// exit; `serve` does the same at start. Safe to run while replicas run.
    Migrate {
        #[arg(long, short = 'c', default_value = ".")]
        config: PathBuf,
    },
    /// Run only the built-in ERP sandbox (Business Central API v2.0 subset).
    #[cfg(feature = "sandbox")]
    Sandbox {
        #[arg(long, default_value = "127.0.0.1:8085")]
        listen: String,
        /// Require `Authorization: Bearer <token>`.
        #[arg(long, env = "CAUSEWAY_SANDBOX_TOKEN")]
        token: Option<String>,
        /// Requests admitted per sliding window.
        #[arg(long, default_value_t = 6000)]
        window_requests: u32,
        #[arg(long, default_value_t = 300)]
        window_seconds: u64,
        /// Requests processed at once.
        #[arg(long, default_value_t = 5)]
        max_concurrent: u32,
        /// Requests that may wait for a processing slot.
        #[arg(long, default_value_t = 95)]
        queue: u32,
        /// Latency added to every API request.
        #[arg(long, default_value_t = 0)]
        latency_ms: u64,
    },
}

fn check(config: &std::path::Path, offline: bool, print: bool) -> ExitCode {
    let env = |name: &str| std::env::var(name).ok();
    let (errors, warnings, summary) = if offline {
        let checked = causeway::config::check_offline(config, &env);
        (checked.errors, checked.warnings, checked.summary)
    } else {
        match causeway::config::load(config) {
            Ok(c) => {
                (Default::default(), c.warnings.clone(), Some((c.router.routes().len(), c.upstreams.len())))
            }
            Err(diags) => (diags, Vec::new(), None),
        }
    };
    for w in &warnings {
        eprintln!("{w}");
    }
    if !errors.0.is_empty() {
        eprint!("{errors}");
        eprintln!("{}: {} problem(s) found", config.display(), errors.0.len());
        return ExitCode::FAILURE;
    }
    if print {
        match causeway::config::print::effective(config, &env) {
            Ok(text) => println!("{text}"),
            Err(diags) => {
                eprint!("{diags}");
                return ExitCode::FAILURE;
            }
        }
    }
    let what = summary.map_or(String::new(), |(r, u)| format!(" ({r} routes, {u} upstreams)"));
    let mode = if offline { ", offline" } else { "" };
    let ok = format!("{}: configuration OK{what}{mode}; {} warning(s)", config.display(), warnings.len());
    // With --print, stdout is the configuration alone.
    if print {
        eprintln!("{ok}");
    } else {
        println!("{ok}");
    }
    ExitCode::SUCCESS
}

/// One HTTP/1.1 GET to the admin listener, with a bounded wait: a container's health check.
fn health(admin: &str, live: bool) -> ExitCode {
    use std::io::{Read, Write};
    let path = if live { "/healthz" } else { "/readyz" };
    let timeout = std::time::Duration::from_secs(3);
    let answer = (|| -> std::io::Result<String> {
        let addr = std::net::ToSocketAddrs::to_socket_addrs(admin)?
            .next()
            .ok_or_else(|| std::io::Error::other("no address"))?;
        let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        write!(stream, "GET {path} HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n")?;
        let mut text = String::new();
        stream.take(64 * 1024).read_to_string(&mut text)?;
        Ok(text)
    })();
    match answer {
        Ok(text) if text.starts_with("HTTP/1.1 200") => ExitCode::SUCCESS,
        Ok(text) => {
            eprintln!("causeway health: {}", text.lines().next().unwrap_or("no answer"));
            if let Some((_, body)) = text.split_once("\r\n\r\n") {
                eprintln!("{body}");
            }
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("causeway health: {admin}{path}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    causeway::observe::allocator::spawn_collector();
    causeway::server::init_process();
    match Cli::parse().command {
        Command::Serve { config, upgrade } => {
            match causeway::server::serve(causeway::server::ServeArgs { config_dir: config, upgrade }) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("causeway: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Check { config, offline, print } => check(&config, offline, print),
        Command::Diff { old, new } => match causeway::config::diff::diff(&old, &new) {
            Ok(changes) => {
                print!("{}", causeway::config::diff::render(&changes));
                ExitCode::from(u8::from(!changes.is_empty()))
            }
            Err(diags) => {
                eprint!("{diags}");
                ExitCode::from(2)
            }
        },
        Command::Health { admin, live } => health(&admin, live),
        Command::Migrate { config } => {
            let loaded = match causeway::config::load(&config) {
                Ok(c) => c,
                Err(diags) => {
                    eprint!("{diags}");
                    eprintln!("{}: {} problem(s) found; nothing migrated", config.display(), diags.0.len());
                    return ExitCode::FAILURE;
                }
            };
            let Some(process) = loaded.process else {
                eprintln!("{}: no `process:` block, so no order store to migrate", config.display());
                return ExitCode::FAILURE;
            };
            let store = process.store;
            let opened = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())
                .and_then(|rt| {
                    rt.block_on(causeway::process::store::open(&store)).map_err(|e| e.to_string())
                });
            match opened {
                Ok(_) => {
                    println!("{}: schema up to date", store.describe());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{}: {e}", store.describe());
                    ExitCode::FAILURE
                }
            }
        }
        #[cfg(feature = "sandbox")]
        Command::Sandbox {
            listen,
            token,
            window_requests,
            window_seconds,
            max_concurrent,
            queue,
            latency_ms,
        } => {
            use causeway::sandbox::{LimitsSpec, Sandbox, SandboxConfig};
            let limits = LimitsSpec {
                window_requests,
                window_seconds,
                max_concurrent,
                queue,
                latency_ms,
                ..LimitsSpec::default()
            };
            let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
            let result = rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind(&listen).await?;
                eprintln!("causeway sandbox: Business Central API v2.0 on http://{listen}/api/v2.0/companies, stats at /sandbox/stats");
                Sandbox::new(SandboxConfig { token, limits }).serve(listener).await
            });
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("causeway sandbox: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
