//! `process:` of causeway.yaml compiled: which ERP the process APIs write to, with which adapter,
//! how delivery retries; and `policies/process/`, the quote rules.

use super::StoreSettings;
use super::{parse_file, rules, spec, yaml_files, CompiledRoute, Diagnostics, Upstream};
use crate::config::spec::MainSpec;
use crate::policy::Policy;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// `process:` of `causeway.yaml`, compiled.
#[derive(Debug, Clone)]
pub struct ProcessSettings {
    pub erp: String,
    pub adapter: AdapterSettings,
    pub store: StoreSettings,
    pub key_ttl: Duration,
    pub max_lines: usize,
    pub max_attempts: u32,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub inline_wait: Duration,
    pub lease: Duration,
    /// Change detection (`process.changes`); off when absent.
    pub changes: Option<ChangeSettings>,
}

/// `process.changes`, checked.
#[derive(Debug, Clone)]
pub struct ChangeSettings {
    /// Business Central: where the ERP sends notifications, and the secret it sends back.
    pub notifications: Option<NotificationSettings>,
    /// Tryton: how often changed orders are polled.
    pub poll: Duration,
    /// The budget class of change detection's ERP reads (`None`: the lowest-priority class).
    pub class: Option<String>,
}

#[derive(Clone)]
pub struct NotificationSettings {
    pub url: String,
    pub client_state: String,
}

impl std::fmt::Debug for NotificationSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NotificationSettings").field("url", &self.url).finish_non_exhaustive()
    }
}

/// Shortest `clientState` secret accepted: it is the only thing that authenticates a notification.
const MIN_CLIENT_STATE: usize = 24;

fn compile_changes(
    file: &Path,
    env: &dyn Fn(&str) -> Option<String>,
    spec: &spec::ProcessSpec,
    upstreams: &BTreeMap<String, Arc<Upstream>>,
    diags: &mut Diagnostics,
) -> Option<ChangeSettings> {
    let changes = spec.changes.as_ref()?;
    let c = &changes.value;
    let notifications = match spec.adapter {
        spec::AdapterKind::BusinessCentral => {
            let (Some(url), Some(var)) = (&c.notification_url, &c.client_state_env) else {
                diags.at(
                    file,
                    changes,
                    "process.changes: Business Central notifies through webhooks: give `notification_url` (this gateway's erp-notifications route as the ERP reaches it) and `client_state_env` (the variable holding the shared secret)",
                );
                return None;
            };
            let parsed =
                reqwest::Url::parse(&url.value).ok().filter(|u| matches!(u.scheme(), "http" | "https"));
            if parsed.is_none() {
                diags.at(
                    file,
                    url,
                    format!("process.changes.notification_url: `{}` is not an http(s) URL", url.value),
                );
            }
            match env(&var.value) {
                Some(secret) if (MIN_CLIENT_STATE..=2048).contains(&secret.chars().count()) => {
                    Some(NotificationSettings { url: url.value.clone(), client_state: secret })
                }
                Some(_) => {
                    diags.at(
                        file,
                        var,
                        format!(
                            "process.changes.client_state_env: `{}` must hold {MIN_CLIENT_STATE} to 2048 characters (e.g. `openssl rand -hex 32`)",
                            var.value
                        ),
                    );
                    None
                }
                None => {
                    diags.at(
                        file,
                        var,
                        format!("process.changes.client_state_env: `{}` is not set; export a random secret (e.g. `openssl rand -hex 32`)", var.value),
                    );
                    None
                }
            }
        }
        spec::AdapterKind::Tryton => None,
    };
    if !(1..=86_400).contains(&c.poll_seconds) {
        diags.at(file, changes, "process.changes.poll_seconds must be between 1 and 86400");
    }
    if let Some(class) = &c.class {
        let known = upstreams
            .get(&spec.erp.value)
            .and_then(|u| u.budget.as_ref())
            .is_some_and(|b| b.classes.contains_key(&class.value));
        if !known {
            diags.at(
                file,
                class,
                format!("process.changes.class: `{}` is not a class of the ERP's budget", class.value),
            );
        }
    }
    Some(ChangeSettings {
        notifications,
        poll: Duration::from_secs(c.poll_seconds),
        class: c.class.as_ref().map(|c| c.value.clone()),
    })
}

#[derive(Debug, Clone)]
pub enum AdapterSettings {
    BusinessCentral { company: String },
    Tryton(TrytonSettings),
}

#[derive(Debug, Clone)]
pub struct TrytonSettings {
    pub database: String,
    pub login: String,
    pub password: String,
    pub company: i64,
}

/// Mediation policies the quote-to-order process needs (`policies/mediation.yaml`).
pub const PROCESS_POLICIES: &[&str] = &["canonical-quote", "salesforce-opportunity-to-quote"];
/// ... and those the Business Central adapter maps with.
pub const BC_ADAPTER_POLICIES: &[&str] = &[
    "canonical-customer-bc",
    "canonical-item-bc",
    "canonical-sales-order-create-bc",
    "canonical-sales-order-bc",
];

