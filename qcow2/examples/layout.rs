//! Prints the header and layout of a qcow2 file, and optionally converts it
//! to a raw file in one pass:
//!
//! `cargo run -p qcow2 --example layout -- FILE [-v] [--raw OUT]`

use std::fs::File;
use std::io::{self, BufReader, Seek, SeekFrom};
use std::os::unix::fs::FileExt;

/// A fresh sparse file: zero ranges are already zeros.
struct RawFile(File);

impl qcow2::Sink for RawFile {
    fn write_at(&mut self, guest_offset: u64, data: &[u8]) -> io::Result<()> {
        self.0.write_all_at(data, guest_offset)
    }

    fn zero(&mut self, _guest_offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let path = args.first().ok_or("usage: layout FILE [-v] [--raw OUT]")?;
    let verbose = args.iter().any(|a| a == "-v");
    let raw = args
        .iter()
        .position(|a| a == "--raw")
        .and_then(|i| args.get(i + 1));

    let mut file = File::open(path)?;
    let file_len = file.metadata()?.len();
    let header = qcow2::Header::read(&mut file, file_len)?;
    println!("{header:#?}");
    let layout = qcow2::Layout::from_header(header, &mut file, file_len, u64::MAX)?;
    println!(
        "file {file_len} bytes; data {} bytes in {} extents, zeros {} bytes in {} extents; data spans file offsets {:?}..{:?}",
        layout.data_bytes(),
        layout.host_extents().len(),
        layout.zero_bytes(),
        layout.zero_extents().len(),
        layout.first_data_offset(),
        layout.data_end_offset(),
    );
    if verbose {
        for extent in layout.extents() {
            println!("{extent:?}");
        }
    }

    if let Some(raw) = raw {
        let out = File::create(raw)?;
        out.set_len(layout.virtual_size())?;
        let start = layout.first_data_offset().unwrap_or(0);
        file.seek(SeekFrom::Start(start))?;
        let stream = BufReader::with_capacity(1 << 20, file);
        let started = std::time::Instant::now();
        let stats = qcow2::copy_data(&layout, stream, start, &mut RawFile(out))?;
        println!("{stats:?} in {:.2?}", started.elapsed());
    }
    Ok(())
}
