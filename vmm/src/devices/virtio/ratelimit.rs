//! `warn_ratelimited!` moved to [`crate::logger`] (the API server uses it
//! too); this keeps the virtio devices' unqualified `warn_ratelimited!`
//! working. Each use still expands to its own call site's budget.

macro_rules! warn_ratelimited {
    ($($arg:tt)+) => {
        $crate::warn_ratelimited!($($arg)+)
    };
}
