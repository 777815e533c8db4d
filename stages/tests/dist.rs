//! Two ranks in one process (a thread each) over Gloo on 127.0.0.1:
//! gradients averaged, weights broadcast, sums and variable-length
//! gathers, and a rank that leaves or never comes is an error naming the
//! rank within the timeout.

use std::time::{Duration, Instant};

use rlhf_stages::dist::{Launcher, Ranks, Topology};
use tch::{Device, Kind, Tensor};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn topology(rank: usize, port: u16) -> Topology {
    Topology {
        rank,
        world: 2,
        local_rank: rank,
        master_addr: "127.0.0.1".into(),
        master_port: port,
        agent_store: false,
        launcher: Launcher::Torchrun,
    }
}

/// Runs `body` as ranks 0 and 1, each on its own thread; their results.
fn two_ranks<T: Send + 'static>(
    timeout_s: u64,
    body: impl Fn(Ranks) -> T + Send + Sync + Clone + 'static,
) -> Vec<T> {
    if !rlhf_stages::dist::backends().0 {
        eprintln!("built without Gloo: skipped");
        return vec![];
    }
    let port = free_port();
    let handles: Vec<_> = (0..2)
        .map(|rank| {
            let body = body.clone();
            std::thread::spawn(move || {
                let ranks = Ranks::join(&topology(rank, port), Device::Cpu, timeout_s).unwrap();
                body(ranks)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn two_ranks_average_gradients_broadcast_sum_and_gather() {
    let out = two_ranks(30, |ranks| {
        let r = ranks.rank() as f64;
        // A gradient of (r + 1) * [1, 2, 3] on each rank: the sum is 3x.
        let w = Tensor::zeros([3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let x = Tensor::from_slice(&[1f32, 2., 3.]) * (r + 1.0);
        (&w * &x).sum(Kind::Float).backward();
        ranks.sum_gradients(std::slice::from_ref(&w)).unwrap();
        let grad = Vec::<f32>::try_from(&w.grad()).unwrap();
        let weights = [Tensor::from_slice(&[r as f32; 4])];
        ranks.broadcast_from_main(&weights).unwrap();
        let weights = Vec::<f32>::try_from(&weights[0]).unwrap();
        let sums = ranks.sum(&[r, 10.0]).unwrap();
        let text = "x".repeat(3 + 5 * ranks.rank());
        let gathered = ranks.all_gather_bytes(text.as_bytes()).unwrap();
        ranks.barrier().unwrap();
        (grad, weights, sums, gathered)
    });
    for (grad, weights, sums, gathered) in out {
        assert_eq!(grad, [3.0, 6.0, 9.0]);
        assert_eq!(weights, [0.0; 4], "rank 0's weights everywhere");
        assert_eq!(sums, [1.0, 20.0]);
        assert_eq!(gathered, [b"xxx".to_vec(), b"xxxxxxxx".to_vec()]);
    }
}

#[test]
fn a_rank_that_leaves_ends_the_other_with_an_error() {
    let started = Instant::now();
    let out = two_ranks(5, |ranks| {
        if ranks.rank() == 1 {
            drop(ranks);
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
        ranks.sum(&[1.0]).err().map(|e| e.to_string())
    });
    if out.is_empty() {
        return;
    }
    let message = out[0].clone().expect("rank 0's sum failed");
    assert!(
        message.starts_with("rank 0 of 2: summing values:"),
        "{message}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn a_rank_that_never_comes_fails_the_join_within_the_timeout() {
    if !rlhf_stages::dist::backends().0 {
        return;
    }
    let started = Instant::now();
    let e = Ranks::join(&topology(0, free_port()), Device::Cpu, 2).unwrap_err();
    let message = e.to_string();
    assert!(
        message.starts_with("rank 0 of 2: joining the group:"),
        "{message}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
}

/// Built with NCCL but run without a GPU: joining on CUDA is an error that
/// says so, not a crash.
#[test]
fn nccl_without_a_gpu_is_a_clear_error() {
    let (_, nccl) = rlhf_stages::dist::backends();
    if !nccl || tch::Cuda::is_available() {
        eprintln!("no NCCL backend built, or a GPU is here: skipped");
        return;
    }
    let e = Ranks::join(&topology(0, free_port()), Device::Cuda(0), 5).unwrap_err();
    let message = e.to_string();
    assert!(
        message.starts_with("rank 0 of 2: joining the group:"),
        "{message}"
    );
    assert!(message.contains("on nccl"), "{message}");
    eprintln!("{message}");
}
