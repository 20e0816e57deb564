//! When a file that is still being written may be read: a file whose last line has no newline
//! could be half a value. The decision takes the file's age as input so tests drive it directly.

use std::time::Duration;

/// A file whose last line has no newline is read as complete only once its writer has closed it
/// and it has not changed for this long (several quick appends stay one write)...
pub(crate) const SETTLE: Duration = Duration::from_millis(300);
/// ...or, when no close was seen (a writer holding the file open, or lost events), once it has
/// not changed for this long.
pub(crate) const UNTERMINATED_GRACE: Duration = Duration::from_secs(5);

/// Whether a file may be served: complete (its last line ends in a newline), or unterminated
/// but closed by its writer at least [`SETTLE`] ago, or unchanged for [`UNTERMINATED_GRACE`]
/// whatever the watcher saw. `age` is the time since its last modification (`None`: unknown,
/// e.g. a clock step backwards, which counts as old).
pub(crate) fn is_settled(terminated: bool, writer_closed: bool, age: Option<Duration>) -> bool {
    let age = age.unwrap_or(Duration::MAX);
    terminated || (writer_closed && age >= SETTLE) || age >= UNTERMINATED_GRACE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unterminated_file_waits_for_its_writer_or_the_grace_period() {
        let ms = Duration::from_millis;
        assert!(is_settled(true, false, Some(ms(0))));
        assert!(!is_settled(false, false, Some(ms(0))));
        assert!(!is_settled(false, true, Some(SETTLE - ms(1))));
        assert!(is_settled(false, true, Some(SETTLE)));
        assert!(!is_settled(false, false, Some(UNTERMINATED_GRACE - ms(1))));
        assert!(is_settled(false, false, Some(UNTERMINATED_GRACE)));
        assert!(is_settled(false, false, None));
    }
}
