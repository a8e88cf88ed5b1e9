//! The edge: what happens before a request is routed. TLS toward callers (certificates by SNI,
//! rotation, client certificates), the PROXY protocol, and the client's real address behind
//! trusted proxies. Runtime objects only: `config` compiles the files into them, `server` wires
//! them into pingora's listeners, `proxy` and `policy` read what they recorded.

pub mod client_addr;
pub mod proxy_protocol;
pub mod tls;
