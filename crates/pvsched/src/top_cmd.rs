//! `pvsched top`: a live terminal view of a running daemon's VMs and vCPUs,
//! refreshed from its `/status` endpoint.
//!
//! The screen is a pure function of what was fetched, the sort and the
//! scroll offset ([`draw`]); the loop around it only reads keys and
//! redraws, so the rendering is tested on ratatui's `TestBackend`. A thread
//! of its own asks the daemon, so that a daemon slow to answer never holds
//! up a key.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use pvsched_host::daemon::fetch_stats;
use pvsched_host::{DaemonStatus, VcpuStatus, VmStatus};
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Cell, Paragraph, Row, Table};
use ratatui::Frame;

/// `pvsched top`: a live view of a running daemon.
#[derive(Args)]
pub struct TopArgs {
    /// Configuration file, to find the daemon's metrics address (when it does not
    /// exist: the default address, 127.0.0.1:9464).
    #[arg(long, default_value = "/etc/pvsched/hostd.toml")]
    pub config: PathBuf,
    /// The daemon's address (overrides the configuration).
    #[arg(long)]
    pub addr: Option<SocketAddr>,
    /// Time between two reads of the daemon's status (ms, 100 to 60000).
    #[arg(long, default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(100..=60_000))]
    pub interval_ms: u64,
    /// The order of the vCPU rows (`s` cycles it).
    #[arg(long, value_enum, default_value_t = SortKey::Vm)]
    pub sort: SortKey,
}

/// The order of the vCPU rows; every key but `vm` puts the largest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SortKey {
    /// VM name, then vCPU index.
    Vm,
    /// Boosted CPU time.
    Boosted,
    /// Steal (run delay).
    Steal,
    /// Throttles.
    Throttles,
    /// The VM's invalid guest writes.
    Invalid,
}

impl SortKey {
    /// The key `s` moves to.
    pub fn next(self) -> Self {
        match self {
            SortKey::Vm => SortKey::Boosted,
            SortKey::Boosted => SortKey::Steal,
            SortKey::Steal => SortKey::Throttles,
            SortKey::Throttles => SortKey::Invalid,
            SortKey::Invalid => SortKey::Vm,
        }
    }

    fn label(self) -> &'static str {
        match self {
            SortKey::Vm => "vm",
            SortKey::Boosted => "boosted",
            SortKey::Steal => "steal",
            SortKey::Throttles => "throttles",
            SortKey::Invalid => "invalid",
        }
    }
}

/// The last read of the daemon.
#[derive(Clone, Debug)]
pub enum Snapshot {
    /// Nothing read yet.
    Connecting,
    /// Its status.
    Status(Box<DaemonStatus>),
    /// Why it could not be read (one line).
    Unreachable(String),
}

/// Everything the screen shows.
#[derive(Clone, Debug)]
pub struct Screen {
    /// Where the daemon is asked.
    pub addr: SocketAddr,
    /// The last read.
    pub snapshot: Snapshot,
    /// Row order.
    pub sort: SortKey,
    /// Rows scrolled past (clamped when drawn).
    pub scroll: usize,
    /// Refresh interval, shown with the retry line.
    pub interval_ms: u64,
}

/// Lines of the header, above the table (whose first line is the column names).
const HEADER_LINES: u16 = 2;

