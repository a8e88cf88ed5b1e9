//! `causeway serve`: assemble the pingora server (proxy, admin, metrics, probe), start the
//! embedded sandbox when configured, and handle signals.

use crate::admin::{AdminApp, Health, MetricsApp, UpstreamProbe};
use crate::config::{self, Config, SharedState};
use crate::observe::{logging, metrics::Metrics};
use crate::process::service::QuoteToOrder;
use crate::proxy::{Gateway, InFlight};
use crate::reload::{ReloadTriggers, Reloader};
use anyhow::Context;
use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::listeners::ListenerConfig;
use pingora::protocols::l4::stream::L4BufferSettings;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch};
use pingora::services::background::background_service;
use pingora::services::listening::Service;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct ServeArgs {
    pub config_dir: PathBuf,
    /// Take over the listening sockets of a running instance (graceful upgrade).
    pub upgrade: bool,
}

/// Run until a signal ends the process. Configuration errors are returned before anything listens.
pub fn serve(args: ServeArgs) -> anyhow::Result<()> {
    init_process();
    // Absolute, so the reload watcher sees the same directory however `-c` was written
    // (`-c .` included) and whatever the working directory becomes.
    let config_dir = std::fs::canonicalize(&args.config_dir)
        .with_context(|| format!("configuration directory {}", args.config_dir.display()))?;
    let args = ServeArgs { config_dir, ..args };
    let state = Arc::new(SharedState::default());
    let config = config::load_with_state(&args.config_dir, &|name| std::env::var(name).ok(), &state)
        .map_err(|d| anyhow::anyhow!("invalid configuration:\n{d}"))?;
    logging::init();
    if let Some(traces) = &config.traces {
        crate::observe::traces::start(traces).map_err(|e| anyhow::anyhow!("traces: {e}"))?;
    }
    for route in config.router.routes().iter().filter(|r| r.public) {
        tracing::warn!(route = %route.name, upstream = %route.upstream.name, "public route: anonymous callers reach this upstream");
    }
    let sandbox_addr = start_sandbox(&config, args.upgrade)?;
    print_banner(&config, sandbox_addr.as_deref());

    let listen = config.listen.clone();
    let threads = config.threads;
    let (work_stealing, pool_size) = (config.work_stealing, config.upstream_pool_size);
    let grace = config.shutdown_grace;
    let config = Arc::new(ArcSwap::from_pointee(config));
    let metrics = Metrics::global().clone();
    let reloader = Arc::new(Reloader::new(args.config_dir.clone(), config.clone(), state.clone()));
    let admin_token = std::env::var("CAUSEWAY_ADMIN_TOKEN").ok().filter(|t| !t.is_empty());
    let health = Arc::new(Health::default());
    let in_flight = Arc::new(InFlight::default());
    let process = start_process(&config)?;

    let conf = ServerConf {
        threads,
        work_stealing,
        upstream_keepalive_pool_size: pool_size,
        // pingora sleeps this long after SIGTERM; our drain watcher exits as soon as requests finish.
        grace_period_seconds: Some(grace.as_secs()),
        graceful_shutdown_timeout_seconds: Some(1),
        upgrade_sock: format!(
            "/tmp/causeway-upgrade-{}.sock",
            listen.proxy_addresses().first().copied().unwrap_or("proxy").replace([':', '.', '[', ']'], "_")
        ),
        ..ServerConf::default()
    };
    let opt = Opt { upgrade: args.upgrade, ..Opt::default() };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();

    let changes = process.as_ref().and_then(|service| {
        let settings = config.load().process.as_ref()?.changes.clone()?;
        Some(crate::changes::Changes::new(service.clone(), settings))
    });
    let gateway = Gateway::new(config.clone(), metrics.clone(), in_flight.clone(), process.clone())
        .with_changes(changes.clone());
    let mut proxy =
        pingora::proxy::http_proxy_service_with_name(&server.configuration, gateway, "causeway proxy");
    if let Some(app) = proxy.app_logic_mut() {
        let mut options = pingora::apps::HttpServerOptions::default();
        options.header_timeout = Some(listen.client_header_timeout);
        options.header_limits = Some((listen.max_header_bytes, listen.max_header_fields));
        // CONNECT reaches the router, which answers it with a 405 problem like any method no
        // route takes (pingora alone answers a bare 405); nothing is ever tunnelled.
        options.allow_connect_method_proxying = true;
        options.h2c = listen.h2c;
        app.server_options = Some(options);
        app.h2_options = Some(h2_options(&listen));
    }
    for listener in proxy_listeners(&listen, &state)? {
        proxy.add_listener(listener);
    }

    let mut admin = Service::new(
        "causeway admin".into(),
        AdminApp {
            config: config.clone(),
            health: health.clone(),
            reloader: reloader.clone(),
            admin_token,
            process: process.clone(),
        },
    );
    admin.add_tcp(&listen.admin);
    admin.threads = Some(1);
    let mut metrics_service = Service::new(
        "causeway metrics".into(),
        MetricsApp { metrics: metrics.clone(), config: config.clone() },
    );
    metrics_service.add_tcp(&listen.metrics);
    metrics_service.threads = Some(1);
    let events = config.load().events.clone();
    let mut probe = background_service(
        "readiness probe",
        UpstreamProbe { config, health, metrics, process: process.clone() },
    );
    probe.threads = Some(1);

    server.add_service(proxy);
    server.add_service(admin);
    server.add_service(metrics_service);
    server.add_service(probe);
    server.add_service(background_service("config reload", ReloadTriggers(reloader)));
    if let Some(service) = process {
        let mut worker = background_service("order delivery", DeliveryWorker { service, events, changes });
        worker.threads = Some(1);
        server.add_service(worker);
    }
    server.run(RunArgs { shutdown_signal: Box::new(DrainOnTerm { in_flight, grace }) });
    crate::observe::traces::shutdown();
    logging::flush();
    Ok(())
}

