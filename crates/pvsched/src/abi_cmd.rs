//! `pvsched abi`: print the layout, decode a shared file.

use std::path::PathBuf;
use std::sync::atomic::AtomicU64;

use anyhow::{bail, Context};
use clap::Subcommand;
use pvsched_abi::decode::host_line_problems;
use pvsched_abi::layout::FieldInfo;
use pvsched_abi::raw::*;
use pvsched_abi::{decode_guest_line, negotiate, validate_header, InvalidFields, Region, SeqRead};

/// `pvsched abi` subcommands.
#[derive(Subcommand)]
pub enum AbiCommand {
    /// Print every field's offset and size.
    Layout,
    /// Decode a shared file: the header and both lines of every vCPU slot.
    Dump {
        /// The shared file (for example /dev/shm/pvsched-VM).
        file: PathBuf,
    },
}

/// Runs an `abi` subcommand.
pub fn run(cmd: AbiCommand) -> anyhow::Result<()> {
    match cmd {
        AbiCommand::Layout => {
            print!("{}", layout_text());
            Ok(())
        }
        AbiCommand::Dump { file } => {
            let bytes =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let (text, ok) = dump_text(&bytes);
            print!("{text}");
            if !ok {
                bail!("{} is not a valid pvsched region", file.display());
            }
            Ok(())
        }
    }
}

fn layout_text() -> String {
    let mut out = format!(
        "pvsched ABI {PVSCHED_VERSION_MAJOR}.{PVSCHED_VERSION_MINOR}: header {PVSCHED_HEADER_SIZE} bytes at 0, \
         then one {PVSCHED_SLOT_SIZE}-byte slot per vCPU at {PVSCHED_HEADER_SIZE} + index * {PVSCHED_SLOT_SIZE}\n"
    );
    let sections: [(&str, usize, &[FieldInfo]); 4] = [
        ("header.host (host-written)", 0, PvschedHeaderHost::FIELDS),
        (
            "header.guest (guest-written)",
            64,
            PvschedHeaderGuest::FIELDS,
        ),
        (
            "slot.guest (guest-written, seqlock)",
            0,
            PvschedGuestLine::FIELDS,
        ),
        (
            "slot.host (host-written, seqlock)",
            64,
            PvschedHostLine::FIELDS,
        ),
    ];
    for (name, base, fields) in sections {
        out += &format!(
            "\n{name}\n  {:<22} {:>6} {:>5}\n",
            "field", "offset", "size"
        );
        for f in fields {
            out += &format!("  {:<22} {:>6} {:>5}\n", f.name, base + f.offset, f.size);
        }
    }
    out
}

