//! Bad checkpoints are detected, with the file named, and nothing is overwritten: a flipped
//! byte in any rank file, a missing rank file, an index naming a piece no file holds, pieces
//! that overlap or leave a hole; and a checkpoint of the whole-tensor format (format 1) still
//! loads.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use origami::layers::moe::config::MoeConfig;
use origami::model::config::ModelConfig;
use origami::model::gpt::GptModel;
use origami::train::checkpoint::index::Index;
use origami::train::checkpoint::{self};
use origami::train::config::RunConfig;
use origami::train::trainer::{train, SampleSource, TrainOptions};
use safetensors::tensor::{Dtype, View};
use sha2::{Digest, Sha256};

struct Synthetic;

impl SampleSource for Synthetic {
    fn len(&self) -> u64 {
        1000
    }
    fn sample_into(&self, index: u64, out: &mut [u32]) -> anyhow::Result<()> {
        for (j, o) in out.iter_mut().enumerate() {
            *o = ((index * 31 + j as u64 * 7) % 251) as u32;
        }
        Ok(())
    }
}

fn small_config(dir: &Path) -> RunConfig {
    let mut config = RunConfig::default();
    config.model = ModelConfig {
        vocab_size: 256,
        hidden_size: 32,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        ffn_hidden_size: 48,
        max_seq_len: 16,
        moe: MoeConfig {
            num_experts: 4,
            ffn_hidden_size: 24,
            ..config.model.moe
        },
        ..config.model
    };
    (config.train.steps, config.train.seq_len) = (1, 16);
    (config.train.micro_batch, config.train.global_batch) = (1, 4);
    config.train.eval_interval = 0;
    config.checkpoint.dir = dir.to_path_buf();
    config.checkpoint.interval = 0;
    // The default layout: world 4, TP2·DP2 | EP4 — four rank files.
    config
}

/// A world-4 checkpoint in `dir`; returns its directory.
fn saved(dir: &Path) -> PathBuf {
    let outcome = train(
        &small_config(dir),
        &Synthetic,
        None,
        &TrainOptions::default(),
    )
    .unwrap();
    outcome.checkpoint
}

/// Every file's bytes under `dir`, to check that nothing was written.
fn snapshot(dir: &Path) -> HashMap<PathBuf, Vec<u8>> {
    let mut files = HashMap::new();
    for entry in walk(dir) {
        files.insert(entry.clone(), std::fs::read(&entry).unwrap());
    }
    files
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// The error of loading `dir` on one rank, as printed.
fn load_error(dir: &Path) -> String {
    let model = GptModel::new(small_config(dir).model).unwrap();
    format!(
        "{:#}",
        checkpoint::load_params(dir, model.registry())
            .err()
            .expect("the damage is detected")
    )
}

/// The error of loading `dir` at world 4, every rank's.
fn load_error_world(dir: &Path) -> String {
    let config = small_config(dir);
    let result = origami_comm::local::LocalWorld::new(4).run(
        |world: Arc<dyn origami_comm::Communicator>| -> anyhow::Result<()> {
            let layout = config.parallel.config().layout(4)?;
            let state = origami_parallel::ParallelState::new(&layout, world.as_ref())?;
            let model = GptModel::new_parallel(
                config.model.clone(),
                origami::model::parallel::ModelParallel::from_state(&state, Default::default()),
            )?;
            checkpoint::load(
                &world,
                dir,
                &checkpoint::shards::Targets {
                    registry: model.registry(),
                    moments: None,
                },
            )?;
            Ok(())
        },
    );
    format!("{:?}", result.expect_err("the damage is detected"))
}

#[test]
fn a_flipped_byte_in_any_rank_file_is_detected_and_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = saved(tmp.path());
    let files: Vec<String> = Index::read(&dir).unwrap().files.into_keys().collect();
    assert_eq!(files.len(), 4, "{files:?}");
    for file in &files {
        let path = dir.join(file);
        let original = std::fs::read(&path).unwrap();
        for at in [10, original.len() / 2, original.len() - 1] {
            let mut flipped = original.clone();
            flipped[at] ^= 0x10;
            std::fs::write(&path, &flipped).unwrap();
            let before = snapshot(tmp.path());
            for error in [load_error(&dir), load_error_world(&dir)] {
                assert!(
                    error.contains(file.as_str()) && error.contains("corrupt or truncated"),
                    "{file} byte {at}: {error}"
                );
            }
            assert!(before == snapshot(tmp.path()), "loading wrote something");
        }
        std::fs::write(&path, &original).unwrap();
    }
    load_error_free(&dir);
}

