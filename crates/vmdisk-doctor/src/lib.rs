//! placeholder
pub mod machines;
pub mod nixconf;
pub mod probe;
pub mod uri;
