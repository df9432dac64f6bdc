//! The `.idx`/`.bin` byte layout against fixtures written independently by
//! `scripts/make_indexed_fixture.py` (numpy, from the format's definition): reading, writing
//! byte for byte, and every kind of corruption.

use origami_data::dtype::TokenDtype;
use origami_data::indexed::{paths, IndexedDataset, IndexedWriter};
use origami_data::DataError;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn expected(name: &str) -> (u8, Vec<Vec<Vec<u32>>>) {
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("expected.json")).unwrap())
            .unwrap();
    let entry = &json[name];
    let documents = entry["documents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            d.as_array()
                .unwrap()
                .iter()
                .map(|s| {
                    s.as_array()
                        .unwrap()
                        .iter()
                        .map(|t| t.as_u64().unwrap() as u32)
                        .collect()
                })
                .collect()
        })
        .collect();
    (entry["dtype_code"].as_u64().unwrap() as u8, documents)
}

#[test]
fn reads_the_numpy_fixtures() {
    for name in ["uint16", "int32"] {
        let (code, documents) = expected(name);
        let data = IndexedDataset::open(&fixtures().join(name)).unwrap();
        assert_eq!(data.dtype().code(), code);
        assert_eq!(data.num_documents(), documents.len());
        for (d, doc) in documents.iter().enumerate() {
            let sequences: Vec<Vec<u32>> = data
                .document_sequences(d)
                .map(|s| data.sequence(s).unwrap())
                .collect();
            assert_eq!(&sequences, doc, "{name} document {d}");
        }
    }
}

#[test]
fn writes_the_same_bytes_as_the_numpy_fixtures() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["uint16", "int32"] {
        let (code, documents) = expected(name);
        let prefix = dir.path().join(name);
        let mut writer =
            IndexedWriter::create(&prefix, TokenDtype::from_code(code).unwrap()).unwrap();
        for doc in &documents {
            for sequence in doc {
                writer.add_sequence(sequence).unwrap();
            }
            writer.end_document();
        }
        writer.finish().unwrap();
        let (ours_bin, ours_idx) = paths(&prefix);
        let (their_bin, their_idx) = paths(&fixtures().join(name));
        assert_eq!(
            std::fs::read(ours_idx).unwrap(),
            std::fs::read(their_idx).unwrap(),
            "{name}.idx bytes"
        );
        assert_eq!(
            std::fs::read(ours_bin).unwrap(),
            std::fs::read(their_bin).unwrap(),
            "{name}.bin bytes"
        );
    }
}

/// Copies the uint16 fixture, lets `damage` change the (idx, bin) bytes, and returns the open error.
fn open_damaged(damage: impl Fn(&mut Vec<u8>, &mut Vec<u8>)) -> String {
    let dir = tempfile::tempdir().unwrap();
    let (bin, idx) = paths(&fixtures().join("uint16"));
    let (mut idx_bytes, mut bin_bytes) = (std::fs::read(idx).unwrap(), std::fs::read(bin).unwrap());
    damage(&mut idx_bytes, &mut bin_bytes);
    let prefix = dir.path().join("damaged");
    let (new_bin, new_idx) = paths(&prefix);
    std::fs::write(new_idx, idx_bytes).unwrap();
    std::fs::write(new_bin, bin_bytes).unwrap();
    match IndexedDataset::open(&prefix) {
        Err(e @ DataError::Corrupt { .. }) => e.to_string(),
        Err(other) => panic!("expected a corruption error, got {other}"),
        Ok(_) => panic!("damaged dataset opened"),
    }
}

#[test]
fn every_kind_of_corruption_is_reported() {
    assert!(open_damaged(|idx, _| idx.truncate(20)).contains("truncated header"));
    assert!(open_damaged(|idx, _| idx[0] = b'X').contains("bad magic"));
    assert!(open_damaged(|idx, _| idx[9] = 2).contains("index version 2"));
    assert!(open_damaged(|idx, _| idx[17] = 9).contains("unknown dtype code 9"));
    assert!(open_damaged(|idx, _| idx[17] = 7).contains("float type"));
    assert!(open_damaged(|idx, _| idx.truncate(idx.len() - 3)).contains("need"));
    assert!(open_damaged(|idx, _| idx[18] = 50).contains("50 sequences"));
    assert!(open_damaged(|_, bin| bin.truncate(bin.len() - 2)).contains("truncated .bin"));
    assert!(open_damaged(|idx, _| {
        let last = idx.len() - 8;
        idx[last] = 3;
    })
    .contains("document indices"));
    assert!(
        open_damaged(|idx, _| idx[34] = 0xff).contains("negative length")
            || open_damaged(|idx, _| idx[34] = 0xff).contains("spans")
    );
}

#[test]
fn missing_files_name_the_path() {
    let err = IndexedDataset::open(Path::new("/nonexistent/data"))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("/nonexistent/data.idx"), "{err}");
}
