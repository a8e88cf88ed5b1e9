//! Compiling policy specs into runtime policies. Stateful parts (rate-limit counters, fetched
//! JWKS) come from [`SharedState`] so they survive a reload when their spec is unchanged.

use super::spec::{JwtSpec, MediationSpec, PolicySpec};
use super::SharedState;
use crate::mediation::{self, jq::JqProgram, schema::Schema, table};
use crate::policy::auth::{ApiKeyPolicy, Consumer, JwtPolicy};
use crate::policy::jwks::{parse_jwks, KeySource};
use crate::policy::ratelimit::RateLimitPolicy;
use crate::policy::{headers, Policy};
use jsonwebtoken::{Algorithm, DecodingKey};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

pub fn compile(spec: &PolicySpec, dir: &Path, state: &SharedState) -> Result<Policy, String> {
    match spec {
        PolicySpec::Headers { name, request, response } => Ok(Policy::Headers(headers::HeaderPolicy {
            name: name.clone(),
            request: headers::CompiledOps::compile(&request.set, &request.remove)?,
            response: headers::CompiledOps::compile(&response.set, &response.remove)?,
        })),
        PolicySpec::Jwt(jwt) => compile_jwt(jwt, dir, state).map(Policy::Jwt),
        PolicySpec::Mediation(m) => compile_mediation(m, &dir.join("policies")).map(Policy::Mediation),
        PolicySpec::Mtls(m) => super::edge_policies::compile_mtls(m).map(Policy::Mtls),
        PolicySpec::Cors(c) => super::edge_policies::compile_cors(c).map(Policy::Cors),
        PolicySpec::IpFilter(f) => super::edge_policies::compile_ip_filter(f).map(Policy::IpFilter),
        PolicySpec::ApiKey { name, header, keys } => {
            let header = http::HeaderName::from_bytes(header.as_bytes())
                .map_err(|_| format!("`{header}` is not a header name"))?;
            let mut by_hash = HashMap::new();
            for k in keys {
                let bytes = hex::decode(k.sha256.trim())
                    .ok()
                    .and_then(|b| <[u8; 32]>::try_from(b).ok())
                    .ok_or_else(|| format!("key of `{}`: sha256 must be 64 hex digits", k.consumer))?;
                let consumer = Consumer {
                    id: Arc::from(format!("{name}/{}", k.consumer)),
                    name: Arc::from(k.consumer.as_str()),
                    tier: Arc::from(k.tier.as_str()),
                    scopes: k.scopes.clone().into(),
                };
                if by_hash.insert(bytes, consumer).is_some() {
                    return Err(format!("the key of `{}` is listed twice", k.consumer));
                }
            }
            Ok(Policy::ApiKey(ApiKeyPolicy { name: name.clone(), header, by_hash }))
        }
        PolicySpec::RateLimit { name, per, tiers, default_tier, when_redis_unavailable } => {
            let per_route = match per.as_str() {
                "consumer" => false,
                "consumer_route" => true,
                other => return Err(format!("per must be `consumer` or `consumer_route`, not `{other}`")),
            };
            if let Some(d) = default_tier {
                if !tiers.contains_key(d) {
                    return Err(format!("default_tier `{d}` is not one of the tiers"));
                }
            }
            let mut compiled = HashMap::new();
            for (tier, t) in tiers {
                if t.window_seconds == 0 {
                    return Err(format!("tier `{tier}`: window_seconds must be at least 1"));
                }
                let window = Duration::from_secs(t.window_seconds);
                let limiter = state
                    .limiter(name, tier, (t.requests, window, t.burst), *when_redis_unavailable)
                    .map_err(|e| format!("tier `{tier}`: {e}"))?;
                compiled.insert(tier.clone(), limiter);
            }
            Ok(Policy::RateLimit(RateLimitPolicy {
                name: name.clone(),
                per_route,
                tiers: compiled,
                default_tier: default_tier.clone(),
            }))
        }
    }
}

fn parse_algorithm(name: &str) -> Result<Algorithm, String> {
    match name {
        "RS256" => Ok(Algorithm::RS256),
        "RS384" => Ok(Algorithm::RS384),
        "RS512" => Ok(Algorithm::RS512),
        "PS256" => Ok(Algorithm::PS256),
        "ES256" => Ok(Algorithm::ES256),
        "ES384" => Ok(Algorithm::ES384),
        "EdDSA" => Ok(Algorithm::EdDSA),
        "HS256" => Err("HS256 is enabled by `hs256_secret`, not in `algorithms`".into()),
        other => {
            Err(format!("unsupported algorithm `{other}` (RS256, RS384, RS512, PS256, ES256, ES384, EdDSA)"))
        }
    }
}

fn compile_jwt(spec: &JwtSpec, dir: &Path, state: &SharedState) -> Result<JwtPolicy, String> {
    let algorithms = spec.algorithms.iter().map(|a| parse_algorithm(a)).collect::<Result<Vec<_>, _>>()?;
    let keys = match (&spec.jwks_url, &spec.jwks_file) {
        (Some(url), None) => {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(format!("jwks_url `{url}` must be an http(s) URL"));
            }
            KeySource::Remote(state.remote_jwks(
                url,
                Duration::from_secs(spec.refresh_seconds.max(1)),
                Duration::from_secs(spec.min_refetch_seconds),
            ))
        }
        (None, Some(file)) => {
            let path = dir.join(file);
            let bytes = read_bounded(&path).map_err(|e| format!("jwks_file {e}"))?.into_bytes();
            KeySource::Static(parse_jwks(&bytes).map_err(|e| format!("jwks_file {}: {e}", path.display()))?)
        }
        _ => return Err("set exactly one of jwks_url and jwks_file".into()),
    };
    let hs256 = match &spec.hs256_secret {
        Some(secret) => {
            if secret.len() < 32 {
                return Err("hs256_secret must be at least 32 bytes".into());
            }
            Some(DecodingKey::from_secret(secret.as_bytes()))
        }
        None => None,
    };
    if spec.audiences.is_empty() {
        return Err("audiences must name at least one audience".into());
    }
    Ok(JwtPolicy {
        name: spec.name.clone(),
        issuer: spec.issuer.clone(),
        audiences: spec.audiences.clone(),
        leeway: Duration::from_secs(spec.leeway_seconds),
        algorithms,
        hs256,
        keys,
        tier_claim: spec.tier_claim.clone(),
        default_tier: Arc::from(spec.default_tier.as_str()),
        max_token_bytes: spec.max_token_bytes,
        cache: moka::sync::Cache::builder()
            .max_capacity(spec.cache_entries)
            .time_to_live(Duration::from_secs(3600))
            .build_with_hasher(ahash::RandomState::new()),
        clock: crate::policy::auth::system_clock,
    })
}

