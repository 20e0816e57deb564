mod util;
mod packaging;
mod seal;
mod agent;
mod node;
mod keys;
