//! virtio-fs, the shared file system device (virtio 1.2, section 5.11):
//! FUSE requests from the guest, answered by a host [`FileSystem`].

mod backend;

pub use backend::{
    Attr, Context, DirEntry, DirSink, Entry, Errno, FileSystem, Handle, Inode, Name, Opened,
    SetAttr, SetTime, StatFs, NAME_MAX, ROOT_INODE,
};

/// virtio device ID of a file system device.
pub const VIRTIO_ID_FS: u32 = 26;
