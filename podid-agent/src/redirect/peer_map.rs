//! Taking a record out of the pinned peer map in one syscall.
//!
//! Every accepted connection reads and deletes its record. With
//! `BPF_MAP_LOOKUP_AND_DELETE_ELEM` (LRU hash maps, kernel 5.14+) that is one
//! lock-free syscall instead of a lookup and a delete under a lock; older
//! kernels fall back to the two.

use std::{
    io,
    mem::size_of,
    os::fd::{AsFd, AsRawFd},
    sync::atomic::{AtomicBool, Ordering},
};

use aya::maps::MapData;
use podid_ebpf::{ConnectRecord, PeerKey};

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
/// `ENOTSUPP`, the kernel-internal "not supported" some map types return.
const ENOTSUPP: i32 = 524;

/// `union bpf_attr` as the element commands use it.
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// The peer record map, by file descriptor.
#[derive(Debug)]
pub(crate) struct PeerMap {
    map: MapData,
    combined: AtomicBool,
}

impl PeerMap {
    /// Wraps an opened peer map.
    pub(crate) fn new(map: MapData) -> Self {
        Self {
            map,
            combined: AtomicBool::new(true),
        }
    }

    fn call(
        &self,
        command: libc::c_long,
        key: &PeerKey,
        value: Option<&mut ConnectRecord>,
    ) -> io::Result<()> {
        let attr = ElemAttr {
            map_fd: self.map.fd().as_fd().as_raw_fd() as u32,
            _pad: 0,
            key: std::ptr::from_ref(key) as u64,
            value: value.map_or(0, |v| std::ptr::from_mut(v) as u64),
            flags: 0,
        };
        // SAFETY: attr is a valid bpf_attr prefix for element commands; key
        // and value point at buffers of the map's key and value sizes.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                command,
                std::ptr::from_ref(&attr),
                size_of::<ElemAttr>() as libc::c_uint,
            )
        };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Reads and deletes the record for `key`; `None` if there is none.
    pub(crate) fn take(&self, key: &PeerKey) -> io::Result<Option<ConnectRecord>> {
        let mut value = ConnectRecord::default();
        if self.combined.load(Ordering::Relaxed) {
            match self.call(BPF_MAP_LOOKUP_AND_DELETE_ELEM, key, Some(&mut value)) {
                Ok(()) => return Ok(Some(value)),
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP)
                    ) =>
                {
                    // Kernel without lookup-and-delete for LRU maps.
                    self.combined.store(false, Ordering::Relaxed);
                }
                Err(e) => return Err(e),
            }
        }
        match self.call(BPF_MAP_LOOKUP_ELEM, key, Some(&mut value)) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
            Err(e) => return Err(e),
        }
        match self.call(BPF_MAP_DELETE_ELEM, key, None) {
            Ok(()) => Ok(Some(value)),
            // Taken concurrently by another accept of the same 4-tuple: it
            // was ours to use once, and it has been.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }
}
