//! Causeway: an API gateway and policy proxy for cloud ERPs, built on pingora.
//!
//! Start at [`server::run`] (what `causeway serve` does), [`config`] (files → compiled runtime
//! objects) and [`proxy`] (the pingora `ProxyHttp` pipeline).

pub mod admin;
pub mod budget;
pub mod changes;
pub mod clock;
pub mod config;
pub mod edge;
pub mod erp;
pub mod error;
pub mod events;
pub mod mediation;
pub mod observe;
pub mod policy;
pub mod process;
pub mod proxy;
pub mod reload;
pub mod route;
#[cfg(feature = "sandbox")]
pub mod sandbox;
pub mod server;
