//! Megatron-Core's indexed dataset (`PREFIX.bin` + `PREFIX.idx`), byte-compatible both ways.
//!
//! `.bin` holds the tokens of every sequence back to back. `.idx` is, little-endian and without
//! alignment: magic `MMIDIDX\0\0` (9 bytes), version u64 = 1, dtype code u8, sequence count
//! u64 `S`, document-index count u64 `D`, then `S` sequence lengths (i32, in tokens), `S`
//! sequence pointers (i64, byte offsets into `.bin`), and `D` document indices (i64: 0, then the
//! sequence count after each document, so `D` = documents + 1).

mod reader;
mod writer;

pub use reader::IndexedDataset;
pub use writer::{IndexedWriter, WriteSummary};

/// First bytes of every `.idx` file.
pub const MAGIC: &[u8; 9] = b"MMIDIDX\x00\x00";
/// The index version written and read.
pub const VERSION: u64 = 1;
/// Bytes before the arrays: magic, version, dtype, two counts.
pub const HEADER_LEN: usize = 9 + 8 + 1 + 8 + 8;

/// `PREFIX.bin` and `PREFIX.idx` of a prefix.
pub fn paths(prefix: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let with = |ext: &str| {
        let mut s = prefix.as_os_str().to_owned();
        s.push(ext);
        std::path::PathBuf::from(s)
    };
    (with(".bin"), with(".idx"))
}
