//! ERP side: the built-in Business Central sandbox (and, later, adapters per ERP dialect).

pub mod sandbox;