/// Draws the whole screen into `frame`.
pub fn draw(frame: &mut Frame, screen: &Screen) {
    let [header, table, footer] = Layout::vertical([
        Constraint::Length(HEADER_LINES),
        Constraint::Min(1),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    let status = match &screen.snapshot {
        Snapshot::Connecting => {
            frame.render_widget(
                Paragraph::new(format!("asking the daemon at {} ...", screen.addr)),
                header,
            );
            frame.render_widget(Paragraph::new(keys_line(screen.sort)), footer);
            return;
        }
        Snapshot::Unreachable(why) => {
            let line = format!(
                "daemon unreachable at {}: {} (retrying every {} ms)",
                screen.addr,
                printable(why),
                screen.interval_ms
            );
            frame.render_widget(
                Paragraph::new(line).style(Style::new().add_modifier(Modifier::BOLD)),
                header,
            );
            frame.render_widget(Paragraph::new(keys_line(screen.sort)), footer);
            return;
        }
        Snapshot::Status(s) => s,
    };
    frame.render_widget(Paragraph::new(header_lines(screen.addr, status)), header);
    let rows = sorted_rows(status, screen.sort);
    let footer_text = if rows.is_empty() {
        frame.render_widget(
            Paragraph::new("no VMs managed (none configured, discovered or attached yet)"),
            table,
        );
        keys_line(screen.sort)
    } else {
        let visible = usize::from(table.height.saturating_sub(1)).max(1);
        let first = clamp_scroll(screen.scroll, rows.len(), visible);
        let last = (first + visible).min(rows.len());
        draw_table(frame, table, &rows[first..last]);
        format!(
            "rows {}-{} of {}  {}",
            first + 1,
            last,
            rows.len(),
            keys_line(screen.sort)
        )
    };
    frame.render_widget(Paragraph::new(footer_text), footer);
}

fn keys_line(sort: SortKey) -> String {
    format!(
        "sort: {} (s)  scroll: arrows PgUp PgDn Home End  quit: q",
        sort.label()
    )
}

/// The first row shown: `scroll`, kept so that the last page stays full.
fn clamp_scroll(scroll: usize, rows: usize, visible: usize) -> usize {
    scroll.min(rows.saturating_sub(visible))
}

fn header_lines(addr: SocketAddr, s: &DaemonStatus) -> Vec<Line<'static>> {
    let ms = |ns: u64| ns as f64 / 1e6;
    let host = if s.host_budget_ns == 0 {
        "host budget: -".to_owned()
    } else {
        format!(
            "host budget: {:.1} of {:.1} ms used per {:.0} ms window ({:.0}%)",
            ms(s.host_budget_used_ns),
            ms(s.host_budget_ns),
            ms(s.budget_window_ns),
            100.0 * s.host_budget_used_ns as f64 / s.host_budget_ns as f64
        )
    };
    vec![
        Line::from(format!(
            "pvsched daemon at {addr}  loops {}  period {} us  event_wait {}  managed threads {}  VMs {}{}",
            s.loops,
            s.period_us,
            if s.event_wait { "yes" } else { "no" },
            s.managed_threads,
            s.vms.len(),
            if s.dry_run { "  (observe only)" } else { "" }
        )),
        Line::from(host),
    ]
}

/// One table row: a vCPU and its VM.
struct VcpuRow<'a> {
    vm: &'a VmStatus,
    vcpu: &'a VcpuStatus,
}

/// Every present vCPU of every VM, in `sort` order; ties by VM name and index.
fn sorted_rows(status: &DaemonStatus, sort: SortKey) -> Vec<VcpuRow<'_>> {
    let mut rows: Vec<VcpuRow> = status
        .vms
        .iter()
        .flat_map(|vm| {
            vm.vcpus
                .iter()
                .filter(|c| c.tid.is_some())
                .map(move |vcpu| VcpuRow { vm, vcpu })
        })
        .collect();
    let largest_first = |r: &VcpuRow| match sort {
        SortKey::Vm => 0,
        SortKey::Boosted => r.vcpu.boosted_ns,
        SortKey::Steal => r.vcpu.steal_ns,
        SortKey::Throttles => r.vcpu.throttles,
        SortKey::Invalid => r.vm.counters.invalid_writes,
    };
    rows.sort_by(|a, b| {
        largest_first(b)
            .cmp(&largest_first(a))
            .then_with(|| a.vm.name.cmp(&b.vm.name))
            .then_with(|| a.vcpu.slot.cmp(&b.vcpu.slot))
    });
    rows
}

/// The guest's own view of a vCPU: `rt:N` (RT tasks pending), `irq`,
/// `idle`; `-` for none of them, `n/a` without accepted guest data.
fn guest_flags(c: &VcpuStatus) -> String {
    if !c.guest_valid {
        return "n/a".into();
    }
    let mut flags = Vec::new();
    if c.guest_rt_pending > 0 {
        flags.push(format!("rt:{}", c.guest_rt_pending));
    }
    if c.guest_in_irq {
        flags.push("irq".into());
    }
    if c.guest_idle {
        flags.push("idle".into());
    }
    if flags.is_empty() {
        "-".into()
    } else {
        flags.join(" ")
    }
}

