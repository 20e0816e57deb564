mod agent;
mod client;
mod keys;
mod node;
mod packaging;
mod seal;
mod util;