/// The proxy's listeners: the plain one and each TLS one, with the PROXY protocol where asked.
fn proxy_listeners(
    listen: &crate::config::Listen,
    state: &SharedState,
) -> anyhow::Result<Vec<ListenerConfig>> {
    use crate::edge::proxy_protocol::ProxyProtocol;
    use crate::edge::tls::IdentityRecorder;
    use pingora::listeners::tls::TlsSettings;
    let buffers = L4BufferSettings { read: Some(listen.read_buffer_bytes), write: None };
    let proxy_protocol = |on: bool, listener: ListenerConfig| {
        if !on {
            return listener;
        }
        let reader =
            ProxyProtocol { trusted: listen.trusted_proxies.clone(), timeout: listen.client_header_timeout };
        listener.pre_handshake(Arc::new(reader))
    };
    let mut out = Vec::new();
    if let Some(addr) = &listen.proxy {
        out.push(proxy_protocol(listen.proxy_protocol, ListenerConfig::tcp(addr.clone()).l4_buffer(buffers)));
    }
    for tls in &listen.tls {
        let runtime =
            state.listener_tls(tls).map_err(|e| anyhow::anyhow!("TLS listener {}: {e}", tls.address))?;
        let mut settings = match &runtime.verifier {
            Some(verifier) => {
                TlsSettings::with_callbacks(Box::new(IdentityRecorder { verifier: verifier.clone() }))?
            }
            None => TlsSettings::intermediate("", "")?,
        };
        settings.set_cert_resolver(runtime.resolver.clone());
        if let Some(verifier) = &runtime.verifier {
            settings.set_client_cert_verifier(verifier.clone());
        }
        settings.set_alpn(if tls.http2 {
            pingora::protocols::ALPN::H2H1
        } else {
            pingora::protocols::ALPN::H1
        });
        let listener = ListenerConfig::tcp(tls.address.clone()).tls(settings).l4_buffer(buffers);
        out.push(proxy_protocol(tls.proxy_protocol, listener));
    }
    Ok(out)
}

