//! Prints the header and layout of a qcow2 file: `cargo run -p qcow2 --example layout -- FILE [-v]`.

use std::fs::File;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args.next().ok_or("usage: layout FILE [-v]")?;
    let verbose = args.next().as_deref() == Some("-v");
    let mut file = File::open(&path)?;
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
    Ok(())
}
