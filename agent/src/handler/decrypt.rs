//! Turning a stored or presented value into cleartext: the per-value cache policy, v1 tokens,
//! legacy Shipyard ciphertexts and the choice of the one key that may open them, all RSA work on
//! the decrypt pool.

use super::{Context, Handler};
use crate::authz::{self, Audience, Opening, Origin, TaskIds};
use crate::config::Config;
use crate::refusal::Refusal;
use crate::tasks::{Cached, EnvEntry, ValueKind};
use nodeseal_envelope::audience::Selector;
use nodeseal_envelope::token;
use nodeseal_envelope::{legacy, KeyPair, Thumbprint, TokenError};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use zeroize::Zeroizing;

/// The audience a v1 token names (empty: unbound), read from its header without any RSA work.
pub(super) fn v1_audience(token_text: &str) -> Result<Vec<Selector>, Refusal> {
    Ok(token::inspect(token_text)?.audience)
}

/// The policy's view of an audience list.
pub(super) fn audience_of(selectors: &[Selector]) -> Audience<'_> {
    if selectors.is_empty() {
        Audience::Unbound
    } else {
        Audience::Bound(selectors)
    }
}

/// The policy let this caller have this value: the audience it approved (empty for unbound
/// and unsealed values). Only [`Handler::authorize`] makes one, and [`Handler::resolve`] needs
/// one, so no stored value is opened (or served from cache) without a decision.
pub(super) struct Approved(Vec<Selector>);

impl Handler {
    /// Whether the caller may have variable `index` of `entry` (a file of a task it may read):
    /// the policy's decision for sealed values, before the cache is looked at and before any RSA
    /// work. Plain values are not sealed and need no decision; invalid ones fail when resolved.
    pub(super) fn authorize(
        &self,
        cx: &Context<'_>,
        entry: &EnvEntry,
        index: usize,
    ) -> Result<Approved, Refusal> {
        let mut audience = Vec::new();
        let (policy_audience, keys): (Audience<'_>, &[Thumbprint]) = match &entry.vars[index].kind {
            ValueKind::Plain(_) | ValueKind::Invalid(_) => return Ok(Approved(audience)),
            ValueKind::V1 { token, recipients } => {
                audience = v1_audience(token)?;
                (audience_of(&audience), recipients)
            }
            // Which key opens it is decided when it is opened; an env-file value needs none here.
            ValueKind::Shipyard { .. } => (Audience::Unbound, &[]),
        };
        let opening = Opening {
            caller: &cx.caller,
            scope: cx.scope,
            origin: Origin::EnvFile {
                owner: entry.owner_uid,
                task: TaskIds {
                    job: entry.job_id.as_deref(),
                    task: entry.task_id.as_deref(),
                },
            },
            audience: policy_audience,
            keys,
        };
        authz::decide(&opening, &authz::Policy::of(&cx.config), &self.accounts)?;
        Ok(Approved(audience))
    }

    /// The cleartext of variable `index` of `entry`, from cache or by decrypting.
    pub(super) async fn resolve(
        &self,
        config: &Config,
        uid: u32,
        entry: &Arc<EnvEntry>,
        index: usize,
        approved: Approved,
    ) -> Result<(Arc<Zeroizing<String>>, Option<Thumbprint>), Refusal> {
        let var = &entry.vars[index];
        match &var.kind {
            ValueKind::Plain(v) => return Ok((v.clone(), None)),
            ValueKind::Invalid(reason) => {
                return Err(Refusal::InvalidStoredToken {
                    reason: reason.clone(),
                })
            }
            _ => {}
        }
        {
            let cache = var.cache.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(c) = cache.as_ref() {
                if c.expires > Instant::now() && !self.state.keys.is_revoked(&c.key) {
                    return Ok((c.value.clone(), Some(c.key)));
                }
            }
        }
        let (value, key) = match &var.kind {
            ValueKind::V1 { token, recipients } => {
                self.open_v1(config, uid, token, recipients, Some(&var.name), approved.0)
                    .await?
            }
            ValueKind::Shipyard { token, len } => {
                self.open_shipyard(config, uid, token, *len).await?
            }
            ValueKind::Plain(_) | ValueKind::Invalid(_) => {
                unreachable!("plain and invalid values returned above")
            }
        };
        let value = Arc::new(value);
        let ttl = Duration::from_secs(config.cache_ttl_secs);
        if !ttl.is_zero() {
            let mut slot = var.cache.lock().unwrap_or_else(|e| e.into_inner());
            // The value it replaces gives its memory back first. Charged to the file's owner,
            // who decides what the file holds; over budget, it is served but not kept.
            *slot = None;
            let cost = Cached::cost(value.len());
            let budget = config.limits.memory_budget_per_uid;
            if let Ok(charge) = self
                .state
                .memory
                .try_charge(entry.owner_uid, cost, budget, 0)
            {
                *slot = Some(Cached {
                    value: value.clone(),
                    key,
                    expires: Instant::now() + ttl,
                    _memory: charge,
                });
            }
        }
        Ok((value, Some(key)))
    }