/// Decodes a copy of a shared file; returns the report and whether the header is valid.
fn dump_text(bytes: &[u8]) -> (String, bool) {
    // Copy into 8-aligned words so the region accessor can read it.
    let words: Vec<AtomicU64> = bytes
        .chunks(8)
        .map(|chunk| {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            AtomicU64::new(u64::from_ne_bytes(word))
        })
        .collect();
    let region = Region::from_words(&words);
    let mut out = String::new();
    let header = match region.read_header() {
        Ok(h) => h,
        Err(e) => return (format!("file too small for a header: {e}\n"), false),
    };
    let h = &header.host;
    out += &format!(
        "header: magic {:#018x} version {}.{} header {} slot {} total {} slots {} host features {:#x} heartbeat {} generation {} doorbell peer {} vectors {}\n",
        h.magic, h.version_major, h.version_minor, h.header_size, h.slot_size, h.total_size,
        h.nr_slots, h.host_features, h.host_heartbeat, h.host_generation, h.doorbell_peer,
        h.doorbell_vectors
    );
    let g = &header.guest;
    out += &format!(
        "guest:  version {}.{} cpus {} features {:#x} heartbeat {} generation {} state {} doorbells rung {} suppressed {} host interrupts {}\n",
        g.guest_version_major,
        g.guest_version_minor,
        g.guest_nr_cpus,
        g.guest_features,
        g.guest_heartbeat,
        g.guest_generation,
        match g.guest_state {
            PVSCHED_GUEST_ATTACHED => "attached",
            PVSCHED_GUEST_DETACHED => "detached",
            _ => "INVALID",
        },
        g.doorbells_rung,
        g.doorbells_suppressed,
        g.host_interrupts
    );
    let geometry = match validate_header(h, region.len()) {
        Ok(g) => g,
        Err(e) => {
            out += &format!("INVALID header: {e}\n");
            return (out, false);
        }
    };
    match negotiate(h, g) {
        Ok(n) => out += &format!("negotiation: {n:?}\n"),
        Err(e) => out += &format!("INVALID guest: {e}\n"),
    }
    for slot in 0..geometry.nr_slots {
        let (guest, torn) = match region.read_guest_line(slot) {
            Ok(SeqRead::Consistent(l)) => (l, false),
            Ok(SeqRead::Torn(l)) => (l, true),
            Err(e) => {
                out += &format!("slot {slot}: {e}\n");
                continue;
            }
        };
        let (state, mut bad) = decode_guest_line(&guest);
        if torn {
            bad.insert(InvalidFields::TORN);
        }
        if state.online && state.cpu_id != slot {
            bad.insert(InvalidFields::CPU_ID);
        }
        out += &format!(
            "slot {slot} guest: seq {} cpu {} apic {} online {} idle {} updates {} task {:?}/{} nice {} irq {}/{} rt_pending {} (prio {}) request {:?} cs {}/{} irqs {} spins {}\n",
            guest.seq, state.cpu_id, state.apic_id, state.online, state.idle, state.updates,
            state.task.policy, state.task.rt_prio, state.task.nice, state.irq_depth,
            state.softirq_depth, state.rt_pending, state.pending_prio, state.request,
            state.cs_depth, state.cs_count, state.irq_count, state.spin_count
        );
        if !bad.is_empty() {
            out += &format!(
                "  INVALID guest fields: {}\n",
                bad.names().collect::<Vec<_>>().join(", ")
            );
        }
        let host = match region.read_host_line(slot) {
            Ok(SeqRead::Consistent(l)) => l,
            Ok(SeqRead::Torn(l)) => {
                out += "  host line torn (writer mid-update)\n";
                l
            }
            Err(e) => {
                out += &format!("  {e}\n");
                continue;
            }
        };
        out += &format!(
            "slot {slot} host:  seq {} boost {} prio {} policy {} pcpu {} load {}‰ smt-busy {} preempted {} steal {} ns throttle-until {} now {} boosts {} throttles {} boosted {} ns poll-hint {} ns\n",
            host.seq, host.boost_state, host.host_prio, host.host_policy, host.pcpu,
            host.pcpu_load_permille, host.smt_sibling_busy, host.preempted, host.steal_ns,
            host.throttle_until_ns, host.host_time_ns, host.boosts, host.throttles,
            host.boosted_ns, host.poll_hint_ns
        );
        let problems: Vec<_> = host_line_problems(&host).collect();
        if !problems.is_empty() {
            out += &format!("  INVALID host fields: {}\n", problems.join(", "));
        }
    }
    (out, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pvsched_abi::{encode_guest_line, new_host_header, region_size_for, GuestVcpuState};

    fn region_bytes(words: &[AtomicU64]) -> Vec<u8> {
        words
            .iter()
            .flat_map(|w| w.load(std::sync::atomic::Ordering::Relaxed).to_ne_bytes())
            .collect()
    }

    #[test]
    fn layout_lists_every_field() {
        let text = layout_text();
        for f in PvschedGuestLine::FIELDS
            .iter()
            .chain(PvschedHostLine::FIELDS)
        {
            assert!(text.contains(f.name), "{} missing", f.name);
        }
        assert!(text.contains("throttle_until_ns          96     8"));
    }

    #[test]
    fn dump_decodes_slots_and_flags_bad_fields() {
        let words: Vec<AtomicU64> = (0..region_size_for(2) / 8)
            .map(|_| AtomicU64::new(0))
            .collect();
        let region = Region::from_words(&words);
        region
            .write_header_host(&new_host_header(2, PVSCHED_FEAT_KNOWN, 1))
            .unwrap();
        let good = GuestVcpuState {
            cpu_id: 0,
            online: true,
            ..Default::default()
        };
        region
            .write_guest_line(0, &encode_guest_line(&good))
            .unwrap();
        let bad = PvschedGuestLine {
            cpu_id: 7,
            flags: PVSCHED_GUEST_FLAG_ONLINE,
            task_nice: 99,
            ..Default::default()
        };
        region.write_guest_line(1, &bad).unwrap();
        let (text, ok) = dump_text(&region_bytes(&words));
        assert!(ok, "{text}");
        assert!(text.contains("slot 0 guest"));
        assert!(
            text.contains("INVALID guest fields: TASK_NICE, CPU_ID"),
            "{text}"
        );
    }

    #[test]
    fn dump_rejects_garbage() {
        let (text, ok) = dump_text(&[0xAB; 300]);
        assert!(!ok);
        assert!(text.contains("bad magic"), "{text}");
        let (_, ok) = dump_text(&[1, 2, 3]);
        assert!(!ok);
    }
}
