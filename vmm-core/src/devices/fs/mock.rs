//! A small in-memory [`FileSystem`] for tests: a root directory holding a
//! file `hello` (`"hello, world\n"`), an empty directory `dir`, and
//! whatever tests create; it records every call's name.

use core::time::Duration;

use heapless::{String, Vec};

use super::backend::{
    Attr, Context, DirEntry, DirSink, Entry, Errno, FileSystem, Handle, Inode, Name, Opened,
    SetAttr, StatFs, ROOT_INODE,
};

/// Most nodes the mock holds.
pub const MOCK_NODES: usize = 16;
/// Most bytes of a mock file.
pub const MOCK_FILE_SIZE: usize = 256;
/// Most calls the mock records.
pub const MOCK_CALLS: usize = 64;

/// `S_IFDIR`.
const S_IFDIR: u32 = 0o040000;
/// `S_IFREG`.
const S_IFREG: u32 = 0o100000;
/// `DT_DIR`.
const DT_DIR: u32 = 4;
/// `DT_REG`.
const DT_REG: u32 = 8;

/// One node of the mock file system.
#[derive(Clone, Debug)]
pub struct MockNode {
    /// Its node id.
    pub inode: Inode,
    /// Its parent's.
    pub parent: Inode,
    /// Its name.
    pub name: String<32>,
    /// Whether it is a directory.
    pub dir: bool,
    /// Its contents (files).
    pub data: Vec<u8, MOCK_FILE_SIZE>,
    /// Lookup references the guest holds.
    pub lookups: u64,
}

/// The mock file system.
#[derive(Debug)]
pub struct MockFs {
    /// The nodes, the root first.
    pub nodes: Vec<MockNode, MOCK_NODES>,
    /// The names of the calls made, in order.
    pub calls: Vec<&'static str, MOCK_CALLS>,
    /// Make `init` fail with this.
    pub fail_init: Option<Errno>,
    /// The next node id to hand out.
    next: Inode,
}

impl Default for MockFs {
    fn default() -> Self {
        MockFs::new()
    }
}

impl MockFs {
    /// The root, `hello` and `dir`.
    pub fn new() -> Self {
        let mut fs = MockFs {
            nodes: Vec::new(),
            calls: Vec::new(),
            fail_init: None,
            next: ROOT_INODE + 1,
        };
        fs.add(ROOT_INODE, "", true, b"");
        fs.add(ROOT_INODE, "hello", false, b"hello, world\n");
        fs.add(ROOT_INODE, "dir", true, b"");
        fs
    }

    fn add(&mut self, parent: Inode, name: &str, dir: bool, data: &[u8]) -> Option<Inode> {
        let inode = if self.nodes.is_empty() {
            ROOT_INODE
        } else {
            let i = self.next;
            self.next += 1;
            i
        };
        let node = MockNode {
            inode,
            parent,
            name: String::try_from(name).ok()?,
            dir,
            data: Vec::from_slice(data).ok()?,
            lookups: 0,
        };
        self.nodes.push(node).ok()?;
        Some(inode)
    }

    fn note(&mut self, call: &'static str) {
        let _ = self.calls.push(call);
    }

    /// Whether `call` was made.
    pub fn called(&self, call: &'static str) -> bool {
        self.calls.contains(&call)
    }

    /// The node `inode`.
    pub fn node(&self, inode: Inode) -> Option<&MockNode> {
        self.nodes.iter().find(|n| n.inode == inode)
    }

    fn node_mut(&mut self, inode: Inode) -> Result<&mut MockNode, Errno> {
        self.nodes
            .iter_mut()
            .find(|n| n.inode == inode)
            .ok_or(Errno::BADF)
    }

    fn child(&self, parent: Inode, name: &[u8]) -> Option<&MockNode> {
        self.nodes
            .iter()
            .find(|n| n.parent == parent && n.inode != ROOT_INODE && n.name.as_bytes() == name)
    }

