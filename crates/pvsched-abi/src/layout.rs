//! Compile-time layout checks and the byte encoding of every raw ABI type.
//!
//! Each raw struct is described once here: its size and, per field, its
//! offset and type. The macro turns that description into compile-time
//! asserts (size, every offset, no hidden padding), a field table for
//! `pvsched abi layout`, and `to_bytes`/`from_bytes` for local copies.

use crate::raw::{
    PvschedCpuInfo, PvschedGuestLine, PvschedHeader, PvschedHeaderGuest, PvschedHeaderHost,
    PvschedHostLine, PvschedSlot,
};

/// One field of a raw ABI type, for layout listings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FieldInfo {
    /// Field name as in the C header.
    pub name: &'static str,
    /// Byte offset inside its struct.
    pub offset: usize,
    /// Size in bytes.
    pub size: usize,
}

/// Plain fixed-width values that have a native-endian byte encoding.
trait Wire: Sized {
    const SIZE: usize;
    fn put(&self, out: &mut [u8]);
    fn get(bytes: &[u8]) -> Self;
}

macro_rules! wire_int {
    ($($t:ty),*) => {$(
        impl Wire for $t {
            const SIZE: usize = core::mem::size_of::<$t>();
            fn put(&self, out: &mut [u8]) {
                out.copy_from_slice(&self.to_ne_bytes());
            }
            fn get(bytes: &[u8]) -> Self {
                let mut buf = [0u8; core::mem::size_of::<$t>()];
                buf.copy_from_slice(bytes);
                <$t>::from_ne_bytes(buf)
            }
        }
    )*};
}
wire_int!(u8, i8, u16, u32, u64);

impl<T: Wire + Copy + Default, const N: usize> Wire for [T; N] {
    const SIZE: usize = T::SIZE * N;
    fn put(&self, out: &mut [u8]) {
        for (item, chunk) in self.iter().zip(out.chunks_exact_mut(T::SIZE)) {
            item.put(chunk);
        }
    }
    fn get(bytes: &[u8]) -> Self {
        let mut items = [T::default(); N];
        for (item, chunk) in items.iter_mut().zip(bytes.chunks_exact(T::SIZE)) {
            *item = T::get(chunk);
        }
        items
    }
}

macro_rules! abi_layout {
    ($ty:ident, $size:expr, { $($field:ident : $fty:ty = $off:expr),* $(,)? }) => {
        const _: () = assert!(core::mem::size_of::<$ty>() == $size);
        $(
            const _: () = assert!(core::mem::offset_of!($ty, $field) == $off);
            // The declared type must be the field's type.
            const _: fn(&$ty) -> $fty = |s| s.$field;
        )*
        // No implicit padding: the fields cover the struct exactly.
        const _: () = assert!(0 $(+ core::mem::size_of::<$fty>())* == $size);

        impl $ty {
            /// Size of the encoded type in bytes.
            pub const SIZE: usize = $size;
            /// Every field with its offset and size, in layout order.
            pub const FIELDS: &'static [FieldInfo] = &[$(
                FieldInfo {
                    name: stringify!($field),
                    offset: $off,
                    size: core::mem::size_of::<$fty>(),
                },
            )*];

            /// Encodes the value in the shared-page layout (native endian).
            pub fn to_bytes(&self) -> [u8; $size] {
                let mut out = [0u8; $size];
                $( Wire::put(&self.$field, &mut out[$off..$off + <$fty as Wire>::SIZE]); )*
                out
            }

            /// Decodes a local copy of the shared-page bytes. Any bytes decode:
            /// validation is the job of the domain types.
            pub fn from_bytes(bytes: &[u8; $size]) -> Self {
                Self { $( $field: <$fty as Wire>::get(&bytes[$off..$off + <$fty as Wire>::SIZE]), )* }
            }
        }
    };
}

abi_layout!(PvschedHeaderHost, 64, {
    magic: u64 = 0,
    version_major: u16 = 8,
    version_minor: u16 = 10,
    header_size: u16 = 12,
    slot_size: u16 = 14,
    total_size: u32 = 16,
    nr_slots: u32 = 20,
    host_features: u64 = 24,
    host_heartbeat: u64 = 32,
    host_generation: u32 = 40,
    host_flags: u32 = 44,
    doorbell_peer: u16 = 48,
    doorbell_vectors: u16 = 50,
    reserved0: u32 = 52,
    cpu_info_offset: u32 = 56,
    reserved1: u32 = 60,
});