    /// Open a v1 token for `uid`: one RSA operation per held recipient key, each charged to
    /// `uid` and queued on its own, tried in token order until one unwraps the content key.
    pub(super) async fn open_v1(
        &self,
        config: &Config,
        uid: u32,
        token_text: &str,
        recipients: &[Thumbprint],
        name: Option<&str>,
        approved: Vec<Selector>,
    ) -> Result<(Zeroizing<String>, Thumbprint), Refusal> {
        // A key named twice would be tried twice: refused before any RSA work.
        for (i, tp) in recipients.iter().enumerate() {
            if recipients[..i].contains(tp) {
                return Err(Refusal::DuplicateRecipient { key: *tp });
            }
        }
        let keys: Vec<Arc<KeyPair>> = recipients
            .iter()
            .filter_map(|tp| self.state.keys.get(tp).ok())
            .collect();
        if keys.is_empty() {
            // A key that stays in Key Vault opens there (`crate::keyvault`). Its unwrap is a
            // private-key operation like a local one: charged to the caller first.
            if recipients.iter().any(|tp| self.state.remote.knows(tp)) {
                self.pool.charge_operation(uid, &config.limits).await?;
            }
            if let Some(opened) = self
                .state
                .remote
                .open_v1(&self.state.keys, token_text, recipients, name, &approved)
                .await
            {
                let (value, key) = opened?;
                self.state.keys.count_open(&key);
                return Ok((utf8(value)?, key));
            }
            return Err(Refusal::NoKeyAvailable {
                recipients: recipients.to_vec(),
            });
        }
        let token_text: Arc<str> = Arc::from(token_text);
        let name: Option<Arc<str>> = name.map(Arc::from);
        let approved: Arc<[Selector]> = Arc::from(approved);
        for key in keys {
            let token_text = token_text.clone();
            let name = name.clone();
            let approved = approved.clone();
            let opened = self
                .blocking(config, uid, move || {
                    let tp = key.thumbprint();
                    let lookup = |t: &Thumbprint| (*t == tp).then(|| key.clone());
                    // The policy decided on the audience the header named (authz::decide); the
                    // token opens only if that is the audience it authenticates.
                    let decided = |audience: &[Selector]| audience == &approved[..];
                    token::open_v1(
                        &token_text,
                        &lookup,
                        name.as_deref(),
                        &decided,
                        SystemTime::now(),
                    )
                })
                .await?;
            match opened {
                Ok(opened) => {
                    self.state.keys.count_open(&opened.key);
                    return Ok((utf8(opened.value)?, opened.key));
                }
                // This key's wrapped copy did not open: the next held key may.
                Err(TokenError::Tampered) => continue,
                Err(e) => return Err(Refusal::from_open_error(e)),
            }
        }
        Err(Refusal::from_open_error(TokenError::Tampered))
    }

    /// The one key that may open a legacy ciphertext of `len` bytes: `legacy_key` if set, else
    /// the only loaded key of that size. Never several: with implicit rejection a wrong key
    /// "succeeds" with garbage, so trying keys in turn would serve a wrong value.
    pub(super) fn legacy_key_for(
        &self,
        config: &Config,
        len: usize,
    ) -> Result<Arc<KeyPair>, Refusal> {
        let keys = &self.state.keys;
        if let Some(tp) = config.legacy_key {
            return match keys.get(&tp) {
                Ok(k) if k.modulus_len() == len => Ok(k),
                Ok(k) => Err(Refusal::LegacyKeySizeMismatch {
                    ciphertext_bits: len * 8,
                    key: tp,
                    key_bits: k.bits(),
                }),
                Err(_) => Err(Refusal::LegacyKeyUnavailable { key: tp }),
            };
        }
        let mut candidates = keys.with_modulus_len(len);
        match candidates.len() {
            0 => Err(Refusal::NoLegacyKey { bits: len * 8 }),
            1 => Ok(candidates.remove(0)),
            count => Err(Refusal::AmbiguousLegacyKey {
                count,
                bits: len * 8,
            }),
        }
    }

    pub(super) async fn open_shipyard(
        &self,
        config: &Config,
        uid: u32,
        token_text: &str,
        len: usize,
    ) -> Result<(Zeroizing<String>, Thumbprint), Refusal> {
        let key = self.legacy_key_for(config, len)?;
        let token_text = token_text.to_owned();
        let tp = key.thumbprint();
        let value = self
            .blocking(config, uid, move || legacy::open(&token_text, &key))
            .await??;
        self.state.keys.count_open(&tp);
        Ok((utf8(value)?, tp))
    }

    /// Run one RSA operation for `uid` on the decrypt pool, charged to `uid` before it runs.
    async fn blocking<T: Send + 'static>(
        &self,
        config: &Config,
        uid: u32,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Refusal> {
        let counters = self.state.clone();
        self.pool
            .run(uid, &config.limits, move || {
                // Counted when it runs, so a refused operation never moves the counter.
                counters.counters.decrypts.fetch_add(1, Ordering::Relaxed);
                f()
            })
            .await
    }
}

fn utf8(bytes: Zeroizing<Vec<u8>>) -> Result<Zeroizing<String>, Refusal> {
    match std::str::from_utf8(&bytes) {
        Ok(s) => Ok(Zeroizing::new(s.to_owned())),
        Err(_) => Err(Refusal::NotUtf8),
    }
}
