// Apple's <sys/event.h> items that devices/src/sys/kqueue.rs uses, written from the
// header: the libc crate declares them for Apple targets only, so the Linux-side macOS
// checks put this text where the crate would be. check-hvf-on-linux.sh compares it with
// the libc crate's own macOS definitions; macos-build-check.py adds it to its macOS libc.
// The includer provides c_int, c_void, intptr_t, timespec and uintptr_t.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct kevent {
    pub ident: uintptr_t,
    pub filter: i16,
    pub flags: u16,
    pub fflags: u32,
    pub data: intptr_t,
    pub udata: *mut c_void,
}
pub const EVFILT_READ: i16 = -1;
pub const EVFILT_WRITE: i16 = -2;
pub const EV_ADD: u16 = 0x1;
pub const EV_DELETE: u16 = 0x2;
pub const EV_ENABLE: u16 = 0x4;
pub const EV_ERROR: u16 = 0x4000;
pub const EV_EOF: u16 = 0x8000;
extern "C" {
    pub fn kqueue() -> c_int;
    pub fn kevent(
        kq: c_int,
        changelist: *const kevent,
        nchanges: c_int,
        eventlist: *mut kevent,
        nevents: c_int,
        timeout: *const timespec,
    ) -> c_int;
}
