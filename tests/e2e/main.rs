//! End-to-end tests of the real binaries on the kit's fake node (`nodeseal-testkit`).
//!
//! Every `#[ignore]` in this binary means `#[ignore = "needs root: <why>"]`: as root,
//! `scripts/test.sh` runs this binary's ignored tests and checks their count against those
//! attributes, so an ignored test that is not root-only does not belong here.

mod abuse;
mod agent;
mod bounded;
mod client;
mod fairness;
mod faults;
mod hostile_keys;
mod hostile_logs;
mod hostile_trees;
mod hygiene;
mod identity;
mod keys;
mod keyvault;
mod pacing;
mod packaging;
mod policy;
mod seal;
mod tally;
