//! Reads that bypass the kernel's page cache (`O_DIRECT`): the disk's DMA lands in our buffer,
//! so a miss costs no page-cache copy, leaves no pages behind that the budget does not count,
//! and needs no `POSIX_FADV_DONTNEED` afterwards. Direct reads need block-aligned offsets,
//! lengths and buffer addresses, so a byte range is read as the aligned window around it.

use std::alloc::{self, Layout};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::ptr::NonNull;

/// Alignment of direct reads: offsets, lengths and buffer addresses. 4 KiB covers every
/// logical block size in use (512 B and 4 KiB).
pub const DIRECT_ALIGN: usize = 4096;

/// The most a direct read of one range allocates beyond the range itself: the alignment
/// window's head and tail.
pub const DIRECT_SLACK: usize = 2 * DIRECT_ALIGN;

/// Opens `path` for direct reads; `None` where the file system does not support them (tmpfs,
/// some network and overlay file systems), in which case the caller reads through the page
/// cache.
pub fn open_direct(path: &Path) -> Option<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .ok()
}

/// A heap buffer aligned to [`DIRECT_ALIGN`] holding `len` bytes read from a file, of which
/// `range` is what the caller asked for.
pub struct AlignedRead {
    ptr: NonNull<u8>,
    layout: Layout,
    start: usize,
    len: usize,
}

// SAFETY: the buffer is uniquely owned heap memory, freed in `Drop`.
unsafe impl Send for AlignedRead {}
// SAFETY: shared access is read-only (`as_ref`).
unsafe impl Sync for AlignedRead {}

impl AsRef<[u8]> for AlignedRead {
    /// The bytes asked for (the aligned window's head and tail left out).
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `read_direct` returns a value only once the kernel has written every byte of
        // `start..start + len`, which lies inside the allocation.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(self.start), self.len) }
    }
}

impl Drop for AlignedRead {
    fn drop(&mut self) {
        // SAFETY: allocated in `read_direct` with this very layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// Reads `len` bytes at `offset` from `file`, which was opened by [`open_direct`]: the aligned
/// window around them is read into an aligned buffer with no zero fill. Errors are the OS's
/// (`EINVAL` when the device wants a larger alignment than [`DIRECT_ALIGN`]); a file that ends
/// before `offset + len` is `UnexpectedEof`.
pub fn read_direct(file: &File, offset: u64, len: usize) -> std::io::Result<AlignedRead> {
    let align = DIRECT_ALIGN as u64;
    let window_start = offset / align * align;
    let end = offset + len as u64;
    let window_len = (end.div_ceil(align) * align - window_start) as usize;
    let layout = Layout::from_size_align(window_len.max(DIRECT_ALIGN), DIRECT_ALIGN)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: the layout has a non-zero size.
    let ptr = NonNull::new(unsafe { alloc::alloc(layout) })
        .unwrap_or_else(|| alloc::handle_alloc_error(layout));
    let read = AlignedRead {
        ptr,
        layout,
        start: (offset - window_start) as usize,
        len,
    };
    let needed = (end - window_start) as usize;
    let mut done = 0usize;
    while done < needed {
        // SAFETY: `done < window_len`, so the destination stays inside the allocation; the
        // kernel writes at most `window_len - done` bytes there. Both stay multiples of the
        // alignment until the file's end, where a short read ends the loop below.
        let n = unsafe {
            libc::pread(
                file.as_raw_fd(),
                read.ptr.as_ptr().add(done).cast(),
                window_len - done,
                (window_start + done as u64) as libc::off_t,
            )
        };
        match n {
            n if n > 0 => done += n as usize,
            0 => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("file ends before byte {end}"),
                ))
            }
            _ => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
        if done < needed && done % DIRECT_ALIGN != 0 {
            // A short read that is not block-aligned is the file's end.
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("file ends before byte {end}"),
            ));
        }
    }
    Ok(read)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn direct_reads_match_buffered_reads_at_unaligned_ranges() {
        let dir = std::env::temp_dir().join(format!("moe-direct-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("data.bin");
        let data: Vec<u8> = (0..50_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        std::fs::File::create(&path)
            .unwrap()
            .write_all(&data)
            .unwrap();
        let Some(file) = open_direct(&path) else {
            eprintln!("skipped: the temp dir's file system has no O_DIRECT");
            return;
        };
        for (offset, len) in [(0, 1), (1, 4095), (4095, 2), (4096, 4096), (12_345, 30_001)] {
            let got = read_direct(&file, offset as u64, len).unwrap();
            assert_eq!(
                got.as_ref(),
                &data[offset..offset + len],
                "at {offset}+{len}"
            );
        }
        // The last byte is readable; one past the end is an error, not garbage.
        let tail = read_direct(&file, 49_990, 10).unwrap();
        assert_eq!(tail.as_ref(), &data[49_990..]);
        let err = read_direct(&file, 49_990, 11).err().expect("past the end");
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
