//! The `ganomalyd` subcommands, one module each with its `Args` and `run`
//! (moonfire-nvr's `cmds/`). The stages they drive live at the top of the
//! crate; nothing here is on the frame path.

pub mod bench;
pub mod calibrate;
pub mod cameras;
pub mod check_config;
pub mod record;
pub mod run;
pub mod score;
pub mod verdicts;
pub mod watch;
