//! Data parallelism on libtorch's own distributed engine (c10d): where this
//! process sits among the ranks (torchrun's or Slurm's environment), and a
//! joined group with the collectives the stages use. Gloo carries CPU
//! tensors, NCCL CUDA ones; both are reached through `csrc/c10d_shim.cpp`.

use crate::ffi;

use tch::{Device, Kind, Tensor};

pub use ffi::backends;

/// Gradients are all-reduced in flat buckets of about this many bytes (as
/// PyTorch's DDP does): few large collectives instead of one per tensor.
pub const BUCKET_BYTES: usize = 25 << 20;

/// How long a collective, or joining, may wait for the other ranks before
/// failing: a dead or stuck rank ends the others with an error.
pub const DEFAULT_TIMEOUT_S: u64 = 300;

#[derive(Debug, thiserror::Error)]
pub enum DistError {
    #[error("{var}=\"{value}\": {message}")]
    Env {
        var: &'static str,
        value: String,
        message: String,
    },
    #[error("rank {rank} of {world}: {what}: {message}")]
    Collective {
        rank: usize,
        world: usize,
        what: &'static str,
        message: String,
    },
}

/// Who started the ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launcher {
    /// `torchrun` (or `rlhf run` itself, which sets the same variables).
    Torchrun,
    Slurm,
}

/// This process's place among the ranks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    pub rank: usize,
    pub world: usize,
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// torchrun's agent hosts the store: every rank, 0 included, connects.
    pub agent_store: bool,
    pub launcher: Launcher,
}

impl Topology {
    /// From the environment: torchrun's `RANK`/`WORLD_SIZE`/`LOCAL_RANK`/
    /// `MASTER_ADDR`/`MASTER_PORT`, else Slurm's `SLURM_PROCID`/
    /// `SLURM_NTASKS`/`SLURM_LOCALID` with the job's first node as the
    /// master; `None` for one process alone.
    pub fn from_env() -> Result<Option<Self>, DistError> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Self>, DistError> {
        let num = |name: &'static str| -> Result<Option<usize>, DistError> {
            var(name)
                .map(|v| {
                    v.trim().parse::<usize>().map_err(|_| DistError::Env {
                        var: name,
                        value: v.clone(),
                        message: "expected a whole number".into(),
                    })
                })
                .transpose()
        };
        let port = || -> Result<u16, DistError> {
            match var("MASTER_PORT") {
                None => Ok(29500),
                Some(v) => v.trim().parse().map_err(|_| DistError::Env {
                    var: "MASTER_PORT",
                    value: v.clone(),
                    message: "expected a port number (1-65535)".into(),
                }),
            }
        };
        let (rank, world, local_rank, addr, launcher) =
            if let (Some(rank), Some(world)) = (num("RANK")?, num("WORLD_SIZE")?) {
                let local = num("LOCAL_RANK")?.unwrap_or(rank);
                let addr = var("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into());
                (rank, world, local, addr, Launcher::Torchrun)
            } else if let (Some(rank), Some(world)) = (num("SLURM_PROCID")?, num("SLURM_NTASKS")?) {
                let local = num("SLURM_LOCALID")?.unwrap_or(0);
                let addr = match var("MASTER_ADDR") {
                    Some(a) => a,
                    None => {
                        let list = var("SLURM_JOB_NODELIST")
                            .or_else(|| var("SLURM_NODELIST"))
                            .unwrap_or_else(|| "127.0.0.1".into());
                        first_host(&list).ok_or_else(|| DistError::Env {
                            var: "SLURM_JOB_NODELIST",
                            value: list.clone(),
                            message: "cannot read its first host".into(),
                        })?
                    }
                };
                (rank, world, local, addr, Launcher::Slurm)
            } else {
                return Ok(None);
            };
        if world == 0 || rank >= world {
            return Err(DistError::Env {
                var: "RANK",
                value: rank.to_string(),
                message: format!("must be below the world size {world}"),
            });
        }
        if world == 1 {
            return Ok(None);
        }
        let agent_store = var("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| v == "True");
        Ok(Some(Self {
            rank,
            world,
            local_rank,
            master_addr: addr,
            master_port: port()?,
            agent_store,
            launcher,
        }))
    }
}

/// The first host of a Slurm node list: `gpu[03-05,09],cpu1` -> `gpu03`.
pub fn first_host(list: &str) -> Option<String> {
    let list = list.trim();
    let first_end = {
        let mut depth = 0;
        list.char_indices()
            .find(|&(_, c)| {
                match c {
                    '[' => depth += 1,
                    ']' => depth -= 1,
                    _ => {}
                }
                c == ',' && depth == 0
            })
            .map_or(list.len(), |(i, _)| i)
    };
    let host = &list[..first_end];
    let Some(open) = host.find('[') else {
        return (!host.is_empty()).then(|| host.to_owned());
    };
    let close = host[open..].find(']')? + open;
    let range = host[open + 1..close].split(',').next()?;
    let start = range.split('-').next()?;
    if start.is_empty() || !start.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(format!("{}{start}{}", &host[..open], &host[close + 1..]))
}

/// The ranks of a stage: one process alone, or a joined c10d group.
pub struct Ranks {
    /// Behind a mutex so that a stage's context can be shared; collectives
    /// are called from one thread.
    group: Option<std::sync::Mutex<ffi::Group>>,
    rank: usize,
    world: usize,
    /// Where collectives' tensors must live (NCCL takes CUDA tensors only).
    device: Device,
    /// Nanoseconds spent in collectives so far (waiting for the others
    /// included): a stage's metrics report the share of its steps.
    comm_nanos: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Ranks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ranks(rank {} of {})", self.rank, self.world)
    }
}

