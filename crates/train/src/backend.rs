//! Turns the `backend` setting into a Burn device (DESIGN.md, "Backends").

use std::path::PathBuf;

use anyhow::{Result, bail};
use burn::tensor::{Device, DeviceKind};
use cubecl_runtime::config::cache::CacheConfig;
use cubecl_runtime::config::{CubeClRuntimeConfig, RuntimeConfig};

use crate::config::BackendChoice;

/// The device a run trains on, and how to name it in logs and metrics.
#[derive(Clone, Debug)]
pub struct Backend {
    pub device: Device,
    /// `flex`, `wgpu` or `ndarray`, as written into `metrics.jsonl`.
    pub name: &'static str,
    /// A line for the log: the backend and the adapter it runs on.
    pub description: String,
    /// wgpu: where CubeCL keeps compiled kernels and autotune results ([`keep_gpu_caches`]).
    pub gpu_cache: Option<PathBuf>,
}

/// A wgpu adapter as wgpu reports it.
struct Adapter {
    name: String,
    kind: wgpu::DeviceType,
    api: wgpu::Backend,
}

/// Lists the adapters wgpu can see through Vulkan, Metal or DX12, without creating a device.
/// (OpenGL is left out: probing it through EGL prints errors on headless machines.)
fn wgpu_adapters() -> Vec<Adapter> {
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
        backends: wgpu::Backends::PRIMARY,
        ..wgpu::InstanceDescriptor::new_without_display_handle_from_env()
    });
    let adapters = block_on(instance.enumerate_adapters(wgpu::Backends::PRIMARY));
    adapters
        .into_iter()
        .map(|a| {
            let info = a.get_info();
            Adapter {
                name: info.name,
                kind: info.device_type,
                api: info.backend,
            }
        })
        .collect()
}

/// Runs a future that completes without waiting on anything outside it.
fn block_on<F: std::future::Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    let mut context = std::task::Context::from_waker(std::task::Waker::noop());
    loop {
        if let std::task::Poll::Ready(value) = future.as_mut().poll(&mut context) {
            return value;
        }
        std::thread::yield_now();
    }
}

fn is_real_gpu(kind: wgpu::DeviceType) -> bool {
    matches!(
        kind,
        wgpu::DeviceType::DiscreteGpu
            | wgpu::DeviceType::IntegratedGpu
            | wgpu::DeviceType::VirtualGpu
    )
}

fn flex() -> Backend {
    Backend {
        device: Device::flex(),
        name: "flex",
        description: format!("flex (CPU: {})", cutmix_kernels::cpu::describe()),
        gpu_cache: None,
    }
}

/// wgpu on the best adapter: a real GPU when there is one, else a software (CPU) adapter such as
/// Mesa's lavapipe. With `local_rank` (several processes on one machine, one per GPU), the
/// `local_rank`-th GPU of the machine's discrete ones (modulo their number).
fn wgpu(local_rank: Option<usize>) -> Result<Backend> {
    let adapters = wgpu_adapters();
    let discrete: Vec<&Adapter> = adapters
        .iter()
        .filter(|a| a.kind == wgpu::DeviceType::DiscreteGpu)
        .collect();
    if let Some(rank) = local_rank
        && !discrete.is_empty()
    {
        let index = rank % discrete.len();
        let gpu = discrete[index];
        return Ok(Backend {
            device: Device::wgpu(DeviceKind::DiscreteGpu(index)),
            name: "wgpu",
            description: format!(
                "wgpu on discrete GPU {index} of {}: {} ({:?})",
                discrete.len(),
                gpu.name,
                gpu.api
            ),
            gpu_cache: Some(keep_gpu_caches()),
        });
    }
    if let Some(gpu) = adapters.iter().find(|a| is_real_gpu(a.kind)) {
        return Ok(Backend {
            device: Device::wgpu(DeviceKind::DefaultDevice),
            name: "wgpu",
            description: format!("wgpu on {} ({:?}, {:?})", gpu.name, gpu.kind, gpu.api),
            gpu_cache: Some(keep_gpu_caches()),
        });
    }
    if let Some(cpu) = adapters.iter().find(|a| a.kind == wgpu::DeviceType::Cpu) {
        return Ok(Backend {
            device: Device::wgpu(DeviceKind::Cpu),
            name: "wgpu",
            description: format!(
                "wgpu on {} (software adapter on the CPU: correct but slow; use flex to train on a CPU)",
                cpu.name
            ),
            gpu_cache: Some(keep_gpu_caches()),
        });
    }
    bail!(
        "backend wgpu: no GPU adapter found; install the GPU's Vulkan driver (or mesa-vulkan-drivers for a software one), or use --backend flex"
    )
}

