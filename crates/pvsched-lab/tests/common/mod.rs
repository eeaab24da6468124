//! Prerequisites shared by the end-to-end tests: see [`pvsched_lab::testing`].

pub use pvsched_lab::testing::assets_or_skip;