    fn attr_of(n: &MockNode) -> Attr {
        Attr {
            ino: n.inode,
            size: n.data.len() as u64,
            mode: if n.dir {
                S_IFDIR | 0o755
            } else {
                S_IFREG | 0o644
            },
            nlink: 1,
            blksize: 4096,
            ..Attr::default()
        }
    }

    fn entry_of(n: &MockNode) -> Entry {
        Entry {
            inode: n.inode,
            generation: 0,
            attr: Self::attr_of(n),
            entry_timeout: Duration::from_secs(1),
            attr_timeout: Duration::from_secs(1),
        }
    }

    fn create_node(&mut self, parent: Inode, name: Name<'_>, dir: bool) -> Result<Entry, Errno> {
        if self.child(parent, name.as_bytes()).is_some() {
            return Err(Errno(17)); // EEXIST
        }
        let name = core::str::from_utf8(name.as_bytes()).map_err(|_| Errno::INVAL)?;
        let inode = self.add(parent, name, dir, b"").ok_or(Errno(28))?; // ENOSPC
        let n = self.node_mut(inode)?;
        n.lookups += 1;
        Ok(Self::entry_of(n))
    }
}

impl FileSystem for MockFs {
    fn init(&mut self) -> Result<(), Errno> {
        self.note("init");
        self.fail_init.map_or(Ok(()), Err)
    }

    fn destroy(&mut self) {
        self.note("destroy");
    }

    fn lookup(&mut self, _: &Context, parent: Inode, name: Name<'_>) -> Result<Entry, Errno> {
        self.note("lookup");
        let inode = self
            .child(parent, name.as_bytes())
            .ok_or(Errno::NOENT)?
            .inode;
        let n = self.node_mut(inode)?;
        n.lookups += 1;
        Ok(Self::entry_of(n))
    }

    fn forget(&mut self, inode: Inode, count: u64) {
        self.note("forget");
        if let Ok(n) = self.node_mut(inode) {
            n.lookups = n.lookups.saturating_sub(count);
        }
    }

    fn getattr(
        &mut self,
        _: &Context,
        inode: Inode,
        _: Option<Handle>,
    ) -> Result<(Attr, Duration), Errno> {
        self.note("getattr");
        let n = self.node(inode).ok_or(Errno::NOENT)?;
        Ok((Self::attr_of(n), Duration::from_secs(1)))
    }

    fn setattr(
        &mut self,
        _: &Context,
        inode: Inode,
        attr: &SetAttr,
    ) -> Result<(Attr, Duration), Errno> {
        self.note("setattr");
        let n = self.node_mut(inode)?;
        if let Some(size) = attr.size {
            let size = usize::try_from(size).map_err(|_| Errno(27))?;
            n.data.resize(size, 0).map_err(|_| Errno(27))?; // EFBIG
        }
        Ok((Self::attr_of(n), Duration::from_secs(1)))
    }

    fn readlink(&mut self, _: &Context, _: Inode, _: &mut [u8]) -> Result<usize, Errno> {
        self.note("readlink");
        Err(Errno::INVAL)
    }

    fn symlink(&mut self, _: &Context, _: Inode, _: Name<'_>, _: &[u8]) -> Result<Entry, Errno> {
        self.note("symlink");
        Err(Errno::PERM)
    }

    fn mknod(
        &mut self,
        _: &Context,
        parent: Inode,
        name: Name<'_>,
        _: u32,
        _: u32,
        _: u32,
    ) -> Result<Entry, Errno> {
        self.note("mknod");
        self.create_node(parent, name, false)
    }

    fn mkdir(
        &mut self,
        _: &Context,
        parent: Inode,
        name: Name<'_>,
        _: u32,
        _: u32,
    ) -> Result<Entry, Errno> {
        self.note("mkdir");
        self.create_node(parent, name, true)
    }

    fn unlink(&mut self, _: &Context, parent: Inode, name: Name<'_>) -> Result<(), Errno> {
        self.note("unlink");
        let inode = self
            .child(parent, name.as_bytes())
            .ok_or(Errno::NOENT)?
            .inode;
        self.nodes.retain(|n| n.inode != inode);
        Ok(())
    }

