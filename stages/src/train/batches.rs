//! Micro-batches in a seeded order per epoch.

/// Micro-batch `m` is a function of `(seed, m)` alone, which is what makes
/// resume exact: the step number restores the data position.
#[derive(Debug)]
pub struct EpochBatches {
    n: usize,
    batch_size: usize,
    seed: u64,
    epoch: i64,
    order: Vec<usize>,
}

impl EpochBatches {
    pub fn new(n: usize, batch_size: usize, seed: u64) -> Self {
        Self {
            n,
            batch_size,
            seed,
            epoch: -1,
            order: Vec::new(),
        }
    }

    /// Micro-batches per epoch (the last may be short).
    pub fn per_epoch(&self) -> i64 {
        self.n.div_ceil(self.batch_size) as i64
    }

    /// Example indices of micro-batch `micro` (counted from the start).
    pub fn rows(&mut self, micro: i64) -> Vec<usize> {
        let per_epoch = self.per_epoch().max(1);
        let (epoch, pos) = (micro / per_epoch, (micro % per_epoch) as usize);
        if epoch != self.epoch {
            self.order = rlhf_datasets::batch::epoch_order(self.n, self.seed, epoch as u64);
            self.epoch = epoch;
        }
        self.order
            .iter()
            .skip(pos * self.batch_size)
            .take(self.batch_size)
            .copied()
            .collect()
    }
}