abi_layout!(PvschedCpuInfo, 16, {
    preempt_count_gpa: u64 = 0,
    cpu_id: u32 = 8,
    reserved: u32 = 12,
});

abi_layout!(PvschedHeaderGuest, 64, {
    guest_version_major: u16 = 0,
    guest_version_minor: u16 = 2,
    guest_nr_cpus: u32 = 4,
    guest_features: u64 = 8,
    guest_heartbeat: u64 = 16,
    guest_generation: u32 = 24,
    guest_state: u32 = 28,
    doorbells_rung: u64 = 32,
    doorbells_suppressed: u64 = 40,
    host_interrupts: u64 = 48,
    reserved: [u64; 1] = 56,
});

abi_layout!(PvschedGuestLine, 64, {
    seq: u32 = 0,
    cpu_id: u32 = 4,
    apic_id: u32 = 8,
    flags: u32 = 12,
    updates: u64 = 16,
    task_policy: u8 = 24,
    task_rt_prio: u8 = 25,
    task_nice: i8 = 26,
    irq_depth: u8 = 27,
    softirq_depth: u8 = 28,
    boost_request: u8 = 29,
    request_prio: u8 = 30,
    pending_prio: u8 = 31,
    rt_pending: u32 = 32,
    cs_depth: u32 = 36,
    cs_count: u64 = 40,
    irq_count: u64 = 48,
    spin_count: u32 = 56,
    request_reason: u8 = 60,
    reserved: [u8; 3] = 61,
});

abi_layout!(PvschedHostLine, 64, {
    seq: u32 = 0,
    pcpu: u32 = 4,
    boost_state: u8 = 8,
    preempted: u8 = 9,
    smt_sibling_busy: u8 = 10,
    host_policy: u8 = 11,
    host_prio: u8 = 12,
    reserved0: [u8; 3] = 13,
    pcpu_load_permille: u32 = 16,
    poll_hint_ns: u32 = 20,
    steal_ns: u64 = 24,
    throttle_until_ns: u64 = 32,
    host_time_ns: u64 = 40,
    boosts: u32 = 48,
    throttles: u32 = 52,
    boosted_ns: u64 = 56,
});

const _: () = assert!(core::mem::size_of::<PvschedHeader>() == 128);
const _: () = assert!(core::mem::offset_of!(PvschedHeader, guest) == 64);
const _: () = assert!(core::mem::size_of::<PvschedSlot>() == 128);
const _: () = assert!(core::mem::offset_of!(PvschedSlot, host) == 64);
const _: () = assert!(crate::raw::PVSCHED_HEADER_SIZE as usize == 128);
const _: () = assert!(crate::raw::PVSCHED_SLOT_SIZE as usize == 128);

/// Offset of the host line inside a slot.
pub const SLOT_HOST_LINE_OFFSET: usize = core::mem::offset_of!(PvschedSlot, host);
/// Offset of the guest line inside the header.
pub const HEADER_GUEST_LINE_OFFSET: usize = core::mem::offset_of!(PvschedHeader, guest);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_line_round_trips_through_bytes() {
        let line = PvschedGuestLine {
            seq: 2,
            cpu_id: 3,
            apic_id: 6,
            flags: 1,
            updates: 77,
            task_policy: 2,
            task_rt_prio: 50,
            task_nice: -5,
            irq_depth: 1,
            softirq_depth: 1,
            boost_request: 1,
            request_prio: 40,
            pending_prio: 30,
            rt_pending: 2,
            cs_depth: 1,
            cs_count: 9,
            irq_count: 10,
            spin_count: 11,
            request_reason: 1,
            reserved: [0; 3],
        };
        assert_eq!(PvschedGuestLine::from_bytes(&line.to_bytes()), line);
        assert_eq!(line.to_bytes()[26], (-5i8) as u8);
    }

    #[test]
    fn field_tables_are_contiguous() {
        for fields in [
            PvschedHeaderHost::FIELDS,
            PvschedHeaderGuest::FIELDS,
            PvschedGuestLine::FIELDS,
            PvschedHostLine::FIELDS,
        ] {
            let mut next = 0;
            for f in fields {
                assert_eq!(f.offset, next, "gap before {}", f.name);
                next += f.size;
            }
            assert_eq!(next, 64);
        }
    }
}
