//! systemd's file-descriptor store, so the `ivshmem-doorbell` VMs survive a daemon
//! restart.
//!
//! QEMU connects to the ivshmem server only when it creates the device and never
//! again, so a daemon that restarts without the old descriptors cannot serve those VMs
//! until they restart. Under systemd (`FileDescriptorStoreMax=` in the unit) the daemon
//! hands every served client's descriptors to the service manager as it serves it
//! (`FDSTORE=1` with a name per descriptor, over `$NOTIFY_SOCKET`), drops them from the
//! store when the client goes (`FDSTOREREMOVE=1`), and gets them back at its next start
//! (`LISTEN_FDS`, `LISTEN_FDNAMES`, `LISTEN_PID`; descriptors from 3 on). What comes
//! back is input like any other: the server checks each group against the live QEMU
//! process before it adopts it (see [`crate::ivshmem::IvshmemServer::restore`]).
//!
//! The protocol is systemd's `sd_notify(3)` and `sd_listen_fds_with_names(3)`; this
//! module speaks it directly (a datagram with `SCM_RIGHTS`), without libsystemd.

use std::io::{self, IoSlice};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

use rustix::net::{sendmsg, SendAncillaryBuffer, SendAncillaryMessage, SendFlags};

/// The first descriptor a service manager passes.
pub const LISTEN_FDS_START: i32 = 3;
/// Most descriptors taken back at start-up (systemd's own limit is 65536 per unit).
pub const MAX_LISTEN_FDS: usize = 65536;
/// Longest descriptor name systemd accepts.
pub const MAX_NAME: usize = 255;

/// Whether `name` is a descriptor name systemd accepts (printable ASCII, no `:`).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name.bytes().all(|b| b.is_ascii_graphic() && b != b':')
}

/// The service manager's notification socket.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
}

impl Notifier {
    /// Connects to `$NOTIFY_SOCKET` (`None` when it is unset: not run by a service
    /// manager that listens).
    pub fn from_env() -> io::Result<Option<Self>> {
        match std::env::var_os("NOTIFY_SOCKET") {
            Some(path) => Self::connect(&path.to_string_lossy()).map(Some),
            None => Ok(None),
        }
    }

    /// Connects to the notification socket `path` (a leading `@` names an abstract
    /// socket, as systemd writes it).
    pub fn connect(path: &str) -> io::Result<Self> {
        let socket = UnixDatagram::unbound()?;
        let addr = match path.strip_prefix('@') {
            Some(abstract_name) => SocketAddr::from_abstract_name(abstract_name.as_bytes())?,
            None => SocketAddr::from_pathname(path)?,
        };
        socket.connect_addr(&addr)?;
        Ok(Self { socket })
    }

    fn send(&self, message: &str, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        let mut space =
            vec![std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
        let mut ancillary = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() && !ancillary.push(SendAncillaryMessage::ScmRights(fds)) {
            return Err(io::Error::other("descriptors do not fit one message"));
        }
        let sent = sendmsg(
            &self.socket,
            &[IoSlice::new(message.as_bytes())],
            &mut ancillary,
            SendFlags::NOSIGNAL,
        )?;
        if sent != message.len() {
            return Err(io::Error::other("short notification"));
        }
        Ok(())
    }

    /// Stores `fd` under `name`.
    pub fn store(&self, name: &str, fd: BorrowedFd<'_>) -> io::Result<()> {
        if !valid_name(name) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name:?} is not a descriptor name systemd accepts"),
            ));
        }
        self.send(&format!("FDSTORE=1\nFDNAME={name}"), &[fd])
    }

    /// Drops every stored descriptor named `name`.
    pub fn remove(&self, name: &str) -> io::Result<()> {
        self.send(&format!("FDSTOREREMOVE=1\nFDNAME={name}"), &[])
    }
}

/// Descriptors the service manager passed at start-up, with their names.
#[derive(Debug, Default)]
pub struct Inherited {
    /// By name, in the order passed.
    pub fds: Vec<(String, OwnedFd)>,
}

/// Why the passed descriptors were not taken.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InheritError {
    /// `LISTEN_PID` names another process: the variables are not for us.
    #[error("LISTEN_PID is {0}, not this process: the descriptors are not ours")]
    OtherProcess(String),
    /// A variable does not parse or is out of range.
    #[error("{0}")]
    Malformed(String),
}

