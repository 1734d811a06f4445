//! Batches for training: a seeded per-epoch sample order independent of the data-parallel
//! layout, each rank's slice of every global batch, masks seeded per global sample index, and a
//! background thread that prepares them ahead.
//!
//! Index maps, worked through with 10 samples per epoch, global batch G = 4, DP size R = 2,
//! micro-batch 1:
//! - consumption index g = 0, 1, 2, ...: the g-th sample the run trains on (across epochs);
//! - epoch e = g / 10, sample id = perm_e(g % 10), where perm_e is the seed's permutation for e;
//! - global batch (step) t covers g in [4t, 4t + 4); rank r takes g in [4t + 2r, 4t + 2r + 2),
//!   in micro-batches of 1 -> rank 0 of step 1 trains g = 4, 5; rank 1 g = 6, 7.
//! - the mask of g is drawn from an RNG keyed by (seed, g): a sample revisited in a later epoch
//!   gets a fresh mask (dynamic masking), and every layout sees the same masks.
//!
//! The whole resume state is `consumed_samples` (= 4t after t steps).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::dataset::Dataset;
use crate::error::{DataError, Result};
use crate::masking::Masker;
use crate::permutation::Permutation;
use crate::rng::{key, Rng};

/// Stream names that keep the RNGs of different purposes apart.
const ORDER_STREAM: u64 = 0x006f_7264_6572; // "order"
const MASK_STREAM: u64 = 0x6d61_736b; // "mask"

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLayout {
    pub seq_len: usize,
    /// Samples per optimizer step, over all data-parallel ranks.
    pub global_batch: u64,
    /// Samples per forward/backward on one rank.
    pub micro_batch: u64,
    pub dp_rank: u64,
    pub dp_size: u64,
    pub seed: u64,
}

impl BatchLayout {
    pub fn validate(&self) -> Result<()> {
        if self.seq_len < 3 {
            return Err(DataError::Config(format!(
                "seq_len {} must be >= 3 ([CLS] x [SEP])",
                self.seq_len
            )));
        }
        if self.dp_size == 0 || self.dp_rank >= self.dp_size {
            return Err(DataError::Config(format!(
                "dp_rank {} must be < dp_size {}",
                self.dp_rank, self.dp_size
            )));
        }
        if self.micro_batch == 0
            || self.global_batch == 0
            || !self.global_batch.is_multiple_of(self.dp_size * self.micro_batch)
        {
            return Err(DataError::Config(format!(
                "global_batch {} must be a multiple of dp_size {} x micro_batch {}",
                self.global_batch, self.dp_size, self.micro_batch
            )));
        }
        Ok(())
    }

    /// Samples per rank per step.
    pub fn per_rank(&self) -> u64 {
        self.global_batch / self.dp_size
    }

    /// Micro-batches per rank per step (gradient accumulation steps).
    pub fn micro_steps(&self) -> u64 {
        self.per_rank() / self.micro_batch
    }
}

/// One rank's micro-batch, row-major [micro_batch, seq_len], ready for `Tensor::from_slice`.
#[derive(Debug, Clone, PartialEq)]
pub struct MicroBatch {
    /// Optimizer step (global batch index) this belongs to.
    pub step: u64,
    /// Index of this micro-batch within the rank's share of the step.
    pub micro: u64,
    /// Consumption index g of each row.
    pub consumed_index: Vec<u64>,
    pub ids: Vec<i64>,
    pub attention_mask: Vec<i64>,
    pub labels: Vec<i64>,
}

impl MicroBatch {
    /// Rows that carry at least one prediction target.
    pub fn predicted_tokens(&self) -> usize {
        self.labels
            .iter()
            .filter(|&&l| l != crate::masking::IGNORE_LABEL)
            .count()
    }
}

/// Builds any micro-batch from scratch (pure, thread-safe).
pub struct Batcher {
    pub dataset: Arc<Dataset>,
    pub masker: Arc<Masker>,
    pub layout: BatchLayout,
    samples_per_epoch: u64,
}

impl Batcher {
    pub fn new(dataset: Arc<Dataset>, masker: Arc<Masker>, layout: BatchLayout) -> Result<Batcher> {
        layout.validate()?;
        let samples_per_epoch = dataset.num_samples(layout.seq_len);
        if samples_per_epoch == 0 {
            return Err(DataError::Config("the corpus yields no samples".into()));
        }
        Ok(Batcher {
            dataset,
            masker,
            layout,
            samples_per_epoch,
        })
    }