/// Control characters (from VM names, which come from command lines
/// anyone can write) would move the cursor: shown as `?`.
fn printable(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

const COLUMNS: [(&str, u16); 12] = [
    ("VM", 16),
    ("vCPU", 4),
    ("TID", 8),
    ("pCPU", 4),
    ("GUEST", 14),
    ("NOW", 9),
    ("BOOSTS", 8),
    ("THROTTLES", 9),
    ("STEAL ms", 10),
    ("BOOSTED ms", 10),
    ("VM BUDGET LEFT ms", 17),
    ("INVALID", 8),
];

fn draw_table(frame: &mut Frame, area: Rect, rows: &[VcpuRow]) {
    let ms = |ns: u64| format!("{:.1}", ns as f64 / 1e6);
    let numeric = |s: String| Cell::from(Line::from(s).right_aligned());
    let body = rows.iter().map(|r| {
        let c = r.vcpu;
        let budget_left = if r.vm.budget_ns == 0 {
            "-".to_owned()
        } else {
            ms(r.vm.budget_ns.saturating_sub(r.vm.budget_used_ns))
        };
        Row::new(vec![
            Cell::from(printable(&r.vm.name)),
            numeric(c.slot.to_string()),
            numeric(c.tid.map_or("-".into(), |t| t.to_string())),
            numeric(c.pcpu.to_string()),
            Cell::from(guest_flags(c)),
            Cell::from(printable(&c.state)),
            numeric(c.boosts.to_string()),
            numeric(c.throttles.to_string()),
            numeric(ms(c.steal_ns)),
            numeric(ms(c.boosted_ns)),
            numeric(budget_left),
            numeric(r.vm.counters.invalid_writes.to_string()),
        ])
    });
    let header = Row::new(COLUMNS.iter().map(|(name, _)| Cell::from(*name)))
        .style(Style::new().add_modifier(Modifier::REVERSED));
    let widths = COLUMNS.iter().map(|(_, w)| Constraint::Length(*w));
    frame.render_widget(Table::new(body, widths).header(header), area);
}

/// Reads the daemon once.
fn fetch(addr: SocketAddr) -> Snapshot {
    match fetch_stats(addr, "/status") {
        Err(e) => Snapshot::Unreachable(e.to_string()),
        Ok(body) => match serde_json::from_str::<DaemonStatus>(&body) {
            Ok(s) => Snapshot::Status(Box::new(s)),
            Err(e) => Snapshot::Unreachable(format!("its /status does not decode: {e}")),
        },
    }
}

/// Rows of the last read, for scrolling.
fn row_count(snapshot: &Snapshot) -> usize {
    match snapshot {
        Snapshot::Status(s) => s
            .vms
            .iter()
            .map(|v| v.vcpus.iter().filter(|c| c.tid.is_some()).count())
            .sum(),
        Snapshot::Connecting | Snapshot::Unreachable(_) => 0,
    }
}

/// Reads the daemon every `interval` on a thread of its own; the newest read
/// waits in the channel. The thread ends when the receiver is dropped.
fn spawn_reader(addr: SocketAddr, interval: Duration) -> anyhow::Result<mpsc::Receiver<Snapshot>> {
    let (tx, rx) = mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name("pvsched-top-read".into())
        .spawn(move || loop {
            if tx.send(fetch(addr)).is_err() {
                return;
            }
            std::thread::sleep(interval);
        })
        .context("starting the reader thread")?;
    Ok(rx)
}

/// Runs `pvsched top` until `q`, Ctrl-C, SIGTERM or SIGHUP.
pub fn run(args: TopArgs) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    let addr = crate::hostd_cmd::status_addr(&args.config, args.addr)?;
    if !std::io::stdout().is_terminal() {
        bail!(
            "`pvsched top` needs a terminal on stdout; `pvsched status` prints the same state once"
        );
    }
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGHUP] {
        signal_hook::flag::register(sig, Arc::clone(&stop)).context("signal handler")?;
    }
    // try_init also installs a panic hook that restores the terminal first.
    let mut terminal = match ratatui::try_init() {
        Ok(t) => t,
        Err(e) => {
            ratatui::restore();
            return Err(e).context("setting up the terminal");
        }
    };
    let result = event_loop(&mut terminal, addr, &args, &stop);
    ratatui::restore();
    result
}

