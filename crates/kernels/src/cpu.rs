//! Which CPU this is and which vector instructions the matrix products run on.
//!
//! The `gemm` crate (flex's and this crate's matrix products) is built with its `x86-v4`
//! feature: its AVX-512 micro-kernels are compiled in and chosen at run time when the CPU has
//! `avx512f`, its AVX2 + FMA ones otherwise (`is_x86_feature_detected`, once per process), so
//! one binary runs at full width on both kinds of x86 machine.

/// Whether `gemm` runs its AVX-512 micro-kernels on this CPU.
pub fn gemm_runs_avx512() -> bool {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(any(target_arch = "x86", target_arch = "x86_64")))]
    {
        false
    }
}

/// Where `gemm` runs AVX-512, tells it not to copy a column-major left operand into packed
/// blocks (once per process, on this crate's first product): it does so by default when the
/// product has more than 48 columns, which every convolution's GEMM here has (its output
/// channels, with the pixels as rows). Read in place instead, on an AMD Zen 5 (2 threads,
/// minimum of 11 runs, three rounds): CIFAR's 64-channel 8x8 forward 0.89-1.04 -> 0.82-0.94
/// ms, 64x64x32x32 13.2-14.3 -> 12.4-13.0, 8x256x56x56 1x1 2.6-3.4 -> 2.1-2.6, the weight and
/// input gradients even or faster. The copy changes where
/// values are read from, not the order of the sums: results are the same. The AVX2 kernels
/// keep `gemm`'s default: on an AMD Zen 3 (AVX2 only, 2 threads, minimum of 11 runs, two
/// rounds) reading in place was slower in both rounds at 14 of 24 convolution passes and
/// faster in both at none (64x64x32x32 input gradient 32 -> 49 ms, the 7x7/2 stem's weight
/// gradient 30 -> 39, 256-channel 8x8 input gradient 34 -> 44). This is `gemm`'s global
/// setting, so flex's own matrix products read in place too.
pub(crate) fn tune_gemm() {
    static TUNED: std::sync::Once = std::sync::Once::new();
    TUNED.call_once(|| {
        if gemm_runs_avx512() {
            // The threshold is in units of the micro-kernel's columns; 256 is its maximum,
            // never reached by these products (packing only above 1536 columns).
            gemm::set_lhs_packing_threshold_single_thread(256);
            gemm::set_lhs_packing_threshold_multi_thread(256);
        }
    });
}

/// The instruction set `gemm` dispatches to on this CPU, by the same test `gemm` makes.
pub fn gemm_isa() -> &'static str {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    {
        if gemm_runs_avx512() {
            "avx512f"
        } else if std::arch::is_x86_feature_detected!("fma") {
            "avx2+fma"
        } else {
            "scalar"
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        if std::arch::is_aarch64_feature_detected!("neon") {
            "neon"
        } else {
            "scalar"
        }
    }
    #[cfg(not(any(target_arch = "x86", target_arch = "x86_64", target_arch = "aarch64")))]
    {
        "scalar"
    }
}

/// The CPU's model name (`/proc/cpuinfo`), or the architecture where there is none.
pub fn model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split_once(':'))
                .map(|(_, name)| name.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// One line for logs and benchmarks: `AMD EPYC, matrix kernels avx512f, padded-grid kernels
/// avx512f` (the GEMMs' instruction set, then [`crate::rows_dot`]'s, which the padded-grid
/// convolutions run on). (Not the thread count: asking for it would start rayon's pool before
/// a data-parallel run sizes it.)
pub fn describe() -> String {
    format!(
        "{}, matrix kernels {}, padded-grid kernels {}",
        model(),
        gemm_isa(),
        crate::rows_dot::Kernel::detect().name()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The dispatched GEMM against an f64 product, at sizes that run the micro-kernels and the
    /// edge kernels (whichever instruction set this CPU takes: AVX-512 where it has it, AVX2 +
    /// FMA elsewhere; CI runs on both kinds).
    #[test]
    fn the_dispatched_gemm_matches_f64() {
        println!("gemm runs {} on {}", gemm_isa(), model());
        for (m, n, k) in [(67, 45, 129), (256, 64, 576), (1, 33, 7), (100, 1, 50)] {
            let lhs: Vec<f32> = (0..m * k)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
                .collect();
            let rhs: Vec<f32> = (0..k * n)
                .map(|i| ((i * 53 % 97) as f32 - 48.0) / 48.0)
                .collect();
            let mut dst = vec![0f32; m * n];
            // Row-major everywhere: column stride 1, row stride the width.
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    dst.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    lhs.as_ptr(),
                    1,
                    k as isize,
                    rhs.as_ptr(),
                    1,
                    n as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k)
                        .map(|p| lhs[i * k + p] as f64 * rhs[p * n + j] as f64)
                        .sum();
                    let got = dst[i * n + j] as f64;
                    assert!(
                        (got - want).abs() <= 1e-5 * (k as f64).sqrt() * (1.0 + want.abs()),
                        "{m}x{n}x{k} [{i},{j}]: {got} vs {want} ({})",
                        gemm_isa()
                    );
                }
            }
        }
    }
}
