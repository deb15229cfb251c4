//! The modules of ksmvm-bench, shared by its subcommands (src/main.rs):
//! the KSM density demo, benchmarks and density experiments for ksmvm.
//! Guests are started by the test kit's launcher (`ksmvm-testkit`,
//! tests/kit) through [`guest`]. See docs/benchmarks.md and docs/density.md.

pub mod boot;
pub mod cancel;
pub mod caps;
pub mod common;
pub mod compare;
pub mod convergence;
pub mod demo;
pub mod density;
pub mod fleet;
pub mod guest;
pub mod host;
pub mod io;
pub mod ksm_session;
pub mod ksmd;
pub mod machine;
pub mod monitor;
pub mod output;
pub mod plot;
pub mod profile;
pub mod shell;
pub mod summary;
pub mod table;
pub mod tuning;
pub mod vmstats;