#[allow(clippy::too_many_arguments)]
pub(super) fn compile_process(
    file: &Path,
    env: &dyn Fn(&str) -> Option<String>,
    main: &MainSpec,
    store: &StoreSettings,
    upstreams: &BTreeMap<String, Arc<Upstream>>,
    policies: &HashMap<String, Arc<Policy>>,
    rules: &Option<rules::Rules>,
    routes: &[Arc<CompiledRoute>],
    diags: &mut Diagnostics,
) -> Option<ProcessSettings> {
    let Some(spec) = &main.process else {
        if let Some(route) = routes.iter().find(|r| r.process.is_some()) {
            diags.file(
                file,
                format!(
                    "route `{}` is a process endpoint, but causeway.yaml has no `process:` block",
                    route.name
                ),
            );
        }
        return None;
    };
    if !upstreams.contains_key(&spec.erp.value) {
        diags.at(file, &spec.erp, format!("process.erp: no upstream `{}`", spec.erp.value));
    }
    let adapter = match (spec.adapter, &spec.company, &spec.tryton) {
        (spec::AdapterKind::BusinessCentral, Some(company), _) => {
            Some(AdapterSettings::BusinessCentral { company: company.clone() })
        }
        (spec::AdapterKind::Tryton, _, Some(t)) => Some(AdapterSettings::Tryton(TrytonSettings {
            database: t.database.clone(),
            login: t.login.clone(),
            password: t.password.value.clone(),
            company: t.company,
        })),
        (spec::AdapterKind::BusinessCentral, None, _) => {
            diags.at(
                file,
                &spec.erp,
                "process: the business-central adapter needs `company` (the company id)",
            );
            None
        }
        (spec::AdapterKind::Tryton, _, None) => {
            diags.at(
                file,
                &spec.erp,
                "process: the tryton adapter needs a `tryton:` block (database, login, password)",
            );
            None
        }
    };
    let needed: Vec<&str> = match spec.adapter {
        spec::AdapterKind::BusinessCentral => {
            PROCESS_POLICIES.iter().chain(BC_ADAPTER_POLICIES).copied().collect()
        }
        spec::AdapterKind::Tryton => PROCESS_POLICIES.to_vec(),
    };
    let missing: Vec<&str> = needed
        .into_iter()
        .filter(|name| !policies.get(*name).is_some_and(|p| matches!(p.as_ref(), Policy::Mediation(_))))
        .collect();
    if !missing.is_empty() {
        diags.at(
            file,
            &spec.erp,
            format!("process: the mediation policies {} are missing from policies/", missing.join(", ")),
        );
    }
    if rules.is_none() {
        diags.at(file, &spec.erp, "process: policies/process/ (the quote rules) is missing");
    }
    let d = &spec.delivery;
    if d.max_attempts == 0 || d.backoff_initial_ms == 0 || d.backoff_max_ms < d.backoff_initial_ms {
        diags.at(
            file,
            &spec.erp,
            "process.delivery: max_attempts and backoff_initial_ms must be at least 1, backoff_max_ms at least backoff_initial_ms",
        );
    }
    if spec.idempotency_key_ttl_hours == 0 {
        diags.at(file, &spec.erp, "process.idempotency_key_ttl_hours must be at least 1");
    }
    if spec.max_lines == 0 || spec.max_lines > 2000 {
        diags.at(file, &spec.erp, "process.max_lines must be between 1 and 2000");
    }
    let changes = compile_changes(file, env, spec, upstreams, diags);
    if changes.is_none() && spec.changes.is_some() {
        return None;
    }
    let ms = Duration::from_millis;
    Some(ProcessSettings {
        erp: spec.erp.value.clone(),
        adapter: adapter?,
        store: store.clone(),
        key_ttl: Duration::from_secs(spec.idempotency_key_ttl_hours.saturating_mul(3600)),
        max_lines: spec.max_lines,
        max_attempts: d.max_attempts,
        backoff_initial: ms(d.backoff_initial_ms),
        backoff_max: ms(d.backoff_max_ms),
        inline_wait: ms(d.inline_wait_ms),
        lease: ms(d.lease_ms.max(1000)),
        changes,
    })
}

/// `policies/process/`: one file a concern, all of them required once the directory exists.
pub(super) fn load_process_rules(
    dir: &Path,
    env: &super::Env,
    diags: &mut Diagnostics,
) -> Option<rules::Rules> {
    use rules::{Rules, FILES};
    if !dir.is_dir() {
        return None;
    }
    for file in yaml_files(dir, diags) {
        let name = file.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if !FILES.contains(&name) {
            diags.file(&file, format!("not a process rules file; expected one of {}", FILES.join(", ")));
        }
    }
    let customer = parse_file(&dir.join("customer.yaml"), env, diags);
    let products = parse_file(&dir.join("products.yaml"), env, diags);
    let tax = parse_file::<rules::TaxRules>(&dir.join("tax.yaml"), env, diags);
    let contract = parse_file::<rules::ContractRules>(&dir.join("contract.yaml"), env, diags);
    let pricing = parse_file(&dir.join("pricing.yaml"), env, diags);
    let (Some(customer), Some(products), Some(tax), Some(contract), Some(pricing)) =
        (customer, products, tax, contract, pricing)
    else {
        return None;
    };
    for region in contract.currencies.keys().chain(contract.payment_terms.keys()) {
        if !tax.regions.contains_key(region) {
            diags.file(
                &dir.join("contract.yaml"),
                format!("region `{region}` has no tax treatment in tax.yaml"),
            );
        }
    }
    Some(Rules { customer, products, tax, contract, pricing })
}
