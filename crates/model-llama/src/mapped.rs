//! Memory-mapped checkpoint files: every tensor is copied out of the map when it is loaded
//! (converted to f32, or into a packed weight), after which its pages only inflate the
//! process's resident set. Releasing them keeps file-backed memory at about one tensor, however
//! many layers a pipeline or an evaluation walks through.

use std::ops::Range;

use memmap2::Mmap;

/// Covers every page size in use (4 KiB, 16 KiB, 64 KiB): `madvise` needs an aligned start.
const ALIGN: usize = 64 << 10;

/// Drops the pages of `bytes` (a range of `mmap`) from this process's resident set.
pub(crate) fn release(mmap: &Mmap, bytes: Range<usize>) {
    let start = bytes.start / ALIGN * ALIGN;
    let end = bytes.end.min(mmap.len());
    if start >= end {
        return;
    }
    #[cfg(unix)]
    {
        // SAFETY: the map is read-only and backed by the file, so MADV_DONTNEED only drops the
        // pages from this process: a later read (through any live borrow, including of a
        // neighbouring tensor sharing a page) faults the same bytes back in from the page
        // cache. No memory is freed or changed under a reference.
        let _ = unsafe {
            mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start)
        };
    }
}
