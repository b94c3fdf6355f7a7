//! The run folder and its checkpoints (DESIGN.md, "Run folder").
//!
//! A checkpoint is a folder holding `model.bpk` (the weights, BatchNorm statistics included),
//! `optimizer.bpk` (momentum buffers) and `state.json` (epoch, step, best error). It is written
//! under a temporary name, flushed, and renamed into place, so a crash never leaves a broken one.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use burn::module::Module;
use burn::optim::ModuleOptimizer;
use serde::{Deserialize, Serialize};

use cutmix_models::Model;

/// Training progress stored beside the weights: with the seed, enough to redraw every random
/// stream (they are keyed by seed, epoch and step).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainState {
    /// Epochs completed.
    pub epoch: usize,
    /// Optimizer steps taken.
    pub step: usize,
    pub seed: u64,
    /// Batches of the next epoch already trained (a checkpoint saved by Ctrl-C in the middle
    /// of an epoch; 0 at epoch boundaries).
    #[serde(default)]
    pub batch: usize,
    pub val_top1_err: f64,
    pub best_val_top1_err: f64,
    pub best_epoch: usize,
    /// The metrics of the epoch this checkpoint ends (they reach `metrics.jsonl` only after
    /// the checkpoint is written, so a resume puts them back if a crash came in between).
    #[serde(default)]
    pub metrics: Option<crate::metrics::EpochMetrics>,
    /// How many processes trained (`batch` counts each one's batches).
    #[serde(default = "one")]
    pub world_size: usize,
    /// In the middle of an epoch: the training loss and errors of its batches so far (over all
    /// ranks), so the resumed epoch reports the whole epoch's numbers.
    #[serde(default)]
    pub partial: Option<crate::metrics::Tally>,
    /// Each file's length and checksum, to tell a checkpoint damaged on disk from an intact one.
    #[serde(default)]
    pub files: std::collections::BTreeMap<String, FileDigest>,
}

fn one() -> usize {
    1
}

/// A file's length and a 64-bit checksum of its bytes.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileDigest {
    pub bytes: u64,
    pub checksum: String,
}

impl FileDigest {
    /// Reads `path` and digests it (FNV-1a over 8-byte words, in 1 MiB pieces).
    pub fn of(path: &Path) -> std::io::Result<Self> {
        use std::io::Read;
        let mut file = fs::File::open(path)?;
        let mut buffer = vec![0u8; 1 << 20];
        let (mut hash, mut bytes) = (0xcbf2_9ce4_8422_2325u64, 0u64);
        loop {
            // Fill the whole buffer (or up to the end), so only the last piece has a remainder.
            let mut filled = 0;
            while filled < buffer.len() {
                match file.read(&mut buffer[filled..])? {
                    0 => break,
                    n => filled += n,
                }
            }
            let piece = &buffer[..filled];
            let mut words = piece.chunks_exact(8);
            for word in &mut words {
                let word = u64::from_le_bytes(word.try_into().expect("8 bytes"));
                hash = (hash ^ word).wrapping_mul(0x0100_0000_01b3);
            }
            for &byte in words.remainder() {
                hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
            }
            bytes += filled as u64;
            if filled < buffer.len() {
                break;
            }
        }
        Ok(Self {
            bytes,
            checksum: format!("{hash:016x}"),
        })
    }
}

/// Creates `<output_dir>/<name>/`, or `<name>-2`, `<name>-3`, ... when it exists: an existing run
/// is never overwritten. Returns the folder and whether the name had to change.
pub fn create_run_dir(output_dir: &Path, name: &str) -> Result<(PathBuf, bool)> {
    fs::create_dir_all(output_dir)
        .with_context(|| format!("cannot create output folder {}", output_dir.display()))?;
    for n in 1.. {
        let candidate = if n == 1 {
            output_dir.join(name)
        } else {
            output_dir.join(format!("{name}-{n}"))
        };
        match fs::create_dir(&candidate) {
            Ok(()) => {
                fs::create_dir(candidate.join("checkpoints")).with_context(|| {
                    format!("cannot create {}", candidate.join("checkpoints").display())
                })?;
                return Ok((candidate, n > 1));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(e).with_context(|| format!("cannot create {}", candidate.display()));
            }
        }
    }
    unreachable!("some numbered run folder name is free")
}

