//! KVM's adaptive halt-polling window as pure functions (seed 002).
//!
//! After each halt, KVM adjusts the vCPU's polling window from how long the
//! vCPU stayed blocked: a block shorter than the global maximum grows the
//! window (×`grow`, starting at `grow_start_ns`), a block longer than the
//! maximum or a wakeup for an invalid reason shrinks it (÷`shrink`, 0 =
//! reset), and the window never exceeds the global maximum.

use serde::{Deserialize, Serialize};

use crate::Nanos;

/// Parameters of the algorithm (KVM's module parameters).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HaltPollParams {
    /// Global maximum window (`halt_poll_ns`); 0 disables polling.
    pub max_ns: u32,
    /// Growth factor (`halt_poll_ns_grow`); 0 disables growth.
    pub grow: u32,
    /// First non-zero window (`halt_poll_ns_grow_start`).
    pub grow_start_ns: u32,
    /// Shrink divisor (`halt_poll_ns_shrink`); 0 resets the window to 0.
    pub shrink: u32,
    /// A shrunk window below `grow_start_ns` drops to 0 (kernels since 5.0).
    pub reset_below_start: bool,
}

impl HaltPollParams {
    /// x86 KVM before 5.0: shrink resets the window.
    pub const KVM_LEGACY: Self = Self {
        max_ns: 200_000,
        grow: 2,
        grow_start_ns: 10_000,
        shrink: 0,
        reset_below_start: false,
    };
    /// x86 KVM today: shrink halves, below the start the window drops to 0.
    pub const KVM_CURRENT: Self = Self {
        max_ns: 200_000,
        grow: 2,
        grow_start_ns: 10_000,
        shrink: 2,
        reset_below_start: true,
    };
    /// The guest's `cpuidle-haltpoll` defaults.
    pub const GUEST_HALTPOLL: Self = Self {
        max_ns: 200_000,
        grow: 2,
        grow_start_ns: 50_000,
        shrink: 2,
        reset_below_start: true,
    };

    /// A preset by name (`kvm-legacy`, `kvm-current`, `guest-haltpoll`).
    pub fn preset(name: &str) -> Option<Self> {
        match name {
            "kvm-legacy" => Some(Self::KVM_LEGACY),
            "kvm-current" => Some(Self::KVM_CURRENT),
            "guest-haltpoll" => Some(Self::GUEST_HALTPOLL),
            _ => None,
        }
    }
}

/// The grown window.
pub fn grow(p: &HaltPollParams, window_ns: u32) -> u32 {
    if p.grow == 0 {
        return window_ns;
    }
    window_ns
        .saturating_mul(p.grow)
        .max(p.grow_start_ns)
        .min(p.max_ns)
}

/// The shrunk window.
pub fn shrink(p: &HaltPollParams, window_ns: u32) -> u32 {
    // A zero divisor means "reset", as in KVM.
    let value = window_ns.checked_div(p.shrink).unwrap_or(0);
    if p.reset_below_start && value < p.grow_start_ns {
        0
    } else {
        value
    }
}

/// The window after a halt that blocked for `block_ns`, KVM's
/// `kvm_vcpu_halt` update: `valid_wakeup` is false when the vCPU woke for a
/// reason that polling could not have caught.
pub fn after_block(p: &HaltPollParams, window_ns: u32, block_ns: Nanos, valid_wakeup: bool) -> u32 {
    if p.max_ns == 0 {
        return 0;
    }
    let window_ns = window_ns.min(p.max_ns);
    let max = Nanos::from(p.max_ns);
    if !valid_wakeup {
        shrink(p, window_ns)
    } else if block_ns <= Nanos::from(window_ns) {
        // The poll caught the wakeup: keep the window.
        window_ns
    } else if window_ns > 0 && block_ns > max {
        // A long block: polling only burned CPU.
        shrink(p, window_ns)
    } else if window_ns < p.max_ns && block_ns < max {
        // A short block the window was too small to catch.
        grow(p, window_ns)
    } else {
        window_ns
    }
}

