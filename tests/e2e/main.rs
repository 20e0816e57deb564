mod abuse;
mod agent;
mod client;
mod faults;
mod hygiene;
mod keys;
mod packaging;
mod seal;