#[cfg(feature = "ndarray")]
#[allow(deprecated)] // users ask for it by name; the deprecation is upstream's
fn ndarray() -> Result<Backend> {
    Ok(Backend {
        device: Device::ndarray(),
        name: "ndarray",
        description: "ndarray (CPU; deprecated upstream and about 40x slower than flex)".into(),
        gpu_cache: None,
    })
}

#[cfg(not(feature = "ndarray"))]
fn ndarray() -> Result<Backend> {
    bail!(
        "backend ndarray is not built in: rebuild with `cargo run --release --features ndarray --bin train -- ...` (or use --backend flex, about 40x faster)"
    )
}

/// Picks the device for `choice`.
pub fn select(choice: BackendChoice) -> Result<Backend> {
    select_device(choice, None)
}

/// Picks the device for `choice` for the process of local rank `local_rank` of a data-parallel
/// run: on wgpu, one GPU per process on the machine.
pub fn select_for_rank(choice: BackendChoice, local_rank: usize) -> Result<Backend> {
    select_device(choice, Some(local_rank))
}

fn select_device(choice: BackendChoice, local_rank: Option<usize>) -> Result<Backend> {
    match choice {
        BackendChoice::Flex => Ok(flex()),
        BackendChoice::Wgpu => wgpu(local_rank),
        BackendChoice::Ndarray => ndarray(),
        BackendChoice::Auto => {
            if wgpu_adapters().iter().any(|a| is_real_gpu(a.kind)) {
                wgpu(local_rank)
            } else {
                let mut backend = flex();
                backend.description = format!(
                    "flex (CPU: {}; auto found no GPU)",
                    cutmix_kernels::cpu::describe()
                );
                Ok(backend)
            }
        }
    }
}

/// Keeps what CubeCL learns about a GPU (autotune results and compiled kernels) in a per-user
/// folder, `$XDG_CACHE_HOME/cubecl` (usually `~/.cache/cubecl`), so the next run on this machine
/// does not pay for it again. CubeCL's own default is the `target/` folder of the Cargo
/// workspace the process runs in, which a prebuilt binary or another working directory misses.
/// A `cubecl.toml` (or `burn.toml` `[cubecl]` section) that names another place wins, as do
/// CubeCL's environment variables (`CUBECL_AUTOTUNE_CACHE=0` turns the cache off). Call before
/// any GPU device is used; returns the folder.
pub fn keep_gpu_caches() -> PathBuf {
    let mut config = CubeClRuntimeConfig::from_current_dir().override_from_env();
    if matches!(config.environment.path, CacheConfig::Target) {
        config.environment.path = CacheConfig::Global;
    }
    let root = config.environment.path.root();
    // Already set (a second device in the same process): the first call's folder stays.
    CubeClRuntimeConfig::try_set(config);
    root
}

/// Mesa's Vulkan drivers open a Wayland connection when wgpu lists adapters, and print an error
/// line when `XDG_RUNTIME_DIR` is unset (headless servers, containers): give them a folder
/// without a display in it. Call first thing in `main`, before any thread exists.
pub fn quiet_mesa() {
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        // SAFETY: called at the start of `main`, before other threads exist.
        unsafe { std::env::set_var("XDG_RUNTIME_DIR", std::env::temp_dir()) };
    }
}

/// Keeps freed memory in the process for reuse (glibc only; elsewhere a no-op).
///
/// flex allocates a fresh buffer for every tensor an op returns. glibc serves blocks above its
/// mmap threshold with `mmap` and returns freed memory at the top of the heap to the kernel, so
/// every step pays to fault the same pages in again (measured: 12-25% of a CIFAR training step
/// on flex). Serving blocks up to 32 MiB from the heap and not trimming it keeps them; the
/// peak resident memory is the same, since every step reaches it anyway. Skipped when
/// `GLIBC_TUNABLES` is set, so a user's own malloc settings win. Call first thing in `main`.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("GLIBC_TUNABLES").is_none() {
        // 32 MiB is the largest mmap threshold glibc accepts on 64-bit targets.
        const MMAP_THRESHOLD: libc::c_int = 32 << 20;
        const TRIM_THRESHOLD: libc::c_int = 1 << 30;
        // SAFETY: mallopt only changes allocator parameters; called before other threads exist.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
            libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
        }
    }
}
