//! ERP side: the process APIs' adapters, one per dialect, each implementing
//! [`crate::process::adapter::ErpAdapter`]: Business Central ([`business_central`]; the sandbox
//! speaks it) and Tryton ([`tryton`]), over the budgeted exchange they share ([`exchange`]).

pub mod business_central;
pub mod exchange;
pub mod tryton;

pub use crate::process::adapter::{AdapterError, ErpAdapter, ErpOrder};

use crate::config::{AdapterSettings, Config, ProcessSettings};

/// The adapter of the ERP dialect `settings` names, on the loaded configuration (its upstream
/// and, for Business Central, its mapping policies).
pub fn adapter_for(config: &Config, settings: &ProcessSettings) -> Result<Box<dyn ErpAdapter>, String> {
    Ok(match &settings.adapter {
        AdapterSettings::BusinessCentral { company } => {
            Box::new(business_central::BusinessCentral::new(config, &settings.erp, company)?)
        }
        AdapterSettings::Tryton(t) => {
            let upstream = config
                .upstreams
                .get(&settings.erp)
                .cloned()
                .ok_or_else(|| format!("no upstream `{}`", settings.erp))?;
            let class = exchange::change_class(&upstream, settings.changes.as_ref());
            Box::new(tryton::Tryton::new(upstream, t.clone()).with_change_class(class))
        }
    })
}