fn load_error_free(dir: &Path) {
    let model = GptModel::new(small_config(dir).model).unwrap();
    checkpoint::load_params(dir, model.registry()).expect("the restored checkpoint loads");
}

#[test]
fn a_missing_rank_file_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = saved(tmp.path());
    let file = dir.join("rank-00001.safetensors");
    std::fs::remove_file(&file).unwrap();
    let error = load_error(&dir);
    assert!(error.contains("rank-00001.safetensors"), "{error}");
}

/// Rewrites `dir`'s index with `edit`, keeping the files as they are.
fn edit_index(dir: &Path, edit: impl FnOnce(&mut Index)) {
    let mut index = Index::read(dir).unwrap();
    edit(&mut index);
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_string_pretty(&index).unwrap(),
    )
    .unwrap();
}

#[test]
fn an_index_naming_a_piece_no_file_holds_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = saved(tmp.path());
    edit_index(&dir, |index| {
        let entry = index.tensors.get_mut("final_norm.weight").unwrap();
        entry.pieces[0].key = "final_norm.weight@nowhere".into();
    });
    let error = load_error(&dir);
    assert!(
        error.contains("final_norm.weight@nowhere") && error.contains(".safetensors"),
        "{error}"
    );
    edit_index(&dir, |index| {
        let entry = index.tensors.get_mut("final_norm.weight").unwrap();
        entry.pieces[0].file = "rank-00099.safetensors".into();
    });
    let error = load_error(&dir);
    assert!(error.contains("rank-00099.safetensors"), "{error}");
}

#[test]
fn pieces_that_overlap_or_leave_a_hole_are_detected() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = saved(tmp.path());
    // The embedding is vocabulary-parallel over tp 2: two pieces.
    edit_index(&dir, |index| {
        let entry = index.tensors.get_mut("embedding.weight").unwrap();
        assert_eq!(entry.pieces.len(), 2);
        entry.pieces[1].block.offset[0] -= 1;
    });
    let error = load_error(&dir);
    assert!(
        error.contains("pieces of embedding.weight overlap") && error.contains("rank-0000"),
        "{error}"
    );
    edit_index(&dir, |index| {
        let entry = index.tensors.get_mut("embedding.weight").unwrap();
        entry.pieces[1].block.offset[0] += 1;
        entry.pieces.pop();
    });
    let error = load_error(&dir);
    assert!(
        error.contains("the pieces of embedding.weight hold 4096 of its 8192 elements"),
        "{error}"
    );
}

/// A tensor stored whole, as format 1 wrote them.
struct Whole<'a>(&'a [usize], &'a [f32]);

impl View for Whole<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        self.0
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        self.1.iter().flat_map(|v| v.to_le_bytes()).collect()
    }
    fn data_len(&self) -> usize {
        self.1.len() * 4
    }
}