/// Writes `contents` to `path` through a temporary file, flushed and renamed.
pub fn write_atomically(path: &Path, contents: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let write = || -> std::io::Result<()> {
        let mut file = fs::File::create(&tmp)?;
        std::io::Write::write_all(&mut file, contents)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    };
    write().with_context(|| format!("cannot write {}", path.display()))
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

/// Replaces the folder `dest` by `staged` (a sibling): the old one is moved aside first and
/// removed after, so at every moment one complete copy exists.
fn publish(staged: &Path, dest: &Path) -> Result<()> {
    let parent = dest.parent().expect("checkpoint folders have a parent");
    let old = parent.join(format!(
        ".old-{}",
        dest.file_name().expect("named").to_string_lossy()
    ));
    if old.exists() {
        fs::remove_dir_all(&old).with_context(|| format!("cannot remove {}", old.display()))?;
    }
    if dest.exists() {
        fs::rename(dest, &old).with_context(|| format!("cannot move {}", dest.display()))?;
    }
    fs::rename(staged, dest).with_context(|| format!("cannot publish {}", dest.display()))?;
    sync_dir(parent).with_context(|| format!("cannot sync {}", parent.display()))?;
    if old.exists() {
        fs::remove_dir_all(&old).with_context(|| format!("cannot remove {}", old.display()))?;
    }
    Ok(())
}

/// Fills `staged` with links to (or copies of) the files of `source`.
fn stage_copy(source: &Path, staged: &Path) -> Result<()> {
    if staged.exists() {
        fs::remove_dir_all(staged)?;
    }
    fs::create_dir(staged).with_context(|| format!("cannot create {}", staged.display()))?;
    for entry in fs::read_dir(source)? {
        let entry = entry?;
        let to = staged.join(entry.file_name());
        if fs::hard_link(entry.path(), &to).is_err() {
            fs::copy(entry.path(), &to)
                .with_context(|| format!("cannot copy {}", entry.path().display()))?;
        }
    }
    Ok(())
}

/// Saves the checkpoints of an epoch: always `last`, `best` when `is_best`, and
/// `epoch-NNNN` for the `keep_last` most recent epochs. A checkpoint in the middle of an epoch
/// (`state.batch > 0`) goes to `last` only.
pub fn save(
    run_dir: &Path,
    model: &Model,
    ema: Option<&Model>,
    optimizer: &ModuleOptimizer,
    state: &TrainState,
    is_best: bool,
    keep_last: usize,
) -> Result<()> {
    let dir = run_dir.join("checkpoints");
    let epoch_name = format!("epoch-{:04}", state.epoch);
    let staged = dir.join(format!(".tmp-{epoch_name}"));
    if staged.exists() {
        fs::remove_dir_all(&staged)?;
    }
    fs::create_dir(&staged).with_context(|| format!("cannot create {}", staged.display()))?;
    // BatchNorm's running statistics hold their last update aside until synchronised, which
    // `valid()` does (evaluation does it at every epoch end); a checkpoint taken in the middle
    // of an epoch would otherwise miss one update.
    let _synchronised = model.valid();
    model
        .clone()
        .save_file(staged.join("model.bpk"))
        .with_context(|| format!("cannot write {}", staged.join("model.bpk").display()))?;
    optimizer
        .save(staged.join("optimizer.bpk"))
        .with_context(|| format!("cannot write {}", staged.join("optimizer.bpk").display()))?;
    let mut files = vec!["model.bpk", "optimizer.bpk"];
    if let Some(ema) = ema {
        ema.clone()
            .save_file(staged.join("ema.bpk"))
            .with_context(|| format!("cannot write {}", staged.join("ema.bpk").display()))?;
        files.push("ema.bpk");
    }
    let mut state = state.clone();
    for file in &files {
        let path = staged.join(file);
        fs::File::open(&path)?.sync_all()?;
        let digest =
            FileDigest::of(&path).with_context(|| format!("cannot read {}", path.display()))?;
        state.files.insert(file.to_string(), digest);
    }
    let state_json = serde_json::to_vec_pretty(&state).expect("state serialises");
    write_atomically(&staged.join("state.json"), &state_json)?;
    sync_dir(&staged)?;

    for (name, wanted) in [("last", true), ("best", is_best)] {
        if wanted {
            let link = dir.join(format!(".tmp-{name}"));
            stage_copy(&staged, &link)?;
            publish(&link, &dir.join(name))?;
        }
    }
    if keep_last > 0 && state.batch == 0 {
        publish(&staged, &dir.join(&epoch_name))?;
    } else {
        fs::remove_dir_all(&staged)?;
    }
    prune_epochs(&dir, keep_last)
}

/// Reads `state.json` of a checkpoint folder.
pub fn read_state(folder: &Path) -> Result<TrainState> {
    let path = folder.join("state.json");
    let text = fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_slice(&text)
        .with_context(|| format!("{} is not a training state", path.display()))
}

/// A checkpoint folder's training state, once its files are all there and match the lengths and
/// checksums it recorded (a checkpoint written before they were recorded is taken as it is);
/// the error says what is missing or damaged.
pub fn intact_state(folder: &Path) -> Result<TrainState> {
    for file in ["model.bpk", "optimizer.bpk", "state.json"] {
        if !folder.join(file).is_file() {
            anyhow::bail!("{} is missing", folder.join(file).display());
        }
    }
    let state = read_state(folder)?;
    for (file, recorded) in &state.files {
        let path = folder.join(file);
        let found =
            FileDigest::of(&path).with_context(|| format!("cannot read {}", path.display()))?;
        if found.bytes != recorded.bytes {
            anyhow::bail!(
                "{} is {} bytes, the checkpoint recorded {} (truncated or damaged)",
                path.display(),
                found.bytes,
                recorded.bytes
            );
        }
        if found.checksum != recorded.checksum {
            anyhow::bail!(
                "{} does not match the checksum the checkpoint recorded (damaged on disk)",
                path.display()
            );
        }
    }
    Ok(state)
}

/// An exclusive lock on a run folder, held while a `train` process writes to it, so a second
/// process (a `--resume` while the run still goes on) is refused instead of interleaving its
/// checkpoints and metrics with the first one's. The operating system drops the lock when the
/// process ends, however it ends, so a killed run leaves nothing stale behind.
pub struct RunLock {
    _file: fs::File,
}

/// Takes the run folder's lock (`<run>/.lock`), or fails naming the folder.
pub fn lock_run_dir(run_dir: &Path) -> Result<RunLock> {
    let path = run_dir.join(".lock");
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(RunLock { _file: file }),
        Err(fs::TryLockError::WouldBlock) => anyhow::bail!(
            "{} is in use by another train process; wait for it to end (or stop it) before resuming",
            run_dir.display()
        ),
        Err(fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("cannot lock {}", path.display()))
        }
    }
}

