//! A global allocator that starts every large buffer on a 64-byte boundary, as PyTorch's CPU
//! allocator does (`c10::alloc_cpu`, 64 bytes).
//!
//! glibc's `malloc` aligns to 16 bytes, so three buffers in four start inside a cache line.
//! The matrix products here read the unfolded inputs and the activations in place
//! ([`crate::cpu::tune_gemm`]), a whole AVX-512 register (one cache line) per load: a buffer
//! that starts inside a line makes every such load span two lines. On an Intel Xeon (AVX-512),
//! one thread, `gemm` alone at the convolutions' shapes, the same buffers read from a 16-byte
//! offset and from a 64-byte boundary (best of 5, three rounds): 256x64x768 185-187 -> 200
//! GFLOP/s, 128x256x384 170-175 -> 196-204, 64x1024x192 150-159 -> 181-189. Training steps
//! there, old and new alternated: ResNet-18 (CIFAR stem) 934-966 -> 924-933 ms (least
//! 917-955 -> 873-889), its evaluation 290-295 -> 261-262, ResNet-50 1120-1127 -> 1094-1121,
//! CIFAR ResNet-20 118-121 -> 116-117.
//!
//! Binaries opt in with `#[global_allocator] static ALLOC: CacheLineAligned = CacheLineAligned;`
//! (`cutmix-train` does, so every binary of the workspace that trains or evaluates runs with
//! it). Small allocations keep the system allocator's alignment.

use std::alloc::{GlobalAlloc, Layout, System};

/// Allocations of at least this many bytes start on a 64-byte boundary.
const LARGE: usize = 4096;
/// A cache line, and the width of an AVX-512 register.
const LINE: usize = 64;
/// The alignment large blocks are asked of the system allocator with (glibc's `malloc`'s own).
const SYSTEM_ALIGN: usize = 16;

/// The system allocator, with allocations of [`LARGE`] bytes or more aligned to [`LINE`].
///
/// A large block is the system's block of [`LINE`] more bytes, its values starting at the
/// first line boundary at least a pointer's size in, with the system block's address in the
/// pointer's size just before them. The system allocator keeps serving every request as it
/// would have (glibc's own aligned allocation, `memalign`, fragmented the heap here: 30 MB of
/// fresh pages faulted in every ResNet-50 step and 13% more peak memory), and growing a block
/// keeps `realloc`'s in-place growth and page remapping.
pub struct CacheLineAligned;

/// Whether a request is served as a large block: at least [`LARGE`] bytes, asking for less
/// than a line's alignment (a stricter request goes to the system allocator as it is).
fn is_large(layout: Layout) -> bool {
    layout.size() >= LARGE && layout.align() <= SYSTEM_ALIGN
}

/// The system block behind a large request of `size` bytes.
fn system_layout(size: usize) -> Option<Layout> {
    Layout::from_size_align(size.checked_add(LINE)?, SYSTEM_ALIGN).ok()
}

/// The values' start in a system block at `raw`, with `raw` recorded just before it: the first
/// line boundary past `raw` (16 to 64 bytes in, as `raw` is aligned to 16).
///
/// # Safety
/// `raw` must be null or a live system block of `size + LINE` bytes aligned to 16.
unsafe fn place(raw: *mut u8) -> *mut u8 {
    if raw.is_null() {
        return raw;
    }
    let offset = LINE - raw as usize % LINE;
    // SAFETY: 16 <= offset <= LINE, so the values (size bytes) lie inside the block and the
    // pointer slot before them lies past raw.
    unsafe {
        let values = raw.add(offset);
        values.cast::<*mut u8>().sub(1).write_unaligned(raw);
        values
    }
}

/// A request served by `system` (the system allocator's `alloc` or `alloc_zeroed`): as it is
/// when small, else as a block of [`LINE`] more bytes with the values [`place`]d in it.
///
/// # Safety
/// `layout` must have a non-zero size, and `system` must return null or a block of the layout
/// it is given.
unsafe fn served(layout: Layout, system: impl FnOnce(Layout) -> *mut u8) -> *mut u8 {
    if !is_large(layout) {
        return system(layout);
    }
    let Some(block) = system_layout(layout.size()) else {
        return std::ptr::null_mut();
    };
    // SAFETY: a block of size + LINE bytes, aligned to 16, or null.
    unsafe { place(system(block)) }
}

/// The system block of a large block's values.
///
/// # Safety
/// `values` must have been returned by [`place`].
unsafe fn system_block(values: *mut u8) -> *mut u8 {
    // SAFETY: `place` wrote the block's address just before the values.
    unsafe { values.cast::<*mut u8>().sub(1).read_unaligned() }
}

