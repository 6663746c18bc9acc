//! What a projection does when its handler keeps failing on an event: the
//! [`FailurePolicy`] (retries with backoff, then stop or dead-letter).

use std::time::Duration;

/// What happens to an event whose handler still fails after the retries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnFailure {
    /// The slot stops: its state becomes `failed` with the error and the
    /// event's position (see `status`, metrics, `/readyz`); other
    /// projections go on. `resume` (or a restart) tries again. Nothing is
    /// skipped. The default.
    Stop,
    /// The event, the error and the attempt count go to the `dead_letters`
    /// table and processing continues with the next event. Later events of
    /// the same stream are handled without it: use this only where a read
    /// model can tolerate a missing event until `dlq retry`.
    DeadLetter,
}

/// Retries and the final action for a failing event. Defaults: 3 attempts,
/// backoff 100 ms doubling up to 5 s, then [`OnFailure::Stop`].
///
/// When a batch fails, the engine re-runs its events one by one (each in a
/// savepoint), commits the good ones before the failing event, and retries
/// that event alone; so good events around a poison event are applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FailurePolicy {
    pub(crate) attempts: u32,
    pub(crate) initial_backoff: Duration,
    pub(crate) max_backoff: Duration,
    pub(crate) on_failure: OnFailure,
}

impl Default for FailurePolicy {
    fn default() -> FailurePolicy {
        FailurePolicy {
            attempts: 3,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            on_failure: OnFailure::Stop,
        }
    }
}

impl FailurePolicy {
    /// Retries, then stops the slot (the default).
    pub fn stop() -> FailurePolicy {
        FailurePolicy::default()
    }

    /// Retries, then dead-letters the event and continues.
    pub fn dead_letter() -> FailurePolicy {
        FailurePolicy {
            on_failure: OnFailure::DeadLetter,
            ..FailurePolicy::default()
        }
    }

    /// Total attempts for a failing event, the first included (at least
    /// 1). Default: 3.
    pub fn attempts(mut self, attempts: u32) -> FailurePolicy {
        self.attempts = attempts.max(1);
        self
    }

    /// Backoff between attempts: `initial`, doubling, capped at `max`.
    /// Default: 100 ms up to 5 s.
    pub fn backoff(mut self, initial: Duration, max: Duration) -> FailurePolicy {
        self.initial_backoff = initial;
        self.max_backoff = max.max(initial);
        self
    }

    /// The final action.
    pub fn on_failure(&self) -> OnFailure {
        self.on_failure
    }

    /// The delay before attempt `n` (2, 3, …).
    pub(crate) fn delay_before(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(2).min(30);
        self.initial_backoff
            .saturating_mul(1u32 << doublings)
            .min(self.max_backoff)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let p = FailurePolicy::dead_letter()
            .attempts(6)
            .backoff(Duration::from_millis(100), Duration::from_millis(350));
        let d: Vec<u128> = (2..=6).map(|a| p.delay_before(a).as_millis()).collect();
        assert_eq!(d, vec![100, 200, 350, 350, 350]);
        assert_eq!(p.on_failure(), OnFailure::DeadLetter);
        assert_eq!(FailurePolicy::default().on_failure(), OnFailure::Stop);
    }
}