fn event_loop(
    terminal: &mut ratatui::DefaultTerminal,
    addr: SocketAddr,
    args: &TopArgs,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    let reads = spawn_reader(addr, Duration::from_millis(args.interval_ms))?;
    // Reads and signals are noticed within this.
    let tick = Duration::from_millis(50);
    let mut screen = Screen {
        addr,
        snapshot: Snapshot::Connecting,
        sort: args.sort,
        scroll: 0,
        interval_ms: args.interval_ms,
    };
    while !stop.load(Ordering::Relaxed) {
        if let Ok(snapshot) = reads.try_recv() {
            screen.snapshot = snapshot;
        }
        let size = terminal.draw(|f| draw(f, &screen))?.area;
        // Rows on a page: less the header, the column names and the footer.
        let page = usize::from(size.height.saturating_sub(HEADER_LINES + 2)).max(1);
        if !event::poll(tick)? {
            continue;
        }
        let Event::Key(key) = event::read()? else {
            continue;
        };
        if key.kind == KeyEventKind::Release {
            continue;
        }
        let last = row_count(&screen.snapshot).saturating_sub(page);
        match key.code {
            KeyCode::Char('q') | KeyCode::Esc => return Ok(()),
            KeyCode::Char('c') if key.modifiers.contains(KeyModifiers::CONTROL) => return Ok(()),
            KeyCode::Char('s') => screen.sort = screen.sort.next(),
            KeyCode::Up => screen.scroll = screen.scroll.saturating_sub(1),
            KeyCode::Down => screen.scroll = (screen.scroll + 1).min(last),
            KeyCode::PageUp => screen.scroll = screen.scroll.saturating_sub(page),
            KeyCode::PageDown => screen.scroll = (screen.scroll + page).min(last),
            KeyCode::Home => screen.scroll = 0,
            KeyCode::End => screen.scroll = last,
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use pvsched_host::VmCounters;
    use ratatui::backend::TestBackend;
    use ratatui::Terminal;

    fn addr() -> SocketAddr {
        "127.0.0.1:9464".parse().unwrap()
    }

    /// The screen as text, one string per line.
    fn render(snapshot: Snapshot, sort: SortKey, scroll: usize, height: u16) -> Vec<String> {
        let screen = Screen {
            addr: addr(),
            snapshot,
            sort,
            scroll,
            interval_ms: 1000,
        };
        let mut terminal = Terminal::new(TestBackend::new(160, height)).unwrap();
        terminal.draw(|f| draw(f, &screen)).unwrap();
        let buf = terminal.backend().buffer();
        buf.content
            .chunks(usize::from(buf.area.width))
            .map(|row| row.iter().map(|c| c.symbol()).collect::<String>())
            .collect()
    }

    fn vcpu(slot: u32, tid: i32, steal_ms: u64, boosted_ms: u64, throttles: u64) -> VcpuStatus {
        VcpuStatus {
            slot,
            tid: Some(tid),
            state: "normal".into(),
            guest_valid: true,
            pcpu: slot,
            steal_ns: steal_ms * 1_000_000,
            boosted_ns: boosted_ms * 1_000_000,
            boosts: 10 + u64::from(slot),
            throttles,
            ..Default::default()
        }
    }

    fn status() -> DaemonStatus {
        let mut alpha_1 = vcpu(1, 1101, 2, 50, 0);
        alpha_1.state = "boosted".into();
        alpha_1.guest_rt_pending = 2;
        alpha_1.guest_in_irq = true;
        let mut beta_0 = vcpu(0, 2200, 90, 1, 7);
        beta_0.guest_idle = true;
        let mut beta_1 = vcpu(1, 2201, 0, 0, 0);
        beta_1.guest_valid = false;
        // A slot QEMU has no vCPU for: not a row.
        let absent = VcpuStatus {
            slot: 2,
            tid: None,
            ..Default::default()
        };
        DaemonStatus {
            loops: 4242,
            period_us: 1000,
            event_wait: true,
            managed_threads: 5,
            budget_window_ns: 100_000_000,
            host_budget_ns: 40_000_000,
            host_budget_used_ns: 10_000_000,
            vms: vec![
                VmStatus {
                    name: "alpha".into(),
                    attached: true,
                    budget_ns: 25_000_000,
                    budget_used_ns: 5_000_000,
                    counters: VmCounters {
                        invalid_writes: 0,
                        ..Default::default()
                    },
                    vcpus: vec![vcpu(0, 1100, 30, 20, 1), alpha_1],
                    ..Default::default()
                },
                VmStatus {
                    name: "beta".into(),
                    attached: true,
                    budget_ns: 25_000_000,
                    budget_used_ns: 30_000_000,
                    counters: VmCounters {
                        invalid_writes: 3,
                        ..Default::default()
                    },
                    vcpus: vec![beta_0, beta_1, absent],
                    ..Default::default()
                },
            ],
            ..Default::default()
        }
    }

    fn snapshot() -> Snapshot {
        Snapshot::Status(Box::new(status()))
    }

    /// The table's rows as (VM, tid), top to bottom.
    fn row_order(lines: &[String]) -> Vec<(String, String)> {
        lines
            .iter()
            .filter_map(|l| {
                let mut words = l.split_whitespace();
                let vm = words.next()?;
                let _slot = words.next()?;
                let tid = words.next()?;
                (tid.len() == 4 && tid.parse::<u32>().is_ok()).then(|| (vm.into(), tid.into()))
            })
            .collect()
    }

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter().map(|(a, b)| ((*a).into(), (*b).into())).collect()
    }

    #[test]
    fn the_header_shows_the_loop_and_the_host_budget() {
        let lines = render(snapshot(), SortKey::Vm, 0, 20);
        assert!(
            lines[0].contains("pvsched daemon at 127.0.0.1:9464"),
            "{lines:#?}"
        );
        assert!(lines[0].contains("loops 4242"), "{}", lines[0]);
        assert!(lines[0].contains("period 1000 us"), "{}", lines[0]);
        assert!(lines[0].contains("event_wait yes"), "{}", lines[0]);
        assert!(lines[0].contains("managed threads 5"), "{}", lines[0]);
        assert!(lines[0].contains("VMs 2"), "{}", lines[0]);
        assert!(
            lines[1].contains("host budget: 10.0 of 40.0 ms used per 100 ms window (25%)"),
            "{}",
            lines[1]
        );
        assert!(lines[2].contains("VM BUDGET LEFT ms"), "{}", lines[2]);
        assert!(lines[2].contains("INVALID"), "{}", lines[2]);
    }

    #[test]
    fn rows_are_vcpus_present_in_vm_order_by_default() {
        let lines = render(snapshot(), SortKey::Vm, 0, 20);
        assert_eq!(
            row_order(&lines),
            pairs(&[
                ("alpha", "1100"),
                ("alpha", "1101"),
                ("beta", "2200"),
                ("beta", "2201")
            ])
        );
        assert!(
            lines.iter().any(|l| l.contains("rows 1-4 of 4")),
            "{lines:#?}"
        );
    }

    #[test]
    fn each_sort_puts_the_largest_first() {
        let order = |sort| {
            row_order(&render(snapshot(), sort, 0, 20))
                .into_iter()
                .map(|(_, tid)| tid)
                .collect::<Vec<_>>()
        };
        assert_eq!(order(SortKey::Boosted), ["1101", "1100", "2200", "2201"]);
        assert_eq!(order(SortKey::Steal), ["2200", "1100", "1101", "2201"]);
        assert_eq!(order(SortKey::Throttles), ["2200", "1100", "1101", "2201"]);
        // The VM's counter: both of beta's vCPUs first, then by index.
        assert_eq!(order(SortKey::Invalid), ["2200", "2201", "1100", "1101"]);
        let mut key = SortKey::Vm;
        let mut seen = vec![key];
        for _ in 0..4 {
            key = key.next();
            seen.push(key);
        }
        assert_eq!(
            key.next(),
            SortKey::Vm,
            "s cycles through all five: {seen:?}"
        );
        assert!(render(snapshot(), SortKey::Steal, 0, 20)
            .iter()
            .any(|l| l.contains("sort: steal (s)")));
    }

    #[test]
    fn guest_flags_boost_state_counters_and_budget_left_are_in_the_row() {
        let lines = render(snapshot(), SortKey::Vm, 0, 20);
        let row = |tid: &str| {
            lines
                .iter()
                .find(|l| l.split_whitespace().nth(2) == Some(tid))
                .unwrap_or_else(|| panic!("no row {tid}: {lines:#?}"))
                .clone()
        };
        let alpha_1 = row("1101");
        assert_eq!(
            alpha_1.split_whitespace().collect::<Vec<_>>(),
            [
                "alpha", "1", "1101", "1", "rt:2", "irq", "boosted", "11", "0", "2.0", "50.0",
                "20.0", "0"
            ]
        );
        let beta_0 = row("2200");
        assert!(beta_0.contains(" idle "), "{beta_0}");
        // Over its budget: nothing left, not a wrapped number.
        let beta_0: Vec<&str> = beta_0.split_whitespace().collect();
        assert_eq!(beta_0[beta_0.len() - 2..], ["0.0", "3"]);
        assert_eq!(row("2201").split_whitespace().nth(4), Some("n/a"));
        assert_eq!(row("1100").split_whitespace().nth(4), Some("-"));
    }

    #[test]
    fn scrolling_moves_the_first_row_and_keeps_the_last_page_full() {
        // 7 lines: 2 of header, the column names, 3 rows, the footer.
        let order = |scroll| {
            row_order(&render(snapshot(), SortKey::Vm, scroll, 7))
                .into_iter()
                .map(|(_, tid)| tid)
                .collect::<Vec<_>>()
        };
        assert_eq!(order(0), ["1100", "1101", "2200"]);
        assert_eq!(order(1), ["1101", "2200", "2201"]);
        assert_eq!(order(99), ["1101", "2200", "2201"]);
        let lines = render(snapshot(), SortKey::Vm, 1, 7);
        assert!(lines[6].starts_with("rows 2-4 of 4"), "{}", lines[6]);
    }

    #[test]
    fn an_empty_daemon_says_so() {
        let lines = render(
            Snapshot::Status(Box::new(DaemonStatus {
                loops: 7,
                ..Default::default()
            })),
            SortKey::Vm,
            0,
            10,
        );
        assert!(
            lines[0].contains("loops 7") && lines[0].contains("VMs 0"),
            "{}",
            lines[0]
        );
        assert!(lines[1].contains("host budget: -"), "{}", lines[1]);
        assert!(lines[2].starts_with("no VMs managed"), "{lines:#?}");
        assert!(row_order(&lines).is_empty());
    }

    #[test]
    fn an_unreachable_daemon_is_one_line_and_no_table() {
        let lines = render(
            Snapshot::Unreachable("Connection refused (os error 111)".into()),
            SortKey::Vm,
            0,
            10,
        );
        assert_eq!(
            lines[0].trim_end(),
            "daemon unreachable at 127.0.0.1:9464: Connection refused (os error 111) (retrying every 1000 ms)"
        );
        assert!(
            lines[1..9].iter().all(|l| l.trim().is_empty()),
            "{lines:#?}"
        );
        assert!(lines[9].contains("quit: q"), "{}", lines[9]);
    }

    #[test]
    fn before_the_first_read_the_screen_says_where_it_asks() {
        let lines = render(Snapshot::Connecting, SortKey::Vm, 0, 10);
        assert_eq!(
            lines[0].trim_end(),
            "asking the daemon at 127.0.0.1:9464 ..."
        );
        assert!(lines[9].contains("quit: q"), "{}", lines[9]);
    }

    #[test]
    fn the_reader_thread_delivers_reads_again_and_again() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let reads = spawn_reader(port, Duration::from_millis(100)).unwrap();
        for _ in 0..2 {
            let read = reads.recv().unwrap();
            assert!(matches!(read, Snapshot::Unreachable(_)), "{read:?}");
        }
    }

    #[test]
    fn control_characters_of_vm_names_are_not_drawn() {
        let mut s = status();
        s.vms[0].name = "ev\x1b[2Jil".into();
        let lines = render(Snapshot::Status(Box::new(s)), SortKey::Vm, 0, 20);
        assert!(
            lines.iter().any(|l| l.starts_with("ev?[2Jil ")),
            "{lines:#?}"
        );
        assert!(!lines.concat().contains('\x1b'));
    }

    #[test]
    fn a_closed_port_reads_as_unreachable() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        // The listener is dropped: nothing accepts on the port.
        match fetch(port) {
            Snapshot::Unreachable(why) => assert!(why.contains("refused"), "{why}"),
            other => panic!("not an unreachable daemon: {other:?}"),
        }
    }
}