/// A checkpoint folder of a run, and its state or what is wrong with it.
pub struct Candidate {
    pub folder: PathBuf,
    pub state: Result<TrainState>,
}

/// The run's checkpoint folders (`last`, the copy a crash in the middle of replacing it left,
/// `.old-last`, and every `epoch-NNNN`), newest first; a damaged or incomplete one comes with
/// its error, and sorts by its folder's name among the others.
pub fn candidates(run_dir: &Path) -> Result<Vec<Candidate>> {
    let dir = run_dir.join("checkpoints");
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut found = Vec::new();
    for entry in fs::read_dir(&dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let folder = entry?.path();
        let name = folder.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name == "last" || name == ".old-last" || name.starts_with("epoch-") {
            let state = intact_state(&folder);
            found.push(Candidate { folder, state });
        }
    }
    // Newest first: by progress when the state is readable; `last` before `.old-last` before
    // the epoch folders when it is not (or on ties: the same point in two folders).
    let rank = |c: &Candidate| {
        let name = c
            .folder
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("")
            .to_string();
        let order = match name.as_str() {
            "last" => 0,
            ".old-last" => 1,
            _ => 2,
        };
        let progress = c.state.as_ref().map_or((0, 0), |s| (s.epoch, s.batch));
        (std::cmp::Reverse(progress), order, std::cmp::Reverse(name))
    };
    found.sort_by_key(rank);
    Ok(found)
}

/// The newest intact checkpoint of a run; `None` when there is none.
pub fn latest(run_dir: &Path) -> Result<Option<(PathBuf, TrainState)>> {
    Ok(candidates(run_dir)?
        .into_iter()
        .find_map(|c| c.state.ok().map(|state| (c.folder, state))))
}

/// Removes all but the `keep` most recent `epoch-NNNN` folders.
fn prune_epochs(dir: &Path, keep: usize) -> Result<()> {
    let mut epochs: Vec<PathBuf> = fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("epoch-"))
        })
        .collect();
    epochs.sort();
    let excess = epochs.len().saturating_sub(keep);
    for old in &epochs[..excess] {
        fs::remove_dir_all(old).with_context(|| format!("cannot remove {}", old.display()))?;
    }
    Ok(())
}
