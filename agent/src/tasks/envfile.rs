//! One env file as the agent reads it: opened without following a link at its last component,
//! its task and job derived from where it sits, and each value classified as a v1 token, a
//! legacy Shipyard ciphertext or a plain value.

use nodeseal_envelope::token::{self, Format};
use nodeseal_envelope::Thumbprint;
use std::path::{Component, Path, PathBuf};
use zeroize::Zeroizing;

/// How a variable's value is stored in its env file.
pub(crate) enum ValueKind {
    /// Served as it is.
    Plain(Zeroizing<String>),
    /// A v1 token and the key ids it names.
    V1 {
        /// The token text.
        token: String,
        /// Its recipients.
        recipients: Vec<Thumbprint>,
    },
    /// A Batch Shipyard ciphertext (standard base64 of RSA PKCS#1 v1.5).
    Shipyard {
        /// The base64 text.
        token: String,
        /// Decoded length (the modulus length of the key that can open it).
        len: usize,
    },
    /// Looks like a v1 token but does not parse: served as an error, never as plain text.
    Invalid(String),
}

/// Env files larger than this are refused: a task must not make the agent read gigabytes.
const MAX_ENV_FILE_BYTES: u64 = 16 * 1024 * 1024;

/// The rules that classify values, taken from the config.
pub(crate) struct Classifier<'a> {
    /// Names whose values may be Shipyard ciphertexts.
    pub legacy_names: &'a [String],
    /// Also any value whose decoded length is an RSA modulus length nodeseal accepts.
    pub legacy_by_length: bool,
}

/// Modulus lengths of the RSA keys nodeseal accepts (2048, 3072, 4096 bits). Legacy detection
/// by length uses these rather than the keys loaded right now: otherwise a ciphertext whose key
/// is briefly missing would be reclassified as a plain value and served as it is.
const RSA_MODULUS_LENGTHS: [usize; 3] = [256, 384, 512];

impl Classifier<'_> {
    /// Classify one value.
    pub(crate) fn classify(&self, name: &str, value: &str) -> ValueKind {
        match token::detect(value) {
            Some(Format::V1) => match token::inspect(value) {
                Ok(info) => ValueKind::V1 {
                    token: value.to_owned(),
                    recipients: info.recipients,
                },
                Err(e) => ValueKind::Invalid(e.to_string()),
            },
            Some(Format::Shipyard) => {
                let len = nodeseal_envelope::legacy::decode(value).map_or(0, |d| d.len());
                let by_name = self.legacy_names.iter().any(|n| n == name);
                let by_length = self.legacy_by_length && RSA_MODULUS_LENGTHS.contains(&len);
                if by_name || by_length {
                    ValueKind::Shipyard {
                        token: value.to_owned(),
                        len,
                    }
                } else {
                    ValueKind::Plain(Zeroizing::new(value.to_owned()))
                }
            }
            _ => ValueKind::Plain(Zeroizing::new(value.to_owned())),
        }
    }
}

/// Read a regular file without following a symlink at its last component, and stat the very
/// file that was read: the owner decides who may read the values, so the check and the read
/// must concern the same inode.
pub(crate) fn read_no_follow(
    path: &Path,
) -> std::io::Result<(Zeroizing<Vec<u8>>, std::fs::Metadata)> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits() | nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    if meta.len() > MAX_ENV_FILE_BYTES {
        return Err(std::io::Error::other("larger than an env file can be"));
    }
    let mut bytes = Zeroizing::new(Vec::with_capacity(meta.len() as usize));
    file.read_to_end(&mut bytes)?;
    Ok((bytes, meta))
}

/// Task directory, job id and task id implied by an env file's path under `root`.
///
/// Batch lays tasks out as `workitems/<job>/job-1/<task>/wd/` (a job schedule adds a level
/// above the job); Shipyard writes its env file into `wd/`.
pub(crate) fn task_of(path: &Path, root: &Path) -> (PathBuf, Option<String>, Option<String>) {
    let parent = path.parent().unwrap_or(Path::new("/"));
    let task_dir = if parent.file_name().is_some_and(|n| n == "wd") {
        parent.parent().unwrap_or(parent).to_path_buf()
    } else {
        parent.to_path_buf()
    };
    let task_id = task_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned());
    let rel: Vec<String> = task_dir
        .strip_prefix(root)
        .map(|r| {
            r.components()
                .filter_map(|c| match c {
                    Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    // The job id sits just before the `job-<n>` level.
    let job_id = rel
        .iter()
        .position(|c| {
            c.strip_prefix("job-")
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        })
        .filter(|&i| i > 0)
        .map(|i| rel[i - 1].clone())
        .or_else(|| (rel.len() >= 2).then(|| rel[0].clone()));
    (task_dir, job_id, task_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_of_follows_the_batch_layout() {
        let root = Path::new("/mnt/batch/tasks/workitems");
        let (dir, job, task) = task_of(
            Path::new("/mnt/batch/tasks/workitems/myjob/job-1/task-3/wd/.shipyard.envlist"),
            root,
        );
        assert_eq!(
            dir,
            Path::new("/mnt/batch/tasks/workitems/myjob/job-1/task-3")
        );
        assert_eq!(job.as_deref(), Some("myjob"));
        assert_eq!(task.as_deref(), Some("task-3"));
        // A job schedule adds a level above the job.
        let (_, job, task) = task_of(
            Path::new("/mnt/batch/tasks/workitems/sched/myjob/job-1/t1/nodeseal.env"),
            root,
        );
        assert_eq!(job.as_deref(), Some("myjob"));
        assert_eq!(task.as_deref(), Some("t1"));
    }
}