/// HTTP/2 toward callers: the same header bounds as HTTP/1, a bounded number of streams per
/// connection, and h2's defences against streams reset faster than they are served (the
/// rapid-reset flood of CVE-2023-44487 gets a GOAWAY).
fn h2_options(listen: &crate::config::Listen) -> pingora::protocols::http::v2::server::H2Options {
    let mut options = pingora::protocols::http::v2::server::default_h2_options();
    options.max_header_list_size(listen.max_header_bytes as u32);
    options.max_concurrent_streams(128);
    options.max_pending_accept_reset_streams(20);
    options.max_local_error_reset_streams(Some(256));
    options
}

/// What every command needs before it does anything: one crypto provider for jsonwebtoken and
/// one TLS provider for every HTTP client (reqwest is built without one), installed once; and
/// problem+json bodies for the error answers pingora writes itself.
pub fn init_process() {
    crate::policy::auth::init_crypto();
    let _ = rustls::crypto::ring::default_provider().install_default();
    pingora::protocols::http::server::set_error_body(crate::error::pingora_error_body);
}

/// The quote-to-order service, when configured. The store is opened once here so a bad path
/// fails at start, not on the first order.
fn start_process(config: &Arc<ArcSwap<Config>>) -> anyhow::Result<Option<Arc<QuoteToOrder>>> {
    let Some(settings) = config.load().process.clone() else { return Ok(None) };
    let store = settings.store.clone();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(crate::process::store::open(&store))
        .with_context(|| format!("opening the order store ({})", store.describe()))?;
    let adapter = crate::erp::adapter_for(&config.load(), &settings)
        .map_err(|e| anyhow::anyhow!("process APIs: {e}"))?;
    let open_store: crate::process::service::OpenStore = Box::new(move || {
        let store = store.clone();
        Box::pin(async move { crate::process::store::open(&store).await })
    });
    Ok(Some(QuoteToOrder::new(config.clone(), settings, adapter, open_store)))
}

/// Delivers pending orders to the ERP in the background, and the events of `events:` to their
/// subscribers (a change of subscribers takes a restart).
struct DeliveryWorker {
    service: Arc<QuoteToOrder>,
    events: Option<crate::config::events::EventsSettings>,
    /// Change detection (ERP → gateway), when configured.
    changes: Option<Arc<crate::changes::Changes>>,
}

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for DeliveryWorker {
    async fn start(&self, shutdown: pingora::server::ShutdownWatch) {
        if let Some(changes) = self.changes.clone() {
            tokio::spawn(changes.run(shutdown.clone()));
        }
        if let Some(events) = self.events.clone() {
            let (service, shutdown) = (self.service.clone(), shutdown.clone());
            tokio::spawn(async move {
                loop {
                    match service.outbox().await {
                        Ok(Some(outbox)) => {
                            let wake = service.finished_orders();
                            return crate::events::dispatch::start(outbox, &events, wake, shutdown).await;
                        }
                        Ok(None) => {
                            tracing::error!(
                                "the order store keeps no event outbox: events are not delivered"
                            );
                            return;
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "order store unavailable; event delivery starts when it answers");
                            tokio::time::sleep(Duration::from_secs(5)).await;
                        }
                    }
                }
            });
        }
        self.service.clone().run_worker(shutdown).await;
    }
}

#[cfg(not(feature = "sandbox"))]
fn start_sandbox(config: &Config, _upgrade: bool) -> anyhow::Result<Option<String>> {
    match &config.sandbox {
        None => Ok(None),
        Some(_) => anyhow::bail!(
            "causeway.yaml has a `sandbox:` block, but this build has no ERP sandbox (built without the `sandbox` feature); remove the block and point the upstream at the ERP"
        ),
    }
}