    pub fn samples_per_epoch(&self) -> u64 {
        self.samples_per_epoch
    }

    /// The sample id trained on at consumption index g.
    pub fn sample_id(&self, g: u64) -> u64 {
        let epoch = g / self.samples_per_epoch;
        Permutation::new(self.samples_per_epoch, key(&[self.layout.seed, ORDER_STREAM, epoch]))
            .get(g % self.samples_per_epoch)
    }

    /// Row g: (tokens after masking, attention mask, labels), each seq_len long.
    pub fn row(&self, g: u64, ids: &mut Vec<i64>, mask: &mut Vec<i64>, labels: &mut Vec<i64>) {
        let l = self.layout.seq_len;
        let mut tokens = Vec::with_capacity(l);
        let real = self.dataset.sample(self.sample_id(g), l, &mut tokens);
        let mut lab = vec![0i64; l];
        let mut rng = Rng::new(key(&[self.layout.seed, MASK_STREAM, g]));
        self.masker.mask(&mut tokens[..real], &mut lab[..real], &mut rng);
        lab[real..].fill(crate::masking::IGNORE_LABEL);
        ids.extend(tokens.iter().map(|&t| t as i64));
        mask.extend((0..l).map(|i| i64::from(i < real)));
        labels.extend_from_slice(&lab);
    }

    /// This rank's micro-batch `micro` of optimizer step `step`.
    pub fn micro_batch(&self, step: u64, micro: u64) -> MicroBatch {
        let lay = &self.layout;
        let first = step * lay.global_batch + lay.dp_rank * lay.per_rank() + micro * lay.micro_batch;
        let rows = lay.micro_batch as usize;
        let mut mb = MicroBatch {
            step,
            micro,
            consumed_index: (first..first + lay.micro_batch).collect(),
            ids: Vec::with_capacity(rows * lay.seq_len),
            attention_mask: Vec::with_capacity(rows * lay.seq_len),
            labels: Vec::with_capacity(rows * lay.seq_len),
        };
        for g in first..first + lay.micro_batch {
            self.row(g, &mut mb.ids, &mut mb.attention_mask, &mut mb.labels);
        }
        mb
    }
}

/// Iterates this rank's micro-batches from a resume point, prepared by a background thread.
pub struct Loader {
    rx: Receiver<MicroBatch>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
    layout: BatchLayout,
}

impl Loader {
    /// Start at `consumed_samples` (a multiple of the global batch), keeping up to `prefetch`
    /// micro-batches ready.
    pub fn start(batcher: Batcher, consumed_samples: u64, prefetch: usize) -> Result<Loader> {
        let layout = batcher.layout;
        if !consumed_samples.is_multiple_of(layout.global_batch) {
            return Err(DataError::Config(format!(
                "consumed_samples {consumed_samples} is not a multiple of global_batch {}",
                layout.global_batch
            )));
        }
        let (tx, rx) = sync_channel(prefetch.max(1));
        let stop = Arc::new(AtomicBool::new(false));
        let stop_thread = stop.clone();
        let first_step = consumed_samples / layout.global_batch;
        let handle = std::thread::Builder::new()
            .name("data-loader".into())
            .spawn(move || {
                for step in first_step.. {
                    for micro in 0..layout.micro_steps() {
                        if stop_thread.load(Ordering::Relaxed) || tx.send(batcher.micro_batch(step, micro)).is_err() {
                            return;
                        }
                    }
                }
            })
            .map_err(|e| DataError::Config(format!("cannot start the loader thread: {e}")))?;
        Ok(Loader {
            rx,
            stop,
            handle: Some(handle),
            layout,
        })
    }

    pub fn layout(&self) -> BatchLayout {
        self.layout
    }

    /// The next micro-batch (the stream never ends: epochs follow one another).
    pub fn next_micro_batch(&mut self) -> MicroBatch {
        self.rx.recv().expect("the loader thread ended unexpectedly")
    }

    /// All of this rank's micro-batches of the next step.
    pub fn next_step(&mut self) -> Vec<MicroBatch> {
        (0..self.layout.micro_steps())
            .map(|_| self.next_micro_batch())
            .collect()
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Drain so a thread blocked on a full channel sees the stop flag.
        while self.rx.try_recv().is_ok() {}
        if let Some(h) = self.handle.take() {
            // The thread wakes on the freed slot, sees the flag (or a closed channel) and exits.
            drop(std::mem::replace(&mut self.rx, sync_channel(1).1));
            let _ = h.join();
        }
    }
}
