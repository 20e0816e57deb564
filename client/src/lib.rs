//! Thin client for the nodeseal agent.
#![forbid(unsafe_code)]
pub mod protocol;