    fn rmdir(&mut self, ctx: &Context, parent: Inode, name: Name<'_>) -> Result<(), Errno> {
        self.note("rmdir");
        self.unlink(ctx, parent, name)
    }

    fn rename(
        &mut self,
        _: &Context,
        _: Inode,
        _: Name<'_>,
        _: Inode,
        _: Name<'_>,
        _: u32,
    ) -> Result<(), Errno> {
        self.note("rename");
        Err(Errno::XDEV)
    }

    fn link(&mut self, _: &Context, _: Inode, _: Inode, _: Name<'_>) -> Result<Entry, Errno> {
        self.note("link");
        Err(Errno::PERM)
    }

    fn open(&mut self, _: &Context, inode: Inode, _: u32) -> Result<Opened, Errno> {
        self.note("open");
        let n = self.node(inode).ok_or(Errno::NOENT)?;
        Ok(Opened {
            handle: n.inode + 100,
            flags: 0,
        })
    }

    fn read(
        &mut self,
        _: &Context,
        inode: Inode,
        _: Handle,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize, Errno> {
        self.note("read");
        let n = self.node(inode).ok_or(Errno::BADF)?;
        let data = usize::try_from(offset)
            .ok()
            .and_then(|o| n.data.get(o..))
            .unwrap_or_default();
        let len = data.len().min(buf.len());
        buf[..len].copy_from_slice(&data[..len]);
        Ok(len)
    }

    fn write(
        &mut self,
        _: &Context,
        inode: Inode,
        _: Handle,
        offset: u64,
        data: &[u8],
        _: bool,
    ) -> Result<usize, Errno> {
        self.note("write");
        let n = self.node_mut(inode)?;
        let at = usize::try_from(offset).map_err(|_| Errno(27))?;
        let end = at.checked_add(data.len()).ok_or(Errno(27))?;
        if end > MOCK_FILE_SIZE {
            return Err(Errno(27)); // EFBIG
        }
        if n.data.len() < end {
            n.data.resize(end, 0).map_err(|_| Errno(27))?;
        }
        n.data[at..end].copy_from_slice(data);
        Ok(data.len())
    }

    fn statfs(&mut self, _: &Context, _: Inode) -> Result<StatFs, Errno> {
        self.note("statfs");
        Ok(StatFs {
            blocks: 100,
            bfree: 50,
            bavail: 50,
            files: MOCK_NODES as u64,
            ffree: (MOCK_NODES - self.nodes.len()) as u64,
            bsize: 4096,
            namelen: 255,
            frsize: 4096,
        })
    }

    fn release(&mut self, _: &Context, _: Inode, _: Handle) -> Result<(), Errno> {
        self.note("release");
        Ok(())
    }

    fn fsync(&mut self, _: &Context, _: Inode, _: Handle, _: bool) -> Result<(), Errno> {
        self.note("fsync");
        Ok(())
    }

    fn flush(&mut self, _: &Context, _: Inode, _: Handle) -> Result<(), Errno> {
        self.note("flush");
        Ok(())
    }

    fn setxattr(&mut self, _: &Context, _: Inode, _: &[u8], _: &[u8], _: u32) -> Result<(), Errno> {
        self.note("setxattr");
        Err(Errno::OPNOTSUPP)
    }

    fn getxattr(
        &mut self,
        _: &Context,
        _: Inode,
        name: &[u8],
        buf: &mut [u8],
    ) -> Result<usize, Errno> {
        self.note("getxattr");
        // One attribute, user.mock = "value".
        if name != b"user.mock" {
            return Err(Errno::NODATA);
        }
        xattr_value(b"value", buf)
    }

    fn listxattr(&mut self, _: &Context, _: Inode, buf: &mut [u8]) -> Result<usize, Errno> {
        self.note("listxattr");
        xattr_value(b"user.mock\0", buf)
    }

    fn removexattr(&mut self, _: &Context, _: Inode, _: &[u8]) -> Result<(), Errno> {
        self.note("removexattr");
        Err(Errno::NODATA)
    }

    fn opendir(&mut self, _: &Context, inode: Inode, _: u32) -> Result<Opened, Errno> {
        self.note("opendir");
        match self.node(inode) {
            Some(n) if n.dir => Ok(Opened {
                handle: inode + 200,
                flags: 0,
            }),
            Some(_) => Err(Errno(20)), // ENOTDIR
            None => Err(Errno::NOENT),
        }
    }

    fn readdir(
        &mut self,
        _: &Context,
        inode: Inode,
        _: Handle,
        offset: u64,
        sink: &mut DirSink<'_>,
    ) -> Result<(), Errno> {
        self.note(if sink.is_plus() {
            "readdirplus"
        } else {
            "readdir"
        });
        // Cookies: 1 after ".", 2 after "..", 3.. after each child.
        let mut cookie = 0u64;
        let children: Vec<(Inode, bool, String<32>), MOCK_NODES> = self
            .nodes
            .iter()
            .filter(|n| n.parent == inode && n.inode != ROOT_INODE)
            .map(|n| (n.inode, n.dir, n.name.clone()))
            .collect();
        let dots = [(inode, true, "."), (inode, true, "..")];
        let all = dots
            .iter()
            .map(|&(i, d, name)| (i, d, name))
            .chain(children.iter().map(|(i, d, name)| (*i, *d, name.as_str())));
        for (ino, dir, name) in all {
            cookie += 1;
            if cookie <= offset {
                continue;
            }
            let e = DirEntry {
                ino,
                offset: cookie,
                kind: if dir { DT_DIR } else { DT_REG },
                name: name.as_bytes(),
            };
            if sink.is_plus() {
                if !sink.room_for(name.len()) {
                    break;
                }
                let entry = if name == "." || name == ".." {
                    Entry::default()
                } else {
                    let n = self.node_mut(ino)?;
                    n.lookups += 1;
                    Self::entry_of(n)
                };
                sink.add_plus(&e, &entry);
            } else if !sink.add(&e) {
                break;
            }
        }
        Ok(())
    }

    fn releasedir(&mut self, _: &Context, _: Inode, _: Handle) -> Result<(), Errno> {
        self.note("releasedir");
        Ok(())
    }

    fn fsyncdir(&mut self, _: &Context, _: Inode, _: Handle, _: bool) -> Result<(), Errno> {
        self.note("fsyncdir");
        Ok(())
    }

    fn access(&mut self, _: &Context, _: Inode, _: u32) -> Result<(), Errno> {
        self.note("access");
        Ok(())
    }

    fn create(
        &mut self,
        _: &Context,
        parent: Inode,
        name: Name<'_>,
        _: u32,
        _: u32,
        _: u32,
    ) -> Result<(Entry, Opened), Errno> {
        self.note("create");
        let e = self.create_node(parent, name, false)?;
        Ok((
            e,
            Opened {
                handle: e.inode + 100,
                flags: 0,
            },
        ))
    }

    fn fallocate(
        &mut self,
        _: &Context,
        _: Inode,
        _: Handle,
        _: u64,
        _: u64,
        _: u32,
    ) -> Result<(), Errno> {
        self.note("fallocate");
        Err(Errno::OPNOTSUPP)
    }

    fn lseek(
        &mut self,
        _: &Context,
        _: Inode,
        _: Handle,
        offset: u64,
        _: u32,
    ) -> Result<u64, Errno> {
        self.note("lseek");
        Ok(offset)
    }
}

/// Copies `value` into `buf` the way GETXATTR wants: its length when
/// `buf` is empty, `ERANGE` when it does not fit.
fn xattr_value(value: &[u8], buf: &mut [u8]) -> Result<usize, Errno> {
    if buf.is_empty() {
        return Ok(value.len());
    }
    let dst = buf.get_mut(..value.len()).ok_or(Errno::RANGE)?;
    dst.copy_from_slice(value);
    Ok(value.len())
}