/// Schemas, mapping tables and jq programs are read and compiled here, once; paths are relative
/// to `policies/`.
fn compile_mediation(spec: &MediationSpec, dir: &Path) -> Result<mediation::MediationPolicy, String> {
    let schema = |file: &Option<String>| -> Result<Option<Schema>, String> {
        file.as_ref().map(|f| load_schema(&inside(dir, f)?)).transpose()
    };
    let transform = |map: &Option<String>, jq: &Option<String>, jq_file: &Option<String>| {
        let table = match map {
            Some(file) => {
                let path = inside(dir, file)?;
                let spec = read_table(&path)?;
                let base = path.parent().unwrap_or(dir).to_path_buf();
                let include = |f: &str| read_table(&inside(&base, f)?);
                Some(
                    table::Table::compile_with(&spec, &include)
                        .map_err(|e| format!("map {}: {e}", path.display()))?,
                )
            }
            None => None,
        };
        let program = match (jq, jq_file) {
            (Some(code), None) => Some(JqProgram::compile(code)?),
            (None, Some(file)) => {
                let path = inside(dir, file)?;
                let code = read_bounded(&path).map_err(|e| format!("jq_file {e}"))?;
                Some(JqProgram::compile(&code).map_err(|e| format!("jq_file {}: {e}", path.display()))?)
            }
            (Some(_), Some(_)) => return Err("set at most one of jq and jq_file".to_string()),
            (None, None) => None,
        };
        Ok::<_, String>(mediation::Transform { table, jq: program })
    };
    let request = match &spec.request {
        Some(r) => Some(mediation::RequestMediation {
            body_schema: schema(&r.schema)?,
            query_schema: schema(&r.query_schema)?,
            headers_schema: schema(&r.headers_schema)?,
            transform: transform(&r.map, &r.jq, &r.jq_file)?,
        }),
        None => None,
    };
    let response = match &spec.response {
        Some(r) => {
            if let Some(bad) = r.statuses.iter().flatten().find(|s| !(100..=599).contains(*s)) {
                return Err(format!("response statuses: {bad} is not an HTTP status"));
            }
            Some(mediation::ResponseMediation {
                schema: schema(&r.schema)?,
                transform: transform(&r.map, &r.jq, &r.jq_file)?,
                statuses: r.statuses.clone(),
            })
        }
        None => None,
    };
    if request.is_none() && response.is_none() {
        return Err("a mediation policy needs `request`, `response` or both".into());
    }
    if spec.timeout_ms == 0 || spec.max_output_bytes == 0 {
        return Err("timeout_ms and max_output_bytes must be at least 1".into());
    }
    Ok(mediation::MediationPolicy {
        name: spec.name.clone(),
        request,
        response,
        limits: mediation::Limits {
            timeout: Duration::from_millis(spec.timeout_ms),
            max_output_bytes: spec.max_output_bytes,
        },
    })
}

/// A JSON Schema file, read and compiled.
pub fn load_schema(path: &Path) -> Result<Schema, String> {
    let text = read_bounded(path).map_err(|e| format!("schema {e}"))?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| format!("schema {}:{}:{}: not JSON: {e}", path.display(), e.line(), e.column()))?;
    Schema::compile(&value, &path.display().to_string())
}

fn read_table(path: &Path) -> Result<table::TableSpec, String> {
    let text = read_bounded(path).map_err(|e| format!("map {e}"))?;
    serde_saphyr::from_str(&text).map_err(|e| format!("map {}: {e}", path.display()))
}

/// Files a policy refers to stay inside the configuration (relative, no `..`), so `causeway
/// check` sees everything the gateway will load.
fn inside(dir: &Path, file: &str) -> Result<std::path::PathBuf, String> {
    let relative = Path::new(file);
    let escapes = relative
        .components()
        .any(|c| !matches!(c, std::path::Component::Normal(_) | std::path::Component::CurDir));
    if file.is_empty() || escapes {
        return Err(format!("`{file}` must be a path relative to policies/, without `..`"));
    }
    Ok(dir.join(relative))
}

/// Schemas, mappings and programs are small; a bound keeps a wrong path (a device, a dump)
/// from stalling the load.
pub const MAX_POLICY_FILE_BYTES: u64 = 4 * 1024 * 1024;

pub fn read_bounded(path: &Path) -> Result<String, String> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if !file.metadata().map(|m| m.is_file()).unwrap_or(false) {
        return Err(format!("{}: not a regular file", path.display()));
    }
    let mut text = String::new();
    file.take(MAX_POLICY_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if text.len() as u64 > MAX_POLICY_FILE_BYTES {
        return Err(format!("{}: larger than {MAX_POLICY_FILE_BYTES} bytes", path.display()));
    }
    Ok(text)
}
