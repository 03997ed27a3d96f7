//! Assembles initramfs images.
