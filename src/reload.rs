//! Hot reload: the configuration directory is compiled again and swapped in atomically; an
//! invalid configuration is refused with its diagnostics logged and the old one keeps serving.
//! Requests in flight keep the configuration they started with (they hold an `Arc` to it).
//! Triggers: changes in the directory (watched as a directory: editors replace files by
//! rename), SIGHUP, and `POST /admin/reload` on the admin listener.

use crate::config::{self, Config, SharedState};
use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub struct Reloader {
    pub dir: PathBuf,
    pub config: Arc<ArcSwap<Config>>,
    pub state: Arc<SharedState>,
    lock: tokio::sync::Mutex<()>,
}

impl Reloader {
    pub fn new(dir: PathBuf, config: Arc<ArcSwap<Config>>, state: Arc<SharedState>) -> Self {
        Reloader { dir, config, state, lock: tokio::sync::Mutex::new(()) }
    }

    /// Compile and swap. Returns the diagnostics when the new configuration is invalid.
    pub async fn reload(&self, trigger: &str) -> Result<String, String> {
        let _one_at_a_time = self.lock.lock().await;
        let dir = self.dir.clone();
        let state = self.state.clone();
        // Reading files and resolving hosts blocks: keep it off the async workers.
        let loaded = tokio::task::spawn_blocking(move || {
            config::load_with_state(&dir, &|name| std::env::var(name).ok(), &state)
        })
        .await
        .map_err(|e| format!("reload task failed: {e}"))?;
        match loaded {
            Ok(new) => {
                let old = self.config.load();
                if new.listen.proxy_addresses() != old.listen.proxy_addresses() || new.threads != old.threads
                {
                    tracing::warn!("listen addresses and threads change only on restart or graceful upgrade");
                }
                if new.traces != old.traces {
                    tracing::warn!("`traces:` changes only on restart: spans still go where they went");
                }
                let summary =
                    format!("{} routes, {} upstreams", new.router.routes().len(), new.upstreams.len());
                // Certificates re-read from their files serve the next handshakes.
                self.state.apply_tls(&new.listen);
                for warning in &new.warnings {
                    tracing::warn!("{warning}");
                }
                self.config.store(Arc::new(new));
                tracing::info!(trigger, %summary, "configuration reloaded");
                Ok(summary)
            }
            Err(diags) => {
                let text = diags.to_string();
                tracing::error!(trigger, problems = diags.0.len(), diagnostics = %text.trim_end(), "configuration rejected; the previous one keeps serving");
                Err(text)
            }
        }
    }
}

/// Only `causeway.yaml`, YAML files in `routes/` and `policies/`, and the schemas, mappings and
/// jq programs anywhere under `policies/` are configuration: logs, the store or editor swap files
/// in the same directory must not trigger reloads.
fn is_config_path(dir: &std::path::Path, path: &std::path::Path) -> bool {
    let Ok(rel) = path.strip_prefix(dir) else { return false };
    let parts: Vec<String> = rel.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
    let Some(name) = parts.last() else { return false };
    let yaml = !name.starts_with('.') && (name.ends_with(".yaml") || name.ends_with(".yml"));
    let policy_file = yaml || (!name.starts_with('.') && (name.ends_with(".json") || name.ends_with(".jq")));
    match parts.as_slice() {
        [only] => only == crate::config::MAIN_FILE,
        [first, _] if first == "routes" => yaml,
        [first, ..] if first == "policies" => policy_file,
        _ => false,
    }
}

/// Certificate files of the TLS listeners, and the directories holding them outside the
/// configuration directory: a renewed certificate (cert-manager, certbot, a Kubernetes secret
/// swapped by rename) reloads the configuration, whose new certificates serve new handshakes.
fn certificate_paths(config: &Config) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let files: Vec<PathBuf> = config.listen.tls.iter().flat_map(|t| t.files.iter().cloned()).collect();
    let mut dirs: Vec<PathBuf> = files
        .iter()
        .filter_map(|f| f.parent().map(|p| p.to_path_buf()))
        .filter(|d| *d != config.dir)
        .collect();
    dirs.sort();
    dirs.dedup();
    (files, dirs)
}

/// Watches the configuration directory, the certificates' directories and SIGHUP.
pub struct ReloadTriggers(pub Arc<Reloader>);

#[async_trait]
impl BackgroundService for ReloadTriggers {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        use notify::{RecursiveMode, Watcher};
        let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(16);
        let dir = self.0.dir.clone();
        let (cert_files, cert_dirs) = certificate_paths(&self.0.config.load());
        let watched_dirs = cert_dirs.clone();
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            let certificate = |p: &std::path::Path| {
                cert_files.iter().any(|f| f == p) || p.parent().is_some_and(|d| watched_dirs.iter().any(|w| w == d))
            };
            let relevant = event.is_ok_and(|e| {
                !e.kind.is_access() && e.paths.iter().any(|p| is_config_path(&dir, p) || certificate(p))
            });
            if relevant {
                let _ = tx.try_send(());
            }
        })
        .and_then(|mut w| {
            // Only where configuration lives: the store (data/) and logs may sit in the same
            // directory, and every write there would wake this watcher.
            w.watch(&self.0.dir, RecursiveMode::NonRecursive)?;
            for sub in ["routes", "policies"] {
                let path = self.0.dir.join(sub);
                if path.is_dir() {
                    w.watch(&path, RecursiveMode::Recursive)?;
                }
            }
            for cert_dir in cert_dirs.iter().filter(|d| !d.starts_with(self.0.dir.join("policies"))) {
                if let Err(e) = w.watch(cert_dir, RecursiveMode::NonRecursive) {
                    tracing::warn!(error = %e, dir = %cert_dir.display(), "cannot watch a certificate directory; reload with SIGHUP or POST /admin/reload after renewing");
                }
            }
            Ok(w)
        });
        let _watcher = match watcher {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the configuration directory; reload with SIGHUP or POST /admin/reload");
                None
            }
        };
        let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        loop {
            tokio::select! {
                Some(()) = rx.recv() => {
                    // Debounce: an editor's save is several events.
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    while rx.try_recv().is_ok() {}
                    let _ = self.0.reload("file change").await;
                }
                Some(()) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                    let _ = self.0.reload("SIGHUP").await;
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::is_config_path;
    use std::path::Path;

    #[test]
    fn only_configuration_files_trigger_reloads() {
        let dir = Path::new("/etc/causeway");
        assert!(is_config_path(dir, Path::new("/etc/causeway/causeway.yaml")));
        assert!(is_config_path(dir, Path::new("/etc/causeway/routes/erp.yaml")));
        assert!(is_config_path(dir, Path::new("/etc/causeway/policies/auth.yml")));
        assert!(!is_config_path(dir, Path::new("/etc/causeway/gateway.log")));
        assert!(!is_config_path(dir, Path::new("/etc/causeway/data/causeway.db")));
        assert!(!is_config_path(dir, Path::new("/etc/causeway/routes/.erp.yaml.swp")));
        assert!(!is_config_path(dir, Path::new("/etc/causeway/routes/sub/x.yaml")));
        assert!(is_config_path(dir, Path::new("/etc/causeway/policies/schemas/canonical/order.json")));
        assert!(is_config_path(dir, Path::new("/etc/causeway/policies/mappings/sap/order.jq")));
        assert!(!is_config_path(dir, Path::new("/etc/causeway/policies/mappings/.order.yaml.swp")));
    }
}