#[cfg(feature = "sandbox")]
fn start_sandbox(config: &Config, upgrade: bool) -> anyhow::Result<Option<String>> {
    use crate::sandbox::{self, SandboxConfig};
    let Some(s) = &config.sandbox else { return Ok(None) };
    let settings = SandboxConfig { token: s.token.clone(), limits: s.limits.clone() };
    match sandbox::spawn(&s.listen, settings) {
        Ok(_) => Ok(Some(s.listen.clone())),
        // During an upgrade the old process still holds the sandbox port; the sandbox is a
        // development aid, so the new process carries on without its own.
        Err(e) if upgrade => {
            tracing::warn!(error = %e, listen = %s.listen, "ERP sandbox not started during upgrade");
            Ok(None)
        }
        Err(e) => Err(e).with_context(|| format!("starting the ERP sandbox on {}", s.listen)),
    }
}

fn print_banner(config: &Config, sandbox: Option<&str>) {
    let routes: Vec<&str> = config.router.routes().iter().map(|r| r.name.as_str()).collect();
    let mut listeners: Vec<String> = config.listen.proxy.iter().map(|a| format!("http://{a}")).collect();
    listeners.extend(config.listen.tls.iter().map(|t| format!("https://{}", t.address)));
    eprintln!(
        "causeway: proxy on {} ({} routes: {})",
        listeners.join(" and "),
        routes.len(),
        routes.join(", ")
    );
    eprintln!(
        "causeway: health on http://{}/readyz, metrics on http://{}/metrics",
        config.listen.admin, config.listen.metrics
    );
    if let Some(addr) = sandbox {
        eprintln!(
            "causeway: ERP sandbox (Business Central API v2.0) on http://{addr}, stats at /sandbox/stats"
        );
    }
    if let Some(first) = listeners.first() {
        eprintln!(
            "causeway: try  curl -s -H 'x-api-key: demo-erp-read-key' '{first}/erp/v2/customers?$top=2'"
        );
    }
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
}

/// SIGTERM: stop accepting, let in-flight requests finish, exit as soon as none are left or the
/// grace period ends (pingora alone would always sleep the whole grace period). SIGINT: exit
/// now. SIGQUIT: hand the listeners to a new process started with `-u`, then drain.
struct DrainOnTerm {
    in_flight: Arc<InFlight>,
    grace: Duration,
}

#[async_trait]
impl ShutdownSignalWatch for DrainOnTerm {
    async fn recv(&self) -> ShutdownSignal {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int), Ok(mut quit)) =
            (signal(SignalKind::terminate()), signal(SignalKind::interrupt()), signal(SignalKind::quit()))
        else {
            tracing::error!("cannot install signal handlers; exiting");
            return ShutdownSignal::FastShutdown;
        };
        tokio::select! {
            _ = term.recv() => {
                tracing::info!(grace_seconds = self.grace.as_secs(), "SIGTERM: draining in-flight requests");
                spawn_drain_watcher(self.in_flight.clone(), self.grace);
                ShutdownSignal::GracefulTerminate
            }
            _ = int.recv() => ShutdownSignal::FastShutdown,
            _ = quit.recv() => {
                tracing::info!("SIGQUIT: handing listeners to the new process");
                ShutdownSignal::GracefulUpgrade
            }
        }
    }
}

fn spawn_drain_watcher(in_flight: Arc<InFlight>, grace: Duration) {
    let started = Instant::now();
    std::thread::spawn(move || {
        // Give pingora a moment to close the listeners and wake idle keep-alive connections.
        std::thread::sleep(Duration::from_millis(100));
        while in_flight.count() > 0 && started.elapsed() < grace {
            std::thread::sleep(Duration::from_millis(20));
        }
        let left = in_flight.count();
        if left > 0 {
            tracing::warn!(requests = left, "grace period over; exiting with requests in flight");
        } else {
            tracing::info!(elapsed_ms = started.elapsed().as_millis() as u64, "drained; exiting");
        }
        logging::flush();
        std::process::exit(0);
    });
}