/// Parses `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES` for process `pid`: how many
/// descriptors and their names (an unnamed one is `unknown`, as systemd says).
pub fn parse_listen_env(
    pid: u32,
    listen_pid: Option<&str>,
    listen_fds: Option<&str>,
    names: Option<&str>,
) -> Result<Vec<String>, InheritError> {
    let (Some(listen_pid), Some(listen_fds)) = (listen_pid, listen_fds) else {
        return Ok(Vec::new());
    };
    if listen_pid.trim().parse::<u32>().ok() != Some(pid) {
        return Err(InheritError::OtherProcess(listen_pid.to_owned()));
    }
    let n: usize = listen_fds.trim().parse().map_err(|_| {
        InheritError::Malformed(format!("LISTEN_FDS={listen_fds:?} is not a count"))
    })?;
    if n > MAX_LISTEN_FDS {
        return Err(InheritError::Malformed(format!(
            "LISTEN_FDS={n} is more than {MAX_LISTEN_FDS}"
        )));
    }
    let mut out: Vec<String> = names
        .map(|s| s.split(':').map(str::to_owned).collect())
        .unwrap_or_default();
    if names.is_some() && out.len() != n {
        return Err(InheritError::Malformed(format!(
            "LISTEN_FDNAMES has {} names for {n} descriptors",
            out.len()
        )));
    }
    out.resize(n, "unknown".to_owned());
    Ok(out)
}

/// Takes the descriptors the service manager passed to this process and removes the
/// variables, so neither this process nor its children take them again. Without the
/// variables there is nothing to take.
pub fn take_from_env() -> Result<Inherited, InheritError> {
    let var = |k| std::env::var(k).ok();
    let parsed = parse_listen_env(
        std::process::id(),
        var("LISTEN_PID").as_deref(),
        var("LISTEN_FDS").as_deref(),
        var("LISTEN_FDNAMES").as_deref(),
    );
    for k in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(k);
    }
    let names = parsed?;
    let mut fds = Vec::with_capacity(names.len());
    for (i, name) in names.into_iter().enumerate() {
        let raw = LISTEN_FDS_START + i as i32;
        match crate::sys::take_inherited_fd(raw) {
            Ok(fd) => fds.push((name, fd)),
            Err(e) => {
                return Err(InheritError::Malformed(format!(
                    "descriptor {raw} ({name}) from LISTEN_FDS is not open: {e}"
                )))
            }
        }
    }
    Ok(Inherited { fds })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn listen_variables_are_for_this_process_only() {
        assert_eq!(parse_listen_env(7, None, None, None), Ok(vec![]));
        assert_eq!(
            parse_listen_env(7, Some("8"), Some("1"), None),
            Err(InheritError::OtherProcess("8".into()))
        );
        assert_eq!(
            parse_listen_env(7, Some("7"), Some("2"), Some("a:b")),
            Ok(vec!["a".into(), "b".into()])
        );
        assert_eq!(
            parse_listen_env(7, Some("7"), Some("2"), None),
            Ok(vec!["unknown".into(), "unknown".into()])
        );
        assert!(matches!(
            parse_listen_env(7, Some("7"), Some("3"), Some("a:b")),
            Err(InheritError::Malformed(_))
        ));
        assert!(matches!(
            parse_listen_env(7, Some("7"), Some("lots"), None),
            Err(InheritError::Malformed(_))
        ));
        assert!(matches!(
            parse_listen_env(7, Some("7"), Some("99999999"), None),
            Err(InheritError::Malformed(_))
        ));
    }

    #[test]
    fn names_are_what_systemd_accepts() {
        assert!(valid_name("ivs-1-1234-5678-sock"));
        assert!(!valid_name(""));
        assert!(!valid_name("a:b"));
        assert!(!valid_name("with space"));
        assert!(!valid_name(&"x".repeat(256)));
    }

    #[test]
    fn stored_descriptors_reach_the_manager_with_their_names() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let manager = UnixDatagram::bind(&path).unwrap();
        let notifier = Notifier::connect(path.to_str().unwrap()).unwrap();
        let (mine, _theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        notifier.store("ivs-1-2-3-sock", mine.as_fd()).unwrap();
        notifier.remove("ivs-1-2-3-sock").unwrap();
        assert!(notifier.store("bad:name", mine.as_fd()).is_err());

        let (text, fds) = receive(&manager);
        assert_eq!(text, "FDSTORE=1\nFDNAME=ivs-1-2-3-sock");
        assert_eq!(fds.len(), 1, "one descriptor with the store message");
        let (text, fds) = receive(&manager);
        assert_eq!(text, "FDSTOREREMOVE=1\nFDNAME=ivs-1-2-3-sock");
        assert!(fds.is_empty());
    }

    fn receive(socket: &UnixDatagram) -> (String, Vec<OwnedFd>) {
        use rustix::net::{recvmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
        let mut buf = [0u8; 512];
        let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(4))];
        let mut ancillary = RecvAncillaryBuffer::new(&mut space);
        let r = recvmsg(
            socket,
            &mut [io::IoSliceMut::new(&mut buf)],
            &mut ancillary,
            RecvFlags::CMSG_CLOEXEC,
        )
        .unwrap();
        let mut fds = Vec::new();
        for m in ancillary.drain() {
            if let RecvAncillaryMessage::ScmRights(rights) = m {
                fds.extend(rights);
            }
        }
        (String::from_utf8_lossy(&buf[..r.bytes]).into_owned(), fds)
    }
}
