//! ERP side: the built-in Business Central sandbox and the process APIs' adapter.

pub mod adapter;
pub mod sandbox;