impl Ranks {
    /// One process, no collectives.
    pub fn single() -> Self {
        Self {
            group: None,
            device: Device::Cpu,
            rank: 0,
            world: 1,
            comm_nanos: Default::default(),
        }
    }

    /// Joins the group `topo` describes, on Gloo for the CPU and NCCL for
    /// CUDA; a rank missing after `timeout_s` fails the join.
    pub fn join(topo: &Topology, device: Device, timeout_s: u64) -> Result<Self, DistError> {
        let backend = match device {
            Device::Cuda(_) => "nccl",
            _ => "gloo",
        };
        let join = ffi::Join {
            backend,
            host: &topo.master_addr,
            port: topo.master_port,
            rank: topo.rank,
            world: topo.world,
            store_is_external: topo.agent_store,
            timeout_ms: i64::try_from(timeout_s.saturating_mul(1000)).unwrap_or(i64::MAX),
            gloo_threads: 1,
        };
        let group = ffi::Group::join(&join).map_err(|message| DistError::Collective {
            rank: topo.rank,
            world: topo.world,
            what: "joining the group",
            message: format!(
                "{message} (rendezvous at {}:{} on {backend})",
                topo.master_addr, topo.master_port
            ),
        })?;
        Ok(Self {
            group: Some(std::sync::Mutex::new(group)),
            device,
            rank: topo.rank,
            world: topo.world,
            comm_nanos: Default::default(),
        })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Seconds spent in collectives since the group was joined.
    pub fn comm_seconds(&self) -> f64 {
        self.comm_nanos.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1e9
    }

    /// Runs a collective, adding its time to [`Self::comm_seconds`].
    fn timed<T>(&self, f: impl FnOnce() -> T) -> T {
        let t0 = std::time::Instant::now();
        let out = f();
        let nanos = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.comm_nanos
            .fetch_add(nanos, std::sync::atomic::Ordering::Relaxed);
        out
    }

    pub fn world(&self) -> usize {
        self.world
    }

    /// Rank 0 writes checkpoints, metrics and manifests.
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    /// This rank's rows of `n`: an equal, contiguous share.
    pub fn share(&self, n: usize) -> std::ops::Range<usize> {
        n * self.rank / self.world..n * (self.rank + 1) / self.world
    }

    fn fail(&self, what: &'static str) -> impl FnOnce(String) -> DistError + '_ {
        move |message| DistError::Collective {
            rank: self.rank,
            world: self.world,
            what,
            message,
        }
    }

    fn group(&self) -> Option<std::sync::MutexGuard<'_, ffi::Group>> {
        self.group
            .as_ref()
            .map(|g| g.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Sums the gradients of `vars` over the ranks, in flat buckets (each
    /// rank's loss is its part of the step's, so the sum is the step's
    /// gradient). Variables without a gradient are left out on every rank
    /// alike: all ranks run the same modules.
    pub fn sum_gradients(&self, vars: &[Tensor]) -> Result<(), DistError> {
        self.timed(|| self.sum_gradients_untimed(vars))
    }

    fn sum_gradients_untimed(&self, vars: &[Tensor]) -> Result<(), DistError> {
        let Some(group) = self.group() else {
            return Ok(());
        };
        let grads: Vec<Tensor> = vars
            .iter()
            .map(Tensor::grad)
            .filter(Tensor::defined)
            .collect();
        for bucket in buckets(&grads, BUCKET_BYTES) {
            let mut flat = Tensor::cat(&bucket.iter().map(|g| g.view(-1)).collect::<Vec<_>>(), 0);
            group
                .all_reduce_sum(std::slice::from_mut(&mut flat))
                .map_err(self.fail("summing gradients"))?;
            let mut at = 0;
            for g in bucket {
                let n = g.numel() as i64;
                let mut g = g.shallow_clone();
                tch::no_grad(|| g.copy_(&flat.narrow(0, at, n).view_as(&g)));
                at += n;
            }
        }
        Ok(())
    }

    /// Rank 0's values of `vars` on every rank (initial weights), in place.
    pub fn broadcast_from_main(&self, vars: &[Tensor]) -> Result<(), DistError> {
        self.timed(|| self.broadcast_from_main_untimed(vars))
    }

    fn broadcast_from_main_untimed(&self, vars: &[Tensor]) -> Result<(), DistError> {
        let Some(group) = self.group() else {
            return Ok(());
        };
        let mut shared: Vec<Tensor> = vars.iter().map(Tensor::shallow_clone).collect();
        tch::no_grad(|| group.broadcast(&mut shared, 0)).map_err(self.fail("broadcasting weights"))
    }

    /// The sum over ranks of each value (metrics, statistics).
    pub fn sum(&self, values: &[f64]) -> Result<Vec<f64>, DistError> {
        self.timed(|| self.sum_untimed(values))
    }

    fn sum_untimed(&self, values: &[f64]) -> Result<Vec<f64>, DistError> {
        let Some(group) = self.group() else {
            return Ok(values.to_vec());
        };
        let mut t = Tensor::from_slice(values)
            .to_kind(Kind::Double)
            .to_device(self.device);
        group
            .all_reduce_sum(std::slice::from_mut(&mut t))
            .map_err(self.fail("summing values"))?;
        Ok(Vec::<f64>::try_from(&t.to_device(Device::Cpu)).unwrap_or_default())
    }

    /// Every rank's bytes, in rank order (rollouts, metrics).
    pub fn all_gather_bytes(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>, DistError> {
        self.timed(|| self.all_gather_bytes_untimed(bytes))
    }

    fn all_gather_bytes_untimed(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>, DistError> {
        let Some(group) = self.group() else {
            return Ok(vec![bytes.to_vec()]);
        };
        let lens = self.gather_equal(&group, Tensor::from_slice(&[bytes.len() as i64]))?;
        let lens: Vec<usize> = lens.iter().map(|t| t.int64_value(&[0]) as usize).collect();
        let longest = lens.iter().copied().max().unwrap_or(0).max(1);
        let mut padded = bytes.to_vec();
        padded.resize(longest, 0);
        let all = self.gather_equal(&group, Tensor::from_slice(&padded))?;
        Ok(all
            .iter()
            .zip(lens)
            .map(|(t, n)| {
                let t = t.narrow(0, 0, n as i64).to_device(Device::Cpu);
                Vec::<u8>::try_from(&t).unwrap_or_default()
            })
            .collect())
    }

    fn gather_equal(&self, group: &ffi::Group, input: Tensor) -> Result<Vec<Tensor>, DistError> {
        let mut input = input.to_device(self.device);
        let mut outs: Vec<Tensor> = (0..self.world).map(|_| input.zeros_like()).collect();
        group
            .all_gather(&mut input, &mut outs)
            .map_err(self.fail("gathering"))?;
        Ok(outs)
    }

    pub fn barrier(&self) -> Result<(), DistError> {
        self.timed(|| self.barrier_untimed())
    }

    fn barrier_untimed(&self) -> Result<(), DistError> {
        match self.group() {
            None => Ok(()),
            Some(g) => g.barrier().map_err(self.fail("waiting at a barrier")),
        }
    }
}

/// Consecutive groups of tensors of about `limit` bytes each (a tensor
/// larger than the limit is a bucket of its own).
fn buckets(tensors: &[Tensor], limit: usize) -> Vec<Vec<Tensor>> {
    let mut out: Vec<Vec<Tensor>> = Vec::new();
    let mut size = 0;
    for t in tensors {
        let bytes = t.numel() * t.kind().elt_size_in_bytes();
        if out.is_empty() || (size + bytes > limit && size > 0) {
            out.push(Vec::new());
            size = 0;
        }
        out.last_mut().expect("pushed").push(t.shallow_clone());
        size += bytes;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: std::collections::HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn torchrun_and_slurm_environments_are_read() {
        let t = Topology::from_vars(vars(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "node7"),
            ("MASTER_PORT", "1234"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            (
                t.rank,
                t.world,
                t.local_rank,
                t.master_addr.as_str(),
                t.master_port,
                t.agent_store
            ),
            (3, 4, 1, "node7", 1234, true)
        );
        let t = Topology::from_vars(vars(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_JOB_NODELIST", "gpu-[03-05,09],cpu1"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            (t.rank, t.world, t.local_rank, t.launcher),
            (5, 8, 1, Launcher::Slurm)
        );
        assert_eq!((t.master_addr.as_str(), t.master_port), ("gpu-03", 29500));
        assert_eq!(Topology::from_vars(vars(&[])).unwrap(), None);
        assert_eq!(
            Topology::from_vars(vars(&[("RANK", "0"), ("WORLD_SIZE", "1")])).unwrap(),
            None
        );
        let e = Topology::from_vars(vars(&[("RANK", "2"), ("WORLD_SIZE", "2")])).unwrap_err();
        assert!(
            e.to_string().contains("must be below the world size 2"),
            "{e}"
        );
        let e = Topology::from_vars(vars(&[("RANK", "x"), ("WORLD_SIZE", "2")])).unwrap_err();
        assert_eq!(e.to_string(), "RANK=\"x\": expected a whole number");
    }

    #[test]
    fn slurm_node_lists_give_their_first_host() {
        assert_eq!(first_host("a1,b2").as_deref(), Some("a1"));
        assert_eq!(first_host("n[007-009]").as_deref(), Some("n007"));
        assert_eq!(first_host("n[2,4]-ib,x").as_deref(), Some("n2-ib"));
        assert_eq!(first_host("single").as_deref(), Some("single"));
        assert_eq!(first_host("").as_deref(), None);
        assert_eq!(first_host("n[x]").as_deref(), None);
    }

    #[test]
    fn buckets_keep_order_and_bound_their_size() {
        let ts: Vec<Tensor> = [10, 10, 30, 5]
            .iter()
            .map(|&n| Tensor::zeros([n], (Kind::Float, Device::Cpu)))
            .collect();
        let sizes: Vec<Vec<i64>> = buckets(&ts, 80)
            .iter()
            .map(|b| b.iter().map(|t| t.numel() as i64).collect())
            .collect();
        assert_eq!(sizes, vec![vec![10, 10], vec![30], vec![5]]);
    }
}
