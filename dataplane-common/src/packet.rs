//! Read access to packet bytes, abstracted so the same parser runs in the kernel and on the host.

/// A packet the parser can read from.
///
/// Implementations check bounds on every read: `read` returns `None` instead of ever reading
/// outside the packet. In the kernel this is the only place packet offsets become pointers
/// (see `dataplane-ebpf/src/packet.rs`); on the host it is [`SlicePacket`].
pub trait PacketView {
    /// Length of the whole packet in bytes. For TC this is `skb->len`, which can exceed the
    /// directly readable (linear) part.
    fn len(&self) -> usize;

    /// Whether the packet has no bytes.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copies the `T` stored at `offset`, or `None` when `offset + size_of::<T>()` is past the
    /// end of the packet. `T` must be a plain header type made of integers and byte arrays.
    fn read<T: Copy>(&self, offset: usize) -> Option<T>;
}

/// A packet held in a byte slice (host tests, user-space tools).
#[derive(Clone, Copy, Debug)]
pub struct SlicePacket<'a>(pub &'a [u8]);

impl PacketView for SlicePacket<'_> {
    fn len(&self) -> usize {
        self.0.len()
    }

    fn read<T: Copy>(&self, offset: usize) -> Option<T> {
        let end = offset.checked_add(core::mem::size_of::<T>())?;
        let bytes = self.0.get(offset..end)?;
        // SAFETY: `bytes` is exactly `size_of::<T>()` readable bytes (checked above);
        // `read_unaligned` has no alignment requirement; callers only use plain header types
        // (integers and byte arrays) for which every bit pattern is valid.
        Some(unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
    }
}