/// Parameters scaled to the load of the pCPU: polling a pCPU that others
/// want takes time from them, so the maximum shrinks as load rises and
/// polling stops above 90% load.
pub fn tuned_for_load(p: &HaltPollParams, load_permille: u32) -> HaltPollParams {
    let load = load_permille.min(1000);
    let max_ns = if load >= 900 {
        0
    } else {
        (u64::from(p.max_ns) * u64::from(1000 - load) / 1000) as u32
    };
    HaltPollParams {
        max_ns: if max_ns < p.grow_start_ns { 0 } else { max_ns },
        ..*p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CUR: HaltPollParams = HaltPollParams::KVM_CURRENT;
    const OLD: HaltPollParams = HaltPollParams::KVM_LEGACY;

    #[test]
    fn short_blocks_grow_from_the_base_by_the_factor_up_to_the_cap() {
        let mut window = 0;
        let mut seen = vec![];
        for _ in 0..8 {
            window = after_block(&CUR, window, 199_000, true);
            seen.push(window);
        }
        assert_eq!(
            seen,
            [10_000, 20_000, 40_000, 80_000, 160_000, 200_000, 200_000, 200_000]
        );
    }

    #[test]
    fn a_block_caught_by_the_poll_keeps_the_window() {
        assert_eq!(after_block(&CUR, 40_000, 30_000, true), 40_000);
        assert_eq!(after_block(&CUR, 40_000, 40_000, true), 40_000);
    }

    #[test]
    fn long_blocks_shrink_and_legacy_resets() {
        assert_eq!(after_block(&CUR, 200_000, 5_000_000, true), 100_000);
        assert_eq!(after_block(&CUR, 100_000, 5_000_000, true), 50_000);
        // Below the start the current kernel drops to zero.
        assert_eq!(after_block(&CUR, 15_000, 5_000_000, true), 0);
        assert_eq!(after_block(&OLD, 200_000, 5_000_000, true), 0);
        // A zero window stays zero on a long block.
        assert_eq!(after_block(&CUR, 0, 5_000_000, true), 0);
    }

    #[test]
    fn invalid_wakeups_shrink() {
        assert_eq!(after_block(&CUR, 160_000, 1_000, false), 80_000);
        assert_eq!(after_block(&OLD, 160_000, 1_000, false), 0);
    }

    #[test]
    fn a_block_between_window_and_max_grows_and_at_max_holds() {
        assert_eq!(after_block(&CUR, 20_000, 199_999, true), 40_000);
        assert_eq!(after_block(&CUR, 200_000, 200_000, true), 200_000);
        // A window above a lowered maximum is clamped first.
        let lowered = HaltPollParams {
            max_ns: 50_000,
            ..CUR
        };
        assert_eq!(after_block(&lowered, 200_000, 40_000, true), 50_000);
    }

    #[test]
    fn disabled_polling_and_growth() {
        let off = HaltPollParams { max_ns: 0, ..CUR };
        assert_eq!(after_block(&off, 80_000, 1_000, true), 0);
        let no_grow = HaltPollParams { grow: 0, ..CUR };
        assert_eq!(after_block(&no_grow, 0, 1_000, true), 0);
    }

    #[test]
    fn presets_and_load_tuning() {
        assert_eq!(
            HaltPollParams::preset("guest-haltpoll")
                .unwrap()
                .grow_start_ns,
            50_000
        );
        assert!(HaltPollParams::preset("nope").is_none());
        assert_eq!(tuned_for_load(&CUR, 0).max_ns, 200_000);
        assert_eq!(tuned_for_load(&CUR, 500).max_ns, 100_000);
        assert_eq!(tuned_for_load(&CUR, 950).max_ns, 0);
        assert_eq!(tuned_for_load(&CUR, 5000).max_ns, 0);
        assert_eq!(tuned_for_load(&CUR, 899).max_ns, 20_200);
    }
}