// SAFETY: small requests (and stricter alignments) go to `System` as they are. A large request
// is served from a `System` block of LINE more bytes, with the values starting at the first
// line boundary past a pointer slot that records the block (`place`), so they are aligned as
// asked (LINE is a multiple of every alignment `is_large` accepts) and lie inside the block;
// `dealloc` and `realloc` find the block in that slot, and the same size rule tells them
// which kind a block is.
unsafe impl GlobalAlloc for CacheLineAligned {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded (`System::alloc` has `alloc`'s contract).
        unsafe { served(layout, |layout| System.alloc(layout)) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as `alloc` (for a large block, calloc: fresh pages are not written).
        unsafe { served(layout, |layout| System.alloc_zeroed(layout)) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if !is_large(layout) {
            // SAFETY: forwarded.
            return unsafe { System.dealloc(ptr, layout) };
        }
        let block = system_layout(layout.size()).expect("allocated");
        // SAFETY: a large block: `place` recorded its system block.
        unsafe { System.dealloc(system_block(ptr), block) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let Ok(new) = Layout::from_size_align(new_size, layout.align()) else {
            return std::ptr::null_mut();
        };
        match (is_large(layout), is_large(new)) {
            // SAFETY: forwarded.
            (false, false) => unsafe { System.realloc(ptr, layout, new_size) },
            (true, true) => {
                let old_block = system_layout(layout.size()).expect("allocated");
                let Some(new_block) = system_layout(new_size) else {
                    return std::ptr::null_mut();
                };
                // SAFETY: the system block resized (its contents kept, as far as both hold);
                // where its new address puts the line boundary elsewhere, the values move
                // there (overlapping copy, within the block).
                unsafe {
                    let raw = system_block(ptr);
                    let offset = ptr as usize - raw as usize;
                    let moved = System.realloc(raw, old_block, new_block.size());
                    if moved.is_null() {
                        return moved;
                    }
                    // The values first, then the slot before them, which may lie inside the
                    // values' old place.
                    let placed = LINE - moved as usize % LINE;
                    if placed != offset {
                        let kept = layout.size().min(new_size);
                        std::ptr::copy(moved.add(offset), moved.add(placed), kept);
                    }
                    place(moved)
                }
            }
            // Across the threshold: a new block, the values copied, the old block released.
            _ => unsafe {
                let moved = self.alloc(new);
                if !moved.is_null() {
                    std::ptr::copy_nonoverlapping(ptr, moved, layout.size().min(new_size));
                    self.dealloc(ptr, layout);
                }
                moved
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes `len` bytes of a pattern at `p`.
    unsafe fn fill(p: *mut u8, len: usize) {
        for i in 0..len {
            unsafe { *p.add(i) = (i % 251) as u8 };
        }
    }

    /// Whether `len` bytes at `p` hold the pattern.
    unsafe fn holds(p: *const u8, len: usize) -> bool {
        (0..len).all(|i| unsafe { *p.add(i) } == (i % 251) as u8)
    }

    /// Large blocks start on a line, small ones keep their alignment, and `realloc` keeps the
    /// values whichever way it goes: within small or large blocks, across the threshold both
    /// ways, and where the system block moves so that its line boundary is elsewhere (the
    /// allocator called directly: the test binary runs on the system allocator).
    #[test]
    fn large_blocks_start_on_a_line_and_keep_their_values() {
        let a = CacheLineAligned;
        let layout = |size| Layout::from_size_align(size, 4).unwrap();
        unsafe {
            let mut p = a.alloc(layout(100));
            fill(p, 100);
            let mut size = 100;
            // Up past the threshold, then through large sizes (the system block moves, its
            // offset to the next line changing), then back down below it.
            for next in [
                200,
                5000,
                4096,
                9000,
                70_000,
                1 << 20,
                3 << 20,
                6000,
                5000,
                300,
                50,
            ] {
                p = a.realloc(p, layout(size), next);
                assert!(!p.is_null());
                assert!(holds(p, size.min(next)), "{size} -> {next} bytes");
                if next >= LARGE {
                    assert_eq!(p as usize % LINE, 0, "{next} bytes");
                }
                fill(p, next);
                size = next;
            }
            a.dealloc(p, layout(size));
            // Blocks side by side, so that a move lands elsewhere.
            let mut blocks: Vec<(*mut u8, usize)> = (0..40)
                .map(|i| {
                    let size = LARGE + i * 24;
                    let p = a.alloc(layout(size));
                    fill(p, size);
                    (p, size)
                })
                .collect();
            for (p, size) in &mut blocks {
                let next = *size * 3 + 8;
                *p = a.realloc(*p, layout(*size), next);
                assert_eq!(*p as usize % LINE, 0);
                assert!(holds(*p, *size), "{size} -> {next} bytes");
                *size = next;
            }
            for (p, size) in blocks {
                a.dealloc(p, layout(size));
            }
            for size in [LARGE, LARGE + 4, 1 << 20, 40 << 20] {
                let p = a.alloc_zeroed(layout(size));
                assert_eq!(p as usize % LINE, 0, "{size} bytes");
                assert!((0..size).step_by(997).all(|i| *p.add(i) == 0));
                a.dealloc(p, layout(size));
            }
            let strict = Layout::from_size_align(LARGE, 128).unwrap();
            let p = a.alloc(strict);
            assert_eq!(p as usize % 128, 0, "a stricter alignment kept");
            a.dealloc(p, strict);
        }
    }
}
