//! `store:` and `cluster:` of causeway.yaml compiled: where orders live (one node's SQLite file
//! or a PostgreSQL database the replicas share) and how replicas share the ERP budgets (Redis).
//! The combinations that cannot keep the gateway's promises are refused here, at load.

use super::spec::{MainSpec, StoreBackend, Synchronous};
use super::Diagnostics;
use crate::budget::redis::{RedisLink, RedisSettings};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Writes per transaction under load when `store.group_commit` is not set.
const DEFAULT_GROUP_COMMIT: usize = 64;
/// More per transaction only lengthens each caller's wait for the commit.
const MAX_GROUP_COMMIT: usize = 1000;

/// Where the process APIs keep orders and idempotency keys.
#[derive(Debug, Clone, PartialEq)]
pub enum StoreSettings {
    Sqlite { path: PathBuf, synchronous: Synchronous, group_commit: usize },
    Postgres { url: String, pool: u32, acquire_timeout: Duration, group_commit: usize },
}

impl StoreSettings {
    /// What logs and `causeway migrate` name the store by (never the URL's password).
    pub fn describe(&self) -> String {
        match self {
            StoreSettings::Sqlite { path, .. } => format!("SQLite {}", path.display()),
            StoreSettings::Postgres { url, .. } => {
                let shown = url.split_once('@').map_or(url.as_str(), |(_, host)| host);
                format!("PostgreSQL {shown}")
            }
        }
    }
}

/// `cluster:` compiled.
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    pub replicas: u32,
    pub redis: Option<Arc<RedisLink>>,
    /// A budget or limit refuses requests while Redis is away (`when_redis_unavailable:
    /// closed`): then this replica is not ready without Redis.
    pub redis_required: bool,
}

pub(super) fn compile_store(
    file: &Path,
    dir: &Path,
    main: &MainSpec,
    diags: &mut Diagnostics,
) -> Option<StoreSettings> {
    let store = &main.store;
    let group_commit = store.group_commit.as_ref().map_or(DEFAULT_GROUP_COMMIT, |n| n.value);
    if let Some(n) = store.group_commit.as_ref().filter(|n| n.value == 0 || n.value > MAX_GROUP_COMMIT) {
        diags.at(
            file,
            n,
            format!(
                "store.group_commit must be between 1 and {MAX_GROUP_COMMIT} writes per transaction, not {}",
                n.value
            ),
        );
    }
    match store.backend {
        StoreBackend::Sqlite => {
            if let Some(url) = &store.url {
                diags.at(
                    file,
                    url,
                    "store.url is for `backend: postgres`; SQLite is configured by store.path".to_string(),
                );
                return None;
            }
            Some(StoreSettings::Sqlite {
                path: dir.join(&store.path),
                synchronous: store.synchronous,
                group_commit,
            })
        }
        StoreBackend::Postgres => {
            let Some(url) = &store.url else {
                diags.file(file, "store: `backend: postgres` needs `url:` (e.g. `${CAUSEWAY_DATABASE_URL}`, postgres://user@host:5432/db)");
                return None;
            };
            let expanded = url.value.clone();
            if !(expanded.starts_with("postgres://") || expanded.starts_with("postgresql://")) {
                diags.at(file, url, "store.url must start with postgres:// or postgresql://".to_string());
                return None;
            }
            if store.pool == 0 || store.acquire_timeout_ms == 0 {
                diags.at(file, url, "store.pool and store.acquire_timeout_ms must be at least 1".to_string());
            }
            Some(StoreSettings::Postgres {
                url: expanded,
                pool: store.pool,
                acquire_timeout: Duration::from_millis(store.acquire_timeout_ms),
                group_commit,
            })
        }
    }
}

/// `cluster:` with its Redis link (reused from `current` when its settings did not change, so
/// a reload keeps one connection).
pub(super) fn compile_cluster(
    file: &Path,
    main: &MainSpec,
    current: Option<Arc<RedisLink>>,
    diags: &mut Diagnostics,
) -> Option<ClusterSettings> {
    let Some(spec) = &main.cluster else {
        return Some(ClusterSettings { replicas: 1, redis: None, redis_required: false });
    };
    let replicas = spec.replicas.value;
    if replicas == 0 || replicas > 64 {
        diags.at(file, &spec.replicas, format!("cluster.replicas must be between 1 and 64, not {replicas}"));
        return None;
    }
    if replicas > 1 && main.store.backend == StoreBackend::Sqlite && main.process.is_some() {
        diags.at(
            file,
            &spec.replicas,
            "cluster.replicas: replicas share orders and idempotency keys through the store; set `store.backend: postgres` (SQLite is one node's file)".to_string(),
        );
    }
    let Some(redis) = &spec.redis else {
        if replicas > 1 && main.upstreams.values().any(|u| u.value.budget.is_some()) {
            diags.at(
                file,
                &spec.replicas,
                "cluster.replicas: each replica would spend the whole ERP budget; set `cluster.redis` so the replicas share it".to_string(),
            );
        }
        return Some(ClusterSettings { replicas, redis: None, redis_required: false });
    };
    let url = redis.url.value.clone();
    if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
        diags.at(file, &redis.url, "cluster.redis.url must start with redis:// or rediss://".to_string());
        return None;
    }
    if !(100..=600_000).contains(&redis.lease_ms) || !(10..=10_000).contains(&redis.timeout_ms) {
        diags.at(
            file,
            &redis.url,
            "cluster.redis: lease_ms must be between 100 and 600000, timeout_ms between 10 and 10000"
                .to_string(),
        );
        return None;
    }
    if redis.key_prefix.is_empty() || redis.key_prefix.chars().any(|c| c.is_whitespace() || c.is_control()) {
        diags.at(file, &redis.url, "cluster.redis.key_prefix must be non-empty, without spaces".to_string());
        return None;
    }
    let settings = RedisSettings {
        url,
        key_prefix: redis.key_prefix.clone(),
        lease: Duration::from_millis(redis.lease_ms),
        timeout: Duration::from_millis(redis.timeout_ms),
        replicas,
    };
    if let Some(link) = current.filter(|l| *l.settings() == settings) {
        return Some(ClusterSettings { replicas, redis: Some(link), redis_required: false });
    }
    match RedisLink::new(settings) {
        Ok(link) => Some(ClusterSettings { replicas, redis: Some(link), redis_required: false }),
        Err(e) => {
            diags.at(file, &redis.url, e);
            None
        }
    }
}
