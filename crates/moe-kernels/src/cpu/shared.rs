//! A mutable f32 buffer that parallel tasks write through, each task owning disjoint
//! elements (the kernels' column split guarantees it).

use std::marker::PhantomData;

/// A `&mut [f32]` shared by tasks that write disjoint elements.
pub struct SharedMut<'a> {
    ptr: *mut f32,
    len: usize,
    _borrow: PhantomData<&'a mut [f32]>,
}

// SAFETY: the buffer is exclusively borrowed for 'a; users promise (by the `unsafe` methods)
// that no element is accessed by two threads at once.
unsafe impl Sync for SharedMut<'_> {}
unsafe impl Send for SharedMut<'_> {}

impl<'a> SharedMut<'a> {
    /// Shares `buf` for the duration of its borrow.
    pub fn new(buf: &'a mut [f32]) -> Self {
        Self {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
            _borrow: PhantomData,
        }
    }

    /// Element `i`, mutably.
    ///
    /// # Safety
    /// No other thread may access element `i` while the reference lives.
    #[inline(always)]
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn at(&self, i: usize) -> &mut f32 {
        assert!(i < self.len);
        // SAFETY: in bounds (checked); exclusivity is the caller's promise.
        unsafe { &mut *self.ptr.add(i) }
    }
}
