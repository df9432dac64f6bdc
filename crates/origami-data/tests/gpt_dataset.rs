//! GPT samples: document splits, joining with end-of-document tokens, windows, and an order
//! that depends only on (seed, global sample index).

use origami_data::dtype::TokenDtype;
use origami_data::gpt_dataset::{split_documents, GptDataset, Split};
use origami_data::indexed::IndexedWriter;
use std::collections::HashSet;

const EOD: u32 = 999;

/// Ten documents; document d holds tokens 100·d .. 100·d + 10 + d, the odd ones ending with EOD.
fn write_documents(prefix: &std::path::Path) -> Vec<Vec<u32>> {
    let mut writer = IndexedWriter::create(prefix, TokenDtype::U16).unwrap();
    let mut docs = Vec::new();
    for d in 0..10u32 {
        let mut doc: Vec<u32> = (100 * d..100 * d + 10 + d).collect();
        if d % 2 == 1 {
            doc.push(EOD);
        }
        writer.add_document(&doc).unwrap();
        docs.push(doc);
    }
    writer.finish().unwrap();
    docs
}

#[test]
fn splits_follow_cumulative_rounding() {
    assert_eq!(
        split_documents(13, "12,1,0").unwrap(),
        [0..12, 12..13, 13..13]
    );
    assert_eq!(split_documents(10, "8,1,1").unwrap(), [0..8, 8..9, 9..10]);
    assert!(split_documents(10, "8,1").is_err());
    assert!(split_documents(10, "a,b,c").is_err());
    assert!(split_documents(10, "0,0,0").is_err());
}

#[test]
fn samples_are_windows_of_the_joined_stream_and_cover_it_each_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("docs");
    let docs = write_documents(&prefix);
    let seq = 8;
    let train = GptDataset::open(&prefix, Split::Train, "8,2,0", seq, 7, EOD).unwrap();
    let mut stream = Vec::new();
    for doc in &docs[..8] {
        stream.extend_from_slice(doc);
        if doc.last() != Some(&EOD) {
            stream.push(EOD);
        }
    }
    assert_eq!(train.tokens(), stream.len() as u64);
    let n = train.len();
    assert_eq!(n, (stream.len() as u64 - 1) / seq as u64);
    let windows: Vec<Vec<u32>> = (0..n as usize)
        .map(|j| stream[j * seq..j * seq + seq + 1].to_vec())
        .collect();
    let mut seen = HashSet::new();
    let mut sample = vec![0; seq + 1];
    for i in 0..n {
        train.sample_into(i, &mut sample).unwrap();
        let j = windows
            .iter()
            .position(|w| *w == sample)
            .expect("every sample is a window of the stream");
        seen.insert(j);
    }
    assert_eq!(seen.len() as u64, n, "one epoch visits every window once");
    let valid = GptDataset::open(&prefix, Split::Valid, "8,2,0", seq, 7, EOD).unwrap();
    valid.sample_into(0, &mut sample).unwrap();
    assert!(
        sample.iter().all(|&t| t == EOD || t >= 800),
        "validation holds only documents 8 and 9"
    );
}

#[test]
fn order_depends_only_on_seed_and_index() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("docs");
    write_documents(&prefix);
    let a = GptDataset::open(&prefix, Split::Train, "8,2,0", 4, 1, EOD).unwrap();
    let b = GptDataset::open(&prefix, Split::Train, "8,2,0", 4, 1, EOD).unwrap();
    let c = GptDataset::open(&prefix, Split::Train, "8,2,0", 4, 2, EOD).unwrap();
    let take = |d: &GptDataset, i| {
        let mut s = vec![0; 5];
        d.sample_into(i, &mut s).unwrap();
        s
    };
    let order = |d: &GptDataset| (0..2 * d.len()).map(|i| take(d, i)).collect::<Vec<_>>();
    assert_eq!(order(&a), order(&b));
    assert_ne!(order(&a), order(&c));
    let first_epoch: Vec<_> = (0..a.len()).map(|i| take(&a, i)).collect();
    let second_epoch: Vec<_> = (a.len()..2 * a.len()).map(|i| take(&a, i)).collect();
    assert_ne!(first_epoch, second_epoch, "each epoch is shuffled anew");
}

#[test]
fn a_split_too_small_for_one_sample_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("docs");
    write_documents(&prefix);
    let err = GptDataset::open(&prefix, Split::Test, "9,1,0", 4, 1, EOD)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("Test split") && err.contains("too few"),
        "{err}"
    );
}
