//! Receiving a process's pty master: libcontainer creates the pty inside
//! the container and sends the master over a console socket.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::time::{Duration, Instant};

/// How long the agent waits for a pty master from the console socket.
pub(super) const CONSOLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts one connection on the console socket and receives the pty master.
pub(super) fn receive_pty_master(
    listener: &UnixListener,
    timeout: Duration,
) -> std::io::Result<OwnedFd> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + timeout;
    let stream = loop {
        match listener.accept() {
            Ok((stream, _)) => break stream,
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "no pty master arrived on the console socket",
                    ));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(err) => return Err(err),
        }
    };
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(timeout))?;
    let mut name = [0u8; 4096];
    let mut iov = [std::io::IoSliceMut::new(&mut name)];
    let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(std::io::Error::from)?;
    for message in msg.cmsgs().map_err(std::io::Error::from)? {
        if let ControlMessageOwned::ScmRights(fds) = message {
            if let Some(&fd) = fds.first() {
                // SAFETY: SCM_RIGHTS just installed `fd` in our table; we own it.
                return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        "the console socket message carried no file descriptor",
    ))
}
