//! Acting as the guest caller on the host: a per-thread switch of the file
//! system uid and gid for the length of one request.
//!
//! When aivmm runs as root, [`super::filesystem::ShareFs`] takes an [`AsCaller`]
//! guard at the start of each request that reaches the host, with the uid and
//! gid from the request's FUSE header. The guard sets the calling thread's fsuid
//! and fsgid (`setfsuid`/`setfsgid`, raw syscalls: the kernel keeps credentials per
//! thread, and these two are never broadcast to the other threads), so the host
//! kernel makes new objects with those owners and checks every access as it would
//! for that user. Dropping the guard sets both back to 0.
//!
//! Capabilities follow by themselves (capabilities(7), "Effect of user ID changes
//! on capabilities"): when the fsuid goes from 0 to non-zero the kernel clears the
//! file system capabilities (`CAP_CHOWN`, `CAP_DAC_OVERRIDE`, `CAP_DAC_READ_SEARCH`,
//! `CAP_FOWNER`, `CAP_FSETID`, `CAP_MKNOD`, ...) from the thread's effective set,
//! and puts back those in the permitted set when it returns to 0. So a caller
//! other than guest root can neither give a file away nor override modes, and
//! guest root acts as host root inside the share (as with virtiofsd).
//!
//! Supplementary groups are not switched: FUSE does not send the guest's, and
//! the thread keeps those of the aivmm process. A root daemon usually has none
//! beyond group 0; a group-0-writable host file in a share is then writable by
//! every guest user.
//!
//! Neither call reports failure, so each is followed by a query (`-1`, which is
//! never a valid id and changes nothing) that returns the id now in force; a
//! switch that did not take is refused (EPERM) rather than carried out as root.

use std::io;

/// The id Linux reserves as "no id" (`(uid_t) -1`).
const NO_ID: u32 = u32::MAX;

/// Whether the process runs as root, so it can and must act as each caller.
pub fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Sets this thread's fsuid (`gid` false) or fsgid (`gid` true) and returns the
/// id in force afterwards.
fn set_fs_id(gid: bool, id: u32) -> u32 {
    let nr = if gid {
        libc::SYS_setfsgid
    } else {
        libc::SYS_setfsuid
    };
    // SAFETY: setfsuid/setfsgid change only this thread's credentials; they
    // touch no memory.
    unsafe { libc::syscall(nr, id) };
    // SAFETY: as above; -1 changes nothing and returns the current id.
    let now = unsafe { libc::syscall(nr, NO_ID) };
    // The kernel returns the id as a non-negative long.
    now as u32
}

/// This thread's fsuid and fsgid are the caller's until it is dropped.
#[derive(Debug)]
pub struct AsCaller {
    _not_send: std::marker::PhantomData<*const ()>,
}

impl AsCaller {
    /// Acts as `uid`:`gid` on this thread. Fails with EPERM for the "no id"
    /// value or when the kernel did not take an id (one not mapped in aivmm's
    /// user namespace, say), leaving the thread as it was.
    pub fn new(uid: u32, gid: u32) -> io::Result<AsCaller> {
        if uid == NO_ID || gid == NO_ID {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        let guard = AsCaller {
            _not_send: std::marker::PhantomData,
        };
        // The group first: it does not matter for the kernel (CAP_SETGID is not
        // one of the capabilities a fsuid change drops), but reads in order.
        if set_fs_id(true, gid) != gid || set_fs_id(false, uid) != uid {
            // `guard` is dropped here and puts both back.
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        Ok(guard)
    }
}

impl Drop for AsCaller {
    fn drop(&mut self) {
        // The uid first, which gives back the capabilities; a failure here would
        // leave the thread less privileged, never more.
        if set_fs_id(false, 0) != 0 || set_fs_id(true, 0) != 0 {
            log::error!("virtio-fs: could not set this thread's fsuid/fsgid back to 0");
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// (uid, gid) fields of `/proc/thread-self/status`: real, effective, saved, fs.
    fn thread_ids() -> (Vec<u32>, Vec<u32>) {
        let s = std::fs::read_to_string("/proc/thread-self/status").unwrap();
        let ids = |key: &str| -> Vec<u32> {
            let line = s.lines().find_map(|l| l.strip_prefix(key)).unwrap();
            line.split_whitespace()
                .map(|v| v.parse().unwrap())
                .collect()
        };
        (ids("Uid:"), ids("Gid:"))
    }

    #[test]
    fn switch_is_per_thread_and_undone() {
        if !running_as_root() {
            println!("SKIPPED switch_is_per_thread_and_undone: needs root");
            return;
        }
        let before = thread_ids();
        // A thread made before the switch (a new one would copy this one's ids).
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let other = std::thread::spawn(move || {
            wait.recv().unwrap();
            thread_ids()
        });
        {
            let _g = AsCaller::new(65534, 65533).unwrap();
            let (u, g) = thread_ids();
            assert_eq!((u[3], g[3]), (65534, 65533));
            assert_eq!((u[1], g[1]), (0, 0), "only the fs ids change");
            go.send(()).unwrap();
            assert_eq!(
                other.join().unwrap(),
                before,
                "another thread is not switched"
            );
        }
        assert_eq!(thread_ids(), before);
        assert_eq!(
            AsCaller::new(NO_ID, 0).unwrap_err().raw_os_error(),
            Some(libc::EPERM)
        );
        assert_eq!(thread_ids(), before);
    }
}
