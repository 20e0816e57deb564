//! `open`: a token the caller presents (not one from an env file), opened if the `open` policy
//! lets the caller use the key it names.

use super::audit::Audit;
use super::{Answer, Context, Handler};
use crate::authz::{self, OpenPolicy};
use crate::refusal::Refusal;
use nodeseal_envelope::legacy;
use nodeseal_envelope::token::{self, Format};

impl Handler {
    pub(super) async fn open(
        &self,
        cx: &Context<'_>,
        token_text: &str,
        name: Option<String>,
        audit: &mut Audit,
    ) -> Result<Answer, Refusal> {
        audit.secret_name = name.clone();
        let policy = OpenPolicy::of(&cx.config);
        let (value, key) = match token::detect(token_text) {
            Some(Format::V1) => {
                let info = token::inspect(token_text)?;
                let allowed =
                    authz::openable_recipients(&cx.caller, cx.scope, &policy, &info.recipients)?;
                let uid = cx.caller.uid;
                self.open_v1(
                    &cx.config,
                    uid,
                    token_text,
                    &allowed,
                    Some(name.as_deref().unwrap_or("")),
                )
                .await?
            }
            Some(Format::Shipyard) => {
                let len = legacy::decode(token_text).map_or(0, |d| d.len());
                let key = self.legacy_key_for(&cx.config, len)?;
                authz::openable_recipients(&cx.caller, cx.scope, &policy, &[key.thumbprint()])?;
                self.open_shipyard(&cx.config, cx.caller.uid, token_text, len)
                    .await?
            }
            _ => return Err(Refusal::NotAToken),
        };
        audit.key_id = Some(key);
        Ok(Answer::Value(value))
    }
}
