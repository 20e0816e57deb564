//! Turning a stored or presented value into cleartext: the per-value cache policy, v1 tokens,
//! legacy Shipyard ciphertexts and the choice of the one key that may open them, all RSA work on
//! the decrypt pool.

use super::Handler;
use crate::config::Config;
use crate::refusal::Refusal;
use crate::tasks::{Cached, EnvEntry, ValueKind};
use nodeseal_envelope::token;
use nodeseal_envelope::{legacy, KeyPair, Thumbprint};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use zeroize::Zeroizing;

impl Handler {
    /// The cleartext of variable `index` of `entry`, from cache or by decrypting.
    pub(super) async fn resolve(
        &self,
        config: &Config,
        entry: &Arc<EnvEntry>,
        index: usize,
    ) -> Result<(Arc<Zeroizing<String>>, Option<Thumbprint>), Refusal> {
        let var = &entry.vars[index];
        match &var.kind {
            ValueKind::Plain(v) => return Ok((Arc::new(v.clone()), None)),
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
                self.open_v1(token, recipients, Some(&var.name)).await?
            }
            ValueKind::Shipyard { token, len } => self.open_shipyard(config, token, *len).await?,
            ValueKind::Plain(_) | ValueKind::Invalid(_) => {
                unreachable!("plain and invalid values returned above")
            }
        };
        let value = Arc::new(value);
        let ttl = Duration::from_secs(config.cache_ttl_secs);
        if !ttl.is_zero() {
            *var.cache.lock().unwrap_or_else(|e| e.into_inner()) = Some(Cached {
                value: value.clone(),
                key,
                expires: Instant::now() + ttl,
            });
        }
        Ok((value, Some(key)))
    }

    pub(super) async fn open_v1(
        &self,
        token_text: &str,
        recipients: &[Thumbprint],
        name: Option<&str>,
    ) -> Result<(Zeroizing<String>, Thumbprint), Refusal> {
        let keys: Vec<Arc<KeyPair>> = recipients
            .iter()
            .filter_map(|tp| self.state.keys.get(tp).ok())
            .collect();
        if keys.is_empty() {
            // A key that stays in Key Vault opens there (`crate::keyvault`).
            if let Some(opened) = self
                .state
                .remote
                .open_v1(&self.state.keys, token_text, recipients, name)
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
        let token_text = token_text.to_owned();
        let name = name.map(str::to_owned);
        let opened = self
            .blocking(move || {
                let lookup = |tp: &Thumbprint| keys.iter().find(|k| k.thumbprint() == *tp).cloned();
                token::open_v1(&token_text, &lookup, name.as_deref(), SystemTime::now())
            })
            .await??;
        self.state.keys.count_open(&opened.key);
        Ok((utf8(opened.value)?, opened.key))
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
        token_text: &str,
        len: usize,
    ) -> Result<(Zeroizing<String>, Thumbprint), Refusal> {
        let key = self.legacy_key_for(config, len)?;
        let token_text = token_text.to_owned();
        let tp = key.thumbprint();
        let value = self
            .blocking(move || legacy::open(&token_text, &key))
            .await??;
        self.state.keys.count_open(&tp);
        Ok((utf8(value)?, tp))
    }

    /// Run RSA work on the decrypt pool.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Refusal> {
        self.state.counters.decrypts.fetch_add(1, Ordering::Relaxed);
        self.pool.run(f).await.ok_or(Refusal::ShuttingDown)
    }
}

fn utf8(bytes: Zeroizing<Vec<u8>>) -> Result<Zeroizing<String>, Refusal> {
    match std::str::from_utf8(&bytes) {
        Ok(s) => Ok(Zeroizing::new(s.to_owned())),
        Err(_) => Err(Refusal::NotUtf8),
    }
}
