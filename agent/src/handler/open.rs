//! `open`: a token the caller presents (not one from an env file), opened if the policy lets
//! this caller, in its task if it has one, open it (`authz::decide`).

use super::audit::Audit;
use super::decrypt::audience_of;
use super::{Answer, Context, Handler};
use crate::authz::{self, Audience, Opening, Origin, Policy, TaskIds};
use crate::refusal::Refusal;
use nodeseal_envelope::legacy;
use nodeseal_envelope::token::{self, Format};

impl Handler {
    pub(super) async fn open(
        &self,
        cx: &Context<'_>,
        token_text: &str,
        name: Option<String>,
        task: Option<&str>,
        audit: &mut Audit,
    ) -> Result<Answer, Refusal> {
        audit.secret_name = name.clone();
        let ids = self.task_of_opener(cx, task)?;
        audit.job_id.clone_from(&ids.0);
        audit.task_id.clone_from(&ids.1);
        let task_ids = (ids.0.is_some() || ids.1.is_some()).then_some(TaskIds {
            job: ids.0.as_deref(),
            task: ids.1.as_deref(),
        });
        let policy = Policy::of(&cx.config);
        let decide = |audience, keys: &[_]| {
            let opening = Opening {
                caller: &cx.caller,
                scope: cx.scope,
                origin: Origin::Presented { task: task_ids },
                audience,
                keys,
            };
            authz::decide(&opening, &policy, &self.accounts)
        };
        let (value, key) = match token::detect(token_text) {
            Some(Format::V1) => {
                let info = token::inspect(token_text)?;
                let allowed = decide(audience_of(&info.audience), &info.recipients)?;
                self.open_v1(
                    &cx.config,
                    cx.caller.uid,
                    token_text,
                    &allowed,
                    Some(name.as_deref().unwrap_or("")),
                    info.audience,
                )
                .await?
            }
            Some(Format::Shipyard) => {
                let len = legacy::decode(token_text).map_or(0, |d| d.len());
                let key = match self.legacy_key_for(&cx.config, len) {
                    Ok(key) => key,
                    Err(unavailable) => {
                        authz::may_present_unbound(&cx.caller, &policy)?;
                        return Err(unavailable);
                    }
                };
                decide(Audience::Unbound, &[key.thumbprint()])?;
                self.open_shipyard(&cx.config, cx.caller.uid, token_text, len)
                    .await?
            }
            _ => return Err(Refusal::NotAToken),
        };
        audit.key_id = Some(key);
        Ok(Answer::Value(value))
    }

    /// The job and task ids of the task the caller opens for (`authz::task_for_open`): a task
    /// it names must be one it may read, with the same refusal as `get` so that nothing is
    /// learnt about other tasks; an implied task that has no env file known gives no context.
    fn task_of_opener(
        &self,
        cx: &Context<'_>,
        asked: Option<&str>,
    ) -> Result<(Option<String>, Option<String>), Refusal> {
        let tasks = &self.state.tasks;
        let Some(dir) = authz::task_for_open(&cx.caller, cx.scope, asked, |uid| {
            tasks.task_dirs_owned_by(uid)
        })?
        else {
            return Ok((None, None));
        };
        let entries = tasks.entries_of(&dir);
        let owners: Vec<u32> = entries.iter().map(|e| e.owner_uid).collect();
        match authz::readable_files(&cx.caller, cx.scope, &dir, &owners) {
            Ok(readable) => {
                let e = &entries[readable[0]];
                Ok((e.job_id.clone(), e.task_id.clone()))
            }
            Err(_) if asked.is_none() => Ok((None, None)),
            Err(refusal) => Err(refusal),
        }
    }
}
