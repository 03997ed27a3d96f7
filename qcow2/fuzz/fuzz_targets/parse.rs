//! Arbitrary bytes as a whole qcow2 file: read the layout, then copy the data
//! into a sink that only checks bounds. Neither step may panic, and whatever
//! the reader accepts must cover the guest disk exactly once.

#![no_main]

use std::io;

use libfuzzer_sys::fuzz_target;
use qcow2::{copy_data, Layout, Sink};

/// Virtual size cap, so that each input stays fast.
const VOLUME: u64 = 16 << 20;

struct Bounds {
    size: u64,
    covered: u64,
}

impl Bounds {
    fn record(&mut self, offset: u64, len: u64) -> io::Result<()> {
        let end = offset.checked_add(len).expect("offset + len overflows");
        assert!(
            len > 0 && end <= self.size,
            "call {offset}+{len} outside a {}-byte disk",
            self.size
        );
        self.covered += len;
        Ok(())
    }
}

impl Sink for Bounds {
    fn write_at(&mut self, guest_offset: u64, data: &[u8]) -> io::Result<()> {
        self.record(guest_offset, data.len() as u64)
    }

    fn zero(&mut self, guest_offset: u64, len: u64) -> io::Result<()> {
        self.record(guest_offset, len)
    }
}

fuzz_target!(|file: &[u8]| {
    let mut source = file.to_vec();
    let Ok(layout) = Layout::read(&mut source, file.len() as u64, VOLUME) else {
        return;
    };
    let mut extents: Vec<(u64, u64)> = layout
        .extents()
        .iter()
        .map(|e| (e.guest_offset(), e.guest_len()))
        .collect();
    extents.sort_unstable();
    let mut end = 0;
    for (offset, len) in extents {
        assert_eq!(offset, end, "extents leave a gap or overlap");
        end = offset + len;
    }
    assert_eq!(end, layout.virtual_size());

    let mut sink = Bounds {
        size: layout.virtual_size(),
        covered: 0,
    };
    if copy_data(&layout, file, 0, &mut sink).is_ok() {
        assert_eq!(sink.covered, layout.virtual_size());
    }
});
