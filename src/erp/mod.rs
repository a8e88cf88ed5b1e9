//! ERP side: the built-in Business Central sandbox and the process APIs' adapters (Business
//! Central, Tryton).

pub mod adapter;
pub mod sandbox;
pub mod tryton;