/// Writes a checkpoint in the whole-tensor format of earlier releases: `model.safetensors`,
/// `optimizer.safetensors` (`exp_avg.NAME`, `exp_avg_sq.NAME`) and a `state.json` of format 1
/// with both files' SHA-256.
fn write_format_1(dir: &Path, model: &GptModel, seeds: [u64; 3], config: &RunConfig) {
    std::fs::create_dir_all(dir).unwrap();
    let [p, m, v] = seeds.map(|s| model.init_params(s));
    let registry = model.registry();
    let tensors =
        |prefix: &str, b: &origami::params::Buffers| -> Vec<(String, Vec<usize>, Vec<f32>)> {
            registry
                .params()
                .iter()
                .map(|i| {
                    let name = if prefix.is_empty() {
                        i.name.clone()
                    } else {
                        format!("{prefix}.{}", i.name)
                    };
                    (name, i.shape.clone(), b.get(i.id).to_vec())
                })
                .collect()
        };
    let mut hashes = serde_json::Map::new();
    for (file, parts) in [
        ("model.safetensors", tensors("", &p)),
        (
            "optimizer.safetensors",
            [tensors("exp_avg", &m), tensors("exp_avg_sq", &v)].concat(),
        ),
    ] {
        let views: Vec<(String, Whole<'_>)> = parts
            .iter()
            .map(|(n, s, d)| (n.clone(), Whole(s, d)))
            .collect();
        let bytes = safetensors::serialize(views, &None).unwrap();
        std::fs::write(dir.join(file), &bytes).unwrap();
        let hash: String = Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        hashes.insert(file.into(), hash.into());
    }
    let state = serde_json::json!({
        "format": 1,
        "state": {"step": 7, "consumed_samples": 28, "config_toml": config.to_toml()},
        "sha256": hashes,
    });
    std::fs::write(dir.join("state.json"), state.to_string()).unwrap();
}

#[test]
fn a_whole_tensor_checkpoint_of_format_1_still_loads_at_any_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("step-00000007");
    let config = small_config(tmp.path());
    let model = GptModel::new(config.model.clone()).unwrap();
    write_format_1(&dir, &model, [1, 2, 3], &config);
    std::fs::write(tmp.path().join("latest"), "step-00000007").unwrap();
    let loaded = checkpoint::load_params(&dir, model.registry()).unwrap();
    assert!(loaded.params == model.init_params(1));
    assert_eq!(loaded.state.step, 7);
    // And resumes a run at the folded default layout (world 4).
    let mut resumed = small_config(tmp.path());
    resumed.train.steps = 8;
    let outcome = train(
        &resumed,
        &Synthetic,
        None,
        &TrainOptions {
            resume: Some(tmp.path().to_path_buf()),
            ..TrainOptions::default()
        },
    )
    .unwrap();
    assert_eq!(outcome.records.first().map(|r| r.step), Some(8));
    // A flipped byte in the old format is named too.
    let file = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 1;
    std::fs::write(&file, bytes).unwrap();
    let error = load_error(&dir);
    assert!(
        error.contains("model.safetensors") && error.contains("corrupt"),
        "{error}"
    );
}

#[test]
fn a_rank_failing_mid_save_fails_it_everywhere_and_keeps_the_previous_checkpoint() {
    use origami::optim::parallel::{OptimizerGroups, ParallelOptimizer};
    use origami::params::ParamGroup;
    use origami::train::checkpoint::shards::{Contribution, MomentShards, OwnedMoments, Ownership};
    let tmp = tempfile::tempdir().unwrap();
    let previous = saved(tmp.path());
    let config = small_config(tmp.path());
    let full = GptModel::new(config.model.clone()).unwrap();
    let result = origami_comm::local::LocalWorld::new(4).run(
        |world: Arc<dyn origami_comm::Communicator>| -> anyhow::Result<()> {
            let layout = config.parallel.config().layout(4)?;
            let state = origami_parallel::ParallelState::new(&layout, world.as_ref())?;
            let model = GptModel::new_parallel(
                config.model.clone(),
                origami::model::parallel::ModelParallel::from_state(&state, Default::default()),
            )?;
            let optimizer = ParallelOptimizer::new(
                model.registry(),
                config.train.adamw,
                OptimizerGroups::from_state(&state, world.clone()),
                false,
                1 << 20,
            );
            let mut params = model.init_params(9);
            if world.rank() == 2 {
                // This rank's buffers are broken: it panics while making its pieces.
                params.expert.clear();
            }
            let owned = |group| {
                let (range, m, v) = optimizer.owned_moments(group);
                OwnedMoments { range, m, v }
            };
            let contribution = Contribution {
                registry: model.registry(),
                params: &params,
                moments: MomentShards {
                    dense: owned(ParamGroup::Dense),
                    expert: owned(ParamGroup::Expert),
                    distributed: false,
                },
                ownership: Ownership::of(&state),
            };
            let state = checkpoint::TrainingState {
                step: 2,
                consumed_samples: 8,
                config_toml: config.to_toml(),
            };
            checkpoint::save(
                &world,
                tmp.path(),
                &contribution,
                full.registry(),
                &state,
                3,
            )?;
            Ok(())
        },
    );
    let error = result.expect_err("the save must fail");
    assert_eq!(error.failures.len(), 4, "every rank fails: {error:?}");
    assert_eq!(checkpoint::resolve(tmp.path()).unwrap(), previous);
    assert!(!tmp.path().join("step-00000002").exists());
    load_error_free(&previous);
}
