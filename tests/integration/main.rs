//! The integration suite in one test binary: the real `causeway` binary on loopback in front of
//! the real sandbox (and PostgreSQL, Redis, NATS, Tryton, nginx where a test says so). One binary
//! links once; `cargo test --test integration MODULE::` runs one part.

mod common;

mod adapter;
mod architecture;
mod auth;
mod check;
mod cluster;
mod config_diff;
mod container;
mod dialects;
mod edge;
mod events;
mod gateway;
mod hardening;
mod lifecycle;
mod mappings;
mod mediation;
mod observability;
mod process;
mod process_hardening;
mod process_rules;
mod reload;
mod sandbox;
mod schemathesis;
mod throttle;
mod tryton;
