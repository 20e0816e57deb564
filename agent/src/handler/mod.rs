//! What the agent answers: one protocol request from one peer, one function per operation
//! ([`values`]: `get`, `env`, `list`; [`open`]; [`admin`]: `health`, `status`, `revoke`,
//! `restore`), each authorized by [`crate::authz`] and recorded as one [`audit`] line. A request
//! takes one config snapshot and uses it throughout. Decryption ([`decrypt`]) runs on the
//! decrypt pool, never on the async workers.

mod admin;
mod audit;
mod decrypt;
mod open;
mod values;

use crate::accounts::NodeAccounts;
use crate::authz::{Caller, Scope};
use crate::config::Config;
use crate::decrypt_pool::DecryptPool;
use crate::lifecycle::Lifecycle;
use crate::peer::Peer;
use crate::refusal::Refusal;
use crate::state::State;
use audit::Audit;
use nodeseal_client::protocol::{
    NamedError, NamedValue, Operation, Request, Response, SkippedLine, PROTOCOL_VERSION,
};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use zeroize::Zeroizing;

/// Answers requests from the shared state.
pub(crate) struct Handler {
    state: Arc<State>,
    /// RSA work runs here, one thread per core, so it never stalls the reactor.
    pool: DecryptPool,
    /// Revoke and restore are mutations: the lifecycle thread does them.
    lifecycle: Lifecycle,
    /// User and group names of audience selectors, resolved with a short cache.
    accounts: NodeAccounts,
}

/// Who asks, where, under which config: fixed for the whole request.
struct Context<'a> {
    config: Arc<Config>,
    caller: Caller,
    scope: &'a Scope,
}

/// A successful answer, one shape per kind of operation.
enum Answer {
    /// `get`, `open`.
    Value(Zeroizing<String>),
    /// `env`: the values that opened, those that did not, and lines that serve nothing.
    Values(Vec<NamedValue>, Vec<NamedError>, Vec<SkippedLine>),
    /// `list`, and lines that serve nothing.
    Names(Vec<String>, Vec<SkippedLine>),
    /// `health`, `status`, `revoke`, `restore`.
    Info(serde_json::Value),
}

impl Answer {
    fn report(report: &impl serde::Serialize) -> Result<Self, Refusal> {
        serde_json::to_value(report)
            .map(Self::Info)
            .map_err(|e| Refusal::Internal(format!("cannot serialize the report: {e}")))
    }

    fn into_response(self) -> Response {
        let mut r = Response::ok();
        match self {
            Self::Value(v) => r.value = Some(v),
            Self::Values(v, errors, skipped) => {
                r.values = Some(v);
                r.errors = (!errors.is_empty()).then_some(errors);
                r.skipped = (!skipped.is_empty()).then_some(skipped);
            }
            Self::Names(n, skipped) => {
                r.names = Some(n);
                r.skipped = (!skipped.is_empty()).then_some(skipped);
            }
            Self::Info(i) => r.info = Some(i),
        }
        r
    }
}

impl Handler {
    pub(crate) fn new(state: Arc<State>, lifecycle: Lifecycle) -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Self {
            state,
            pool: DecryptPool::new(cores),
            lifecycle,
            accounts: NodeAccounts::default(),
        }
    }

    pub(crate) fn state(&self) -> &Arc<State> {
        &self.state
    }

    /// Answer one request and log the decision.
    pub(crate) async fn handle(
        self: &Arc<Self>,
        peer: &Peer,
        scope: &Scope,
        request: Request,
    ) -> Response {
        let op = request.op.name();
        let cx = Context {
            config: self.state.config(),
            caller: peer.caller(),
            scope,
        };
        let mut audit = Audit::default();
        let result = if request.v != PROTOCOL_VERSION {
            Err(Refusal::UnsupportedVersion { asked: request.v })
        } else {
            self.dispatch(&cx, request.op, &mut audit).await
        };
        let counters = &self.state.counters;
        counters.requests.fetch_add(1, Ordering::Relaxed);
        let mut response = match result {
            Ok(answer) => {
                counters.ok.fetch_add(1, Ordering::Relaxed);
                answer.into_response()
            }
            Err(refusal) => {
                let code = refusal.code().as_str();
                counters.count_error(code);
                audit.outcome = Some(code);
                refusal.to_response()
            }
        };
        response.id = request.id;
        let outcome = audit.outcome.unwrap_or("ok");
        if crate::log_budget::audit(outcome, peer.uid, &cx.config.limits) {
            audit.log(peer, op);
        }
        response
    }

    async fn dispatch(
        self: &Arc<Self>,
        cx: &Context<'_>,
        op: Operation,
        audit: &mut Audit,
    ) -> Result<Answer, Refusal> {
        match op {
            Operation::Health => self.health(),
            Operation::Status => self.status(cx),
            Operation::Get { name, task } => self.get(cx, name, task.as_deref(), audit).await,
            Operation::Env { task } => self.env(cx, task.as_deref(), audit).await,
            Operation::List { task } => self.list(cx, task.as_deref(), audit),
            Operation::Open { token, name, task } => {
                self.open(cx, &token, name, task.as_deref(), audit).await
            }
            Operation::Revoke { thumbprint, purge } => {
                self.revoke(cx, &thumbprint, purge, audit).await
            }
            Operation::Restore { thumbprint } => self.restore(cx, &thumbprint, audit).await,
            _ => Err(Refusal::UnsupportedOperation),
        }
    }

    /// Stop the decrypt threads (after the last request is answered).
    pub(crate) fn shutdown(&self) {
        self.pool.shutdown();
    }
}
