//! Reusable packet buffers, so a steady flow of datagrams does not allocate.

/// Buffers kept for reuse; beyond this the pool lets them go.
const MAX_POOLED: usize = 1024;

#[derive(Default)]
pub(super) struct BufferPool {
    free: Vec<Vec<u8>>,
}

impl BufferPool {
    /// A buffer of exactly `len` bytes (contents unspecified).
    pub(super) fn take(&mut self, len: usize) -> Vec<u8> {
        let mut buffer = self.free.pop().unwrap_or_default();
        buffer.resize(len, 0);
        buffer
    }

    pub(super) fn copy_of(&mut self, bytes: &[u8]) -> Vec<u8> {
        let mut buffer = self.free.pop().unwrap_or_default();
        buffer.clear();
        buffer.extend_from_slice(bytes);
        buffer
    }

    pub(super) fn put(&mut self, buffer: Vec<u8>) {
        if self.free.len() < MAX_POOLED && buffer.capacity() > 0 {
            self.free.push(buffer);
        }
    }
}
