//! The pvsched shared-page ABI: the single source of truth for the memory
//! that a guest kernel and the host daemon share.
//!
//! - [`raw`]: `#[repr(C)]` layout, constants, and the C header's source.
//! - [`layout`]: compile-time offset checks and byte encoding of local copies.
//! - [`seqlock`]: the publication protocol, generic so loom can check it.
//! - [`region`]: a bounds-checked, atomic-only accessor over the mapping.
//! - [`decode`]: validated domain types; guest-written data is hostile.
//! - `mmap` (feature `std`): an owning shared mapping of a file.
#![cfg_attr(not(test), no_std)]
#![warn(missing_docs)]

pub mod decode;
pub mod layout;
pub mod raw;
pub mod region;
pub mod seqlock;

#[cfg(feature = "std")]
pub mod mmap;

pub use decode::{
    decode_cpu_info, decode_guest_line, encode_guest_line, negotiate, new_host_header,
    preempt_disabled_bits, region_size_for, validate_header, BoostRequest, BoostState,
    CpuInfoError, CpuInfoTable, Doorbell, Geometry, GuestDoorbellCounters, GuestVcpuState,
    HeaderError, InvalidCounts, InvalidFields, MajorMismatch, Negotiation, RequestReasons,
    SchedPolicy, TaskInfo,
};
pub use region::{OutOfBounds, Region};
pub use seqlock::SeqRead;
